"""Model files: round trip, and unsafe or broken files fail clearly without running code."""

import pickle

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
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.network.eval()(x), loaded.network(x))


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Exploit.target),))


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    _Exploit.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.safetensors"
    with open(path, "wb") as f:
        pickle.dump({"state": _Exploit()}, f, protocol=2)
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()
    # a torch.save file (zip) is refused the same way
    torch.save({"w": torch.zeros(1)}, tmp_path / "torch.pt")
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(tmp_path / "torch.pt")


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
