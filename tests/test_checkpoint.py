"""Model files: round trip, and unsafe or broken files fail clearly without running code."""

import json
import pickle
import re

import pytest
import torch

from napari_selfreg.core.checkpoint import ModelFileError, load_model, read_model_info, save_model
from napari_selfreg.core.config import ModelConfig, ModelInfo
from napari_selfreg.core.model import SegmentationModel


@pytest.fixture
def model():
    torch.manual_seed(0)
    info = ModelInfo(model=ModelConfig(base_channels=4, depth=2, num_classes=3), class_names=["bg", "nuclei", "glands"])
    info.training = {"steps": 5}
    return SegmentationModel.create(info)


def test_round_trip_keeps_weights_and_document(tmp_path, model):
    path = save_model(model, tmp_path / "m")
    assert path.suffix == ".safetensors"
    loaded = load_model(path)
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, loaded.network.state_dict()[key])
    assert loaded.class_names == ["bg", "nuclei", "glands"]
    assert loaded.config.num_classes == 3 and loaded.info.training == {"steps": 5}
    assert read_model_info(path).package_version
    # a name that already ends so, in any case, keeps its one suffix
    assert save_model(model, tmp_path / "upper.SAFETENSORS").name == "upper.SAFETENSORS"
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.network.eval()(x), loaded.network(x))


def test_clone_owns_contiguous_float32_copies_and_draws_no_random_numbers(model):
    source = model.network.to(memory_format=torch.channels_last)
    generator_state = torch.random.get_rng_state()
    twin = model.clone()
    assert torch.equal(torch.random.get_rng_state(), generator_state)
    for key, value in twin.network.state_dict().items():
        original = source.state_dict()[key]
        assert value.device.type == "cpu" and value.is_contiguous() and value.dtype == original.dtype
        assert torch.equal(value, original) and value.data_ptr() != original.data_ptr()
    with torch.no_grad():
        next(twin.network.parameters()).add_(1.0)  # training the copy leaves the original alone
    assert not torch.equal(next(twin.network.parameters()), next(source.parameters()))
    assert all(p.requires_grad for p in twin.network.parameters())
    halved = SegmentationModel.from_weights(model.info, {k: v.half() if v.is_floating_point() else v
                                                          for k, v in model.network.state_dict().items()})
    assert {v.dtype for v in halved.network.state_dict().values()} == {torch.float32, torch.int64}


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.target),))


def _armed(marker):
    """Points the payload at ``marker``: each test first shows that unpickling its file
    creates it, so that its staying absent after ``load_model`` means something."""
    _Exploit.target = str(marker)
    return marker


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_payload_is_refused_and_never_executed(tmp_path, protocol, name):
    marker = _armed(tmp_path / "pwned")
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump({"state": _Exploit()}, f, protocol=protocol)
    # control: unpickling this file does run the payload
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    # protocols 2 and up start with the PROTO opcode; 0 and 1 have no signature and are
    # recognised by parsing their opcodes. Either way they are named as pickles and nothing runs.
    with pytest.raises(ModelFileError, match="is a pickle"):
        load_model(path)
    with pytest.raises(ModelFileError):
        read_model_info(path)
    assert not marker.exists()


def test_torch_save_payload_is_refused_and_never_executed(tmp_path):
    marker = _armed(tmp_path / "pwned")
    path = tmp_path / "torch.pt"
    torch.save({"w": torch.zeros(1), "state": _Exploit()}, path)
    torch.load(path, weights_only=False)  # control: torch.load without weights_only runs it
    assert marker.exists()
    marker.unlink()
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(path.read_bytes())
    for name in (path, renamed):
        with pytest.raises(ModelFileError, match="pickle"):
            load_model(name)
        with pytest.raises(ModelFileError, match="pickle"):
            read_model_info(name)
    assert not marker.exists()


def test_a_safetensors_name_over_garbage_bytes_is_refused(tmp_path):
    import numpy as np

    path = tmp_path / "garbage.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelFileError, match="not a readable napari-selfreg model file"):
        load_model(path)


@pytest.mark.parametrize("cut", ["half", "no stop", "text"])
def test_only_a_whole_pickle_stream_is_named_a_pickle(tmp_path, cut):
    """Protocol 0 has no signature, so a file is called a pickle only when its opcodes parse
    to the final STOP; a cut-off pickle or plain text is "another format"."""
    data = pickle.dumps({"weights": [1.0, 2.0], "name": "m"}, protocol=0)
    body = {"half": data[: len(data) // 2], "no stop": data[:-1], "text": b"(not a model, just text)\n"}[cut]
    path = tmp_path / "m.safetensors"
    path.write_bytes(body)
    with pytest.raises(ModelFileError, match="another format"):
        load_model(path)
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match="is a pickle"):
        load_model(path)


def test_truncated_file_gives_clear_message(tmp_path, model):
    path = save_model(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(tmp_path / "cut.safetensors")


def test_foreign_safetensors_and_mismatched_architecture(tmp_path, model):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not a napari-selfreg model"):
        load_model(tmp_path / "foreign.safetensors")
    # the document says depth 3 but the weights are depth 2
    import json

    from safetensors.torch import save_file as save

    doc = {"format": "1", **model.info.to_dict()}
    doc["model"]["depth"] = 3
    save(model.state_dict_cpu(), str(tmp_path / "bad.safetensors"), metadata={"napari_selfreg": json.dumps(doc)})
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(tmp_path / "bad.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "none.safetensors")


def test_future_format_is_refused(tmp_path, model):
    import json

    from safetensors.torch import save_file

    doc = {"format": "99", **model.info.to_dict()}
    save_file(model.state_dict_cpu(), str(tmp_path / "f.safetensors"), metadata={"napari_selfreg": json.dumps(doc)})
    with pytest.raises(ModelFileError, match="update napari-selfreg"):
        load_model(tmp_path / "f.safetensors")


def _with_document(tmp_path, model, name, edit):
    import json

    from safetensors.torch import save_file

    doc = {"format": "1", **model.info.to_dict()}
    doc = edit(doc)
    path = tmp_path / f"{name}.safetensors"
    save_file(model.state_dict_cpu(), str(path), metadata={"napari_selfreg": json.dumps(doc)})
    return path


def _set(doc, **changes):
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = doc
        for parent in parents:
            target = target[parent]
        target[key] = value
    return doc


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: [1, 2], "damaged model document"),
        (lambda doc: _set(doc, model=[]), "damaged model document"),
        (lambda doc: _set(doc, class_names=["bg", "nuclei", "glands", "ghost"]), "4 class names for 3 classes"),
        (lambda doc: _set(doc, model__depth=30), "depth must be 1 to 8"),
        (lambda doc: _set(doc, model__base_channels=100_000), "must be 2 to 512"),
        (lambda doc: _set(doc, model__base_channels=512), "do not fit"),
        (lambda doc: _set(doc, class_names="abc"), "list of names"),
        (lambda doc: _set(doc, normalization__channels=1), "1 channel"),
        (lambda doc: _set(doc, normalization__mode="bogus"), "unknown normalisation"),
        (lambda doc: _set(doc, normalization__low_percentile="x"), "percentile"),
        (lambda doc: _set(doc, normalization__high_percentile=150), "percentiles"),
        # continued training reads the history after its last step: refused now, not then
        (lambda doc: _set(doc, history="old"), "history must be a list of step records"),
        (lambda doc: _set(doc, history=[{"step": 0, "round": "two"}]), "rounds must be whole numbers"),
        (lambda doc: _set(doc, training=[1]), "damaged model document"),
        # predictions hold 8-bit ids: 300 classes crashed prediction
        (lambda doc: _set(doc, model__num_classes=300, class_names=[f"c{i}" for i in range(300)]), "300 classes"),
        (lambda doc: {k: v for k, v in doc.items() if k != "format"}, "names no model-file format"),
        # 1.0 passed the channel check and failed deep in prediction
        (lambda doc: _set(doc, normalization__channels=3.0), "normalization.channels must be a whole number"),
        (lambda doc: _set(doc, model__base_channels=8.0), "model.base_channels must be a whole number"),
        # a default would read a percentile model's images as 8-bit ones
        (lambda doc: doc | {"normalization": {k: v for k, v in doc["normalization"].items() if k != "mode"}},
         "normalization names no mode"),
    ],
    ids=["list-document", "list-model", "class-names", "depth-30", "width-100000", "width-512", "names-string",
         "norm-channels", "norm-mode", "norm-low-text", "norm-high-150", "history-text", "history-round-text",
         "training-list", "300-classes", "no-format", "norm-channels-float", "width-float", "norm-no-mode"],
)
def test_a_crafted_document_is_refused_before_its_network_is_built(tmp_path, model, monkeypatch, edit, message):
    path = _with_document(tmp_path, model, "crafted", edit)
    built, loaded = _record_networks(monkeypatch)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)
    # a network may be described on the meta device (no memory) to compare shapes, never built
    assert all(device == "meta" for device in built), built
    assert not loaded


def _record_networks(monkeypatch):
    """Records the device of every SelfRegUNet built (``load_model`` builds them through
    ``_check_shapes`` and ``SegmentationModel.from_weights``) and every call of ``from_weights``."""
    from napari_selfreg.core import model as model_module
    from napari_selfreg.core import unet

    built, loaded = [], []
    init, from_weights = unet.SelfRegUNet.__init__, model_module.SegmentationModel.from_weights.__func__

    def recording_init(self, *args, **kwargs):
        built.append(torch.empty(0).device.type)  # the device in effect for new parameters
        init(self, *args, **kwargs)

    def recording_from_weights(cls, info, weights):
        loaded.append(info)
        return from_weights(cls, info, weights)

    monkeypatch.setattr(unet.SelfRegUNet, "__init__", recording_init)
    monkeypatch.setattr(model_module.SegmentationModel, "from_weights", classmethod(recording_from_weights))
    return built, loaded


def test_the_recorder_sees_the_networks_a_load_builds(tmp_path, model, monkeypatch):
    """The control for the test above: a good file is built through what it watches."""
    path = save_model(model, tmp_path / "good")
    built, loaded = _record_networks(monkeypatch)
    assert load_model(path).class_names == model.class_names
    assert built == ["meta", "meta"] and len(loaded) == 1


def test_weights_that_are_not_finite_are_refused(tmp_path, model):
    from safetensors.torch import save_file

    tensors = model.state_dict_cpu()
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    path = tmp_path / "diverged.safetensors"
    save_file(tensors, str(path), metadata={"napari_selfreg": json.dumps({"format": "1", **model.info.to_dict()})})
    with pytest.raises(ModelFileError, match=f"NaN or infinite weights \\({name}\\)"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_that_are_not_floats_are_refused(tmp_path, model, dtype):
    """They were cast to float32 on loading and predicted nothing of what was trained."""
    from safetensors.torch import save_file

    tensors = model.state_dict_cpu()
    name = next(k for k in tensors if k.endswith("weight"))
    tensors[name] = tensors[name].to(dtype)
    path = tmp_path / "ints.safetensors"
    save_file(tensors, str(path), metadata={"napari_selfreg": json.dumps({"format": "1", **model.info.to_dict()})})
    message = re.escape(f"weight {name} is {dtype} where the network holds a float")
    with pytest.raises(ModelFileError, match=message):
        load_model(path)
    tensors = model.state_dict_cpu()
    counter = next((k for k in tensors if k.endswith("num_batches_tracked")), None)
    if counter is not None:  # the counters stay whole numbers
        tensors[counter] = tensors[counter].float()
        save_file(tensors, str(path), metadata={"napari_selfreg": json.dumps({"format": "1", **model.info.to_dict()})})
        with pytest.raises(ModelFileError, match=r"torch\.float32 where the network holds torch\.int64"):
            load_model(path)


def test_a_document_nested_thousands_deep_is_a_damaged_document(tmp_path, model):
    from safetensors.torch import save_file

    document = json.dumps({"format": "1", **model.info.to_dict()})
    deep = document[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    save_file(model.state_dict_cpu(), str(tmp_path / "deep.safetensors"), metadata={"napari_selfreg": deep})
    with pytest.raises(ModelFileError, match="damaged model document"):
        load_model(tmp_path / "deep.safetensors")


def test_saving_leaves_the_process_umask_alone(tmp_path, model, monkeypatch):
    """The umask is the whole process's: setting it to 0 for a moment, to read it, gave files
    another thread created then the mode 0666."""
    import os

    def umask(_mask):
        raise AssertionError("save_model changed the process umask")

    monkeypatch.setattr(os, "umask", umask)
    saved = save_model(model, tmp_path / "m")
    assert load_model(saved).class_names == model.class_names


def test_a_model_is_found_by_the_name_it_was_saved_as(tmp_path, model):
    saved = save_model(model, tmp_path / "m1")  # written as m1.safetensors
    assert saved.name == "m1.safetensors"
    assert load_model(tmp_path / "m1").class_names == model.class_names
    assert read_model_info(tmp_path / "m1").class_names == model.class_names


def test_a_folder_is_not_a_model(tmp_path):
    (tmp_path / "models.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="is a folder"):
        load_model(tmp_path / "models.safetensors")


def test_saving_into_a_folder_name_is_refused(tmp_path, model):
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelFileError, match="is a folder; give the model a file name"):
        save_model(model, tmp_path / "models")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no models.safetensors beside it


def test_a_model_that_would_not_load_again_is_not_written(tmp_path, model):
    model.info.class_names = [1, 2, 3]
    with pytest.raises(ModelFileError, match="cannot save the model: class_names must be a list of names"):
        save_model(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_names_and_permissions(tmp_path, model):
    import os

    old = os.umask(0o022)
    try:
        dotted = save_model(model, tmp_path / "nuclei_v1.5")
    finally:
        os.umask(old)
    assert dotted.name == "nuclei_v1.5.safetensors" and load_model(dotted).class_names[0] == "bg"
    assert dotted.stat().st_mode & 0o777 == 0o644  # readable by others, as any file the user writes
    assert save_model(model, tmp_path / "m.safetensors").name == "m.safetensors"
    assert not list(tmp_path.glob("*.part"))
    from napari_selfreg.widgets.model_registry import ModelRegistry

    assert ModelRegistry().load_file(dotted) == "nuclei_v1.5"  # the name the user typed


def test_load_accepts_the_auto_device(tmp_path, model):
    path = save_model(model, tmp_path / "m")
    assert next(load_model(path, device="auto").network.parameters()).device.type in ("cpu", "cuda", "mps")
