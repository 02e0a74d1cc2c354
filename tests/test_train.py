"""The training generator: reports, stop, best/last, seeds, time budget, fine-tuning."""

import math
import threading
import time

import numpy as np
import pytest
import torch

from napari_selfreg.core.config import ModelConfig, TrainConfig
from napari_selfreg.core.data import InputError
from napari_selfreg.core.model import SegmentationModel
from napari_selfreg.core.progress import drain
from napari_selfreg.core.train import prepare_training_data, train, train_to_end

SMALL = ModelConfig(base_channels=4, depth=2)


def _scene(seed=0, size=96):
    """Bright discs on a dark background, with strokes in a few discs and in the background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(8):
        cy, cx = rng.integers(10, size - 10, 2)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < 36
    image = np.where(mask[..., None], [180, 60, 150], [230, 200, 220]).astype(np.float32)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    labels[mask & (rng.random(mask.shape) < 0.08)] = 2
    labels[~mask & (rng.random(mask.shape) < 0.01)] = 1
    return image, labels, mask


def test_reports_carry_every_field_and_training_learns():
    image, labels, _ = _scene()
    config = TrainConfig(steps=40, patch_size=48, batch_size=4, validation_every=10, seed=0, learning_rate=3e-3)
    reports = []
    run = train([image], [labels], config, SMALL)
    result = drain(run, reports.append)
    assert [r.step for r in reports] == list(range(1, 41))
    last = reports[-1]
    for field in ("ce", "dice", "scr", "ifd", "loss", "learning_rate", "seconds_per_step", "eta_seconds"):
        assert np.isfinite(getattr(last, field))
    assert last.scr > 0 and last.ifd > 0
    assert last.eta_seconds == 0
    vals = [r.val_dice for r in reports if r.val_dice is not None]
    assert len(vals) == 4 and last.best_val_dice == max(vals)
    assert np.mean([r.loss for r in reports[-10:]]) < np.mean([r.loss for r in reports[:5]])
    assert result.best is not result.last and result.last.info.history[-1]["step"] == 40


def test_float16_training_goes_through_the_gradient_scaler(monkeypatch):
    """float16 autocast is what CUDA and MPS get; the CPU runs it too, so the path is tested here."""
    from napari_selfreg.core import train as train_module

    scalers = []
    apply_step = train_module.apply_step

    def recording_apply_step(loss, optimizer, scaler):
        scalers.append(scaler)
        apply_step(loss, optimizer, scaler)

    monkeypatch.setattr(train_module, "autocast_dtype", lambda device, precision: torch.float16)
    monkeypatch.setattr(train_module, "apply_step", recording_apply_step)
    image, labels, _ = _scene()
    config = TrainConfig(steps=40, patch_size=48, batch_size=4, validation_every=20, seed=0, learning_rate=3e-3)
    result = train_to_end([image], [labels], config, SMALL)
    assert len(scalers) == 40 and isinstance(scalers[0], torch.amp.GradScaler)
    assert all(s is scalers[0] for s in scalers)  # one scaler carries its scale from step to step
    losses = [r.loss for r in result.history]
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    for parameter in result.last.network.parameters():
        assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all()


def test_no_selfreg_switch_zeroes_the_terms():
    image, labels, _ = _scene()
    result = train_to_end([image], [labels], TrainConfig(steps=3, patch_size=32, selfreg=False), SMALL)
    assert all(r.scr == 0 and r.ifd == 0 for r in result.history)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def _same_weights(model, snapshot):
    state = model.network.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


def test_stop_ends_within_one_step_and_keeps_best_and_last():
    image, labels, _ = _scene()
    stop = threading.Event()
    config = TrainConfig(steps=10_000, patch_size=48, batch_size=2, validation_every=2, seed=0)
    run = train([image], [labels], config, SMALL, stop=stop)
    snapshots, scores = [], []
    for _ in range(5):
        report = next(run)
        snapshots.append(_snapshot(report.model))  # the live model as it stands after this step
        scores.append(report.val_dice)
    stop.set()
    t0 = time.perf_counter()
    with pytest.raises(StopIteration) as done:
        next(run)
    waited = time.perf_counter() - t0
    result = done.value.value
    assert waited < max(2.0, 3 * report.seconds_per_step + 1.0)
    assert result.stopped and result.steps == 5 and result.history[-1].stopped
    # "last" are exactly the weights of step 5 (and what keep="last", the default, hands over)
    assert result.keep == "last" and result.model is result.last
    assert _same_weights(result.last, snapshots[-1])
    # "best" are those of the first of the highest held-out scores (validations at steps 2 and 4)
    validated = [i for i, s in enumerate(scores) if s is not None]
    assert validated == [1, 3]
    best = validated[int(np.argmax([scores[i] for i in validated]))]
    assert _same_weights(result.best, snapshots[best])
    # step 5 moved the weights, so the checks above tell "last" from "best" and from step 4
    assert not _same_weights(result.last, snapshots[best]) and not _same_weights(result.last, snapshots[-2])


def test_a_callable_stop_works_before_the_first_step():
    image, labels, _ = _scene()
    result = train_to_end([image], [labels], TrainConfig(steps=50, patch_size=32), SMALL, stop=lambda: True)
    assert result.stopped and result.steps == 0


def test_stopped_before_any_validation_best_means_the_last_weights():
    """With no validation yet, "best" used to hand over the untrained starting weights."""
    image, labels, _ = _scene()
    stop = threading.Event()
    config = TrainConfig(steps=50, patch_size=32, batch_size=2, validation_every=25, keep="best", seed=0)
    run = train([image], [labels], config, SMALL, stop=stop)
    for _ in range(3):
        next(run)
    stop.set()
    with pytest.raises(StopIteration) as done:
        next(run)
    result = done.value.value
    assert result.stopped and result.steps == 3 and result.keep == "best"
    assert result.model is result.best and result.best is result.last
    torch.manual_seed(0)
    untrained = SegmentationModel.create(result.model.info).network.state_dict()
    trained = result.model.network.state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in trained.items() if v.dtype.is_floating_point)


@pytest.mark.parametrize(("patch", "batch", "depth"), [(16, 1, 2 + 2), (32, 1, 5)])
def test_a_single_value_per_channel_at_the_bottleneck_is_refused_before_training(patch, batch, depth):
    image, labels, _ = _scene()
    config = TrainConfig(steps=2, patch_size=patch, batch_size=batch)
    with pytest.raises(InputError, match="batch size of 2 or more"):
        next(train([image], [labels], config, ModelConfig(base_channels=4, depth=depth)))
    assert train_to_end([image], [labels], TrainConfig(steps=1, patch_size=patch, batch_size=2),
                        ModelConfig(base_channels=4, depth=depth)).steps == 1


def test_validation_every_must_be_a_step_or_more():
    with pytest.raises(ValueError, match="validation_every"):
        TrainConfig(validation_every=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(ce_weight=float("nan")), "CE and Dice"),
        (dict(ce_weight=math.inf), "CE and Dice"),
        (dict(ce_weight=-0.1), "CE and Dice"),
        (dict(dice_weight=-1.0), "CE and Dice"),
        (dict(dice_weight=float("nan")), "CE and Dice"),
        (dict(ce_weight=0.0, dice_weight=0.0), "above 0"),
        (dict(weight_decay=-1e-4), "weight decay"),
        (dict(weight_decay=float("nan")), "weight decay"),
        (dict(weight_decay=math.inf), "weight decay"),
        (dict(seed=-1), "seed"),
        (dict(seed=True), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed="3"), "seed"),
        (dict(seed=2**64), "seed"),
    ],
)
def test_loss_weights_weight_decay_and_seed_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_loss_weights_weight_decay_and_seed_within_range_are_kept():
    for settings in (dict(ce_weight=0.0), dict(dice_weight=0.0), dict(weight_decay=0.0),
                     dict(seed=None), dict(seed=0), dict(seed=np.int64(3)), dict(seed=2**64 - 1)):
        config = TrainConfig(**settings)
        assert all(getattr(config, k) == v for k, v in settings.items())


def test_seed_makes_a_cpu_run_repeatable():
    image, labels, _ = _scene()
    config = TrainConfig(steps=4, patch_size=32, batch_size=2, seed=7, device="cpu", precision="float32")
    a = train_to_end([image], [labels], config, SMALL)
    b = train_to_end([image], [labels], config, SMALL)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    for x, y in zip(a.last.network.state_dict().values(), b.last.network.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    c = train_to_end([image], [labels], TrainConfig(**{**config.to_dict(), "seed": 8}), SMALL)
    assert [r.loss for r in a.history] != [r.loss for r in c.history]


def test_a_seeded_run_leaves_the_global_torch_generator_alone():
    """napari and the user's own code share torch's global generator; training must not reset it."""
    image, labels, _ = _scene()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_to_end([image], [labels], TrainConfig(steps=2, patch_size=32, batch_size=2, seed=0), SMALL)
    assert torch.equal(torch.rand(3), expected)


def test_unseeded_runs_draw_their_own_scr_pairings(monkeypatch):
    """seed=None means a different run each time; SCR's channel pairings were seeded with 0."""
    from napari_selfreg.core import selfreg

    image, labels, _ = _scene()
    drawn = []
    pairings = selfreg._pairings

    def recording(*args):
        s_idx, t_idx = pairings(*args)
        drawn.append(s_idx.tolist())
        return s_idx, t_idx

    monkeypatch.setattr(selfreg, "_pairings", recording)
    firsts = []
    for seed in (None, None, 5, 5):
        drawn.clear()
        train_to_end([image], [labels], TrainConfig(steps=1, patch_size=32, batch_size=2, seed=seed), SMALL)
        firsts.append(list(drawn))  # every student's draw of the step
    assert firsts[0] != firsts[1]
    assert firsts[2] == firsts[3]


def test_time_budget_stops_training():
    image, labels, _ = _scene()
    t0 = time.perf_counter()
    result = train_to_end([image], [labels], TrainConfig(steps=10**6, time_budget=1.5, patch_size=32), SMALL)
    assert time.perf_counter() - t0 < 10
    assert 1 <= result.steps < 10**6 and result.history[-1].elapsed < 1.5 + 2 * result.history[-1].seconds_per_step


def test_fine_tuning_continues_from_a_saved_model(tmp_path):
    from napari_selfreg.core.checkpoint import load_model, save_model

    image, labels, _ = _scene()
    config = TrainConfig(steps=3, patch_size=32, seed=0)
    first = train_to_end([image], [labels], config, SMALL, class_names=["bg", "disc"])
    path = save_model(first.last, tmp_path / "round1")
    loaded = load_model(path)
    second = train_to_end([image], [labels], TrainConfig(steps=2, patch_size=32, seed=1), initial=loaded)
    assert second.last.class_names == ["bg", "disc"]
    assert second.last.config == first.last.config
    # the file keeps every round's history, the earlier ones first
    rounds = [(r["round"], r["step"]) for r in second.last.info.history]
    assert rounds == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)]
    reloaded = load_model(save_model(second.best, tmp_path / "round2"))
    assert [r["round"] for r in reloaded.info.history] == [1] * 3 + [2] * 2
    # a class renamed between rounds keeps its new name; the loaded model keeps the old one
    renamed = train_to_end([image], [labels], TrainConfig(steps=1, patch_size=32), initial=loaded,
                           class_names=["bg", "tumour nucleus"])
    assert renamed.last.class_names == ["bg", "tumour nucleus"] and loaded.class_names == ["bg", "disc"]
    # the loaded model itself is left untouched
    for a, b in zip(loaded.network.state_dict().values(), first.last.network.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a new class beyond the model's classes is refused
    more = labels.copy()
    more[:2, :10] = 3
    with pytest.raises(InputError, match="knows only 2 classes"):
        train_to_end([image], [more], TrainConfig(steps=1, patch_size=32), initial=loaded)
    # corrections of one class alone are refused, and the message says what works
    for kept, missing in ((2, "no background"), (1, "only background")):
        one_class = np.where(labels == kept, kept, 0).astype(labels.dtype)
        with pytest.raises(InputError, match=f"{missing} is painted.*paint over its prediction used as labels"):
            train_to_end([image], [one_class], TrainConfig(steps=1, patch_size=32), initial=loaded)


def test_fine_tuning_starts_from_the_loaded_weights(tmp_path):
    """``initial=`` is where training starts: not a fresh network with the loaded classes."""
    from napari_selfreg.core.checkpoint import load_model, save_model

    image, labels, _ = _scene()
    first = train_to_end([image], [labels], TrainConfig(steps=3, patch_size=32, seed=0), SMALL)
    loaded = load_model(save_model(first.last, tmp_path / "round1"))
    loaded_state = _snapshot(loaded)
    # a run stopped before its first step hands the loaded weights back exactly (buffers too)
    held = train_to_end([image], [labels], TrainConfig(steps=2, patch_size=32, seed=1),
                        initial=loaded, stop=lambda: True)
    assert held.stopped and held.steps == 0
    assert _same_weights(held.last, loaded_state) and _same_weights(held.best, loaded_state)
    # one step at a tiny learning rate moves no parameter by more than about the rate
    tiny = train_to_end([image], [labels], TrainConfig(steps=1, patch_size=32, seed=1, learning_rate=1e-9),
                        initial=loaded)
    assert tiny.steps == 1
    moved = [(a - b).abs().max().item()
             for a, b in zip(tiny.last.network.parameters(), loaded.network.parameters(), strict=True)]
    assert max(moved) < 1e-6
    # ...which a network drawn afresh from the run's seed is not: the tolerance tells the two apart
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        fresh = SegmentationModel.create(loaded.info)
    far = [(a - b).abs().max().item()
           for a, b in zip(fresh.network.parameters(), loaded.network.parameters(), strict=True)]
    assert max(far) > 1e-3
    assert _same_weights(loaded, loaded_state)  # the loaded model itself is left untouched


def test_several_image_label_pairs_and_three_classes(monkeypatch):
    """Training samples every image: here the second holds the only strokes of class 3."""
    from napari_selfreg.core import train as train_module
    from napari_selfreg.core.data import normalize
    from napari_selfreg.core.regions import painted_crops

    image, labels, _ = _scene(0)
    image2, labels2, _ = _scene(1)
    labels2 = labels2.copy()
    labels2[0:3, 0:30] = 3
    samplers, drawn = [], []

    class RecordingSampler(train_module.PatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

        def _centre(self):
            centre = super()._centre()
            drawn.append(centre[0])  # which window the patch is cut from
            return centre

    monkeypatch.setattr(train_module, "PatchSampler", RecordingSampler)
    result = train_to_end(
        [image, image2], [labels, labels2], TrainConfig(steps=3, patch_size=32, seed=0), SMALL
    )
    assert result.last.config.num_classes == 3
    assert result.last.class_names == ["background", "class 2", "class 3"]
    (sampler,) = samplers
    # one window per image, each its own image normalised
    crops = painted_crops([image, image2], [labels, labels2], 64)
    assert [crop.source for crop in crops] == [0, 1]
    norm = result.last.info.normalization
    for window, crop in zip(sampler.images, crops, strict=True):
        np.testing.assert_array_equal(window, normalize(crop.image, norm))
    # class 3 is sampled from the second image only, background and class 2 from both
    assert sorted(sampler.by_class) == [1, 2, 3]
    assert [index for index, _ in sampler.by_class[3]] == [1]
    for cls in (1, 2):
        assert sorted(index for index, _ in sampler.by_class[cls]) == [0, 1]
    assert set(drawn) == {0, 1}  # the steps' patches come from both images


def _one_stroke_per_class(seed, size=48):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), np.uint8)
    labels[5:8, 5:30] = 1
    labels[30:33, 10:40] = 2
    return image, labels


def test_strokes_of_several_images_are_held_out_together():
    """Four images with one stroke per class each: 4 strokes per class in all, so some are
    held out, as if they lay on one image (per image, a lone stroke stays in training)."""
    from napari_selfreg.core.regions import painted_crops

    pairs = [_one_stroke_per_class(seed) for seed in range(4)]
    images, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    config = TrainConfig(steps=2, patch_size=32, batch_size=2, validation_every=1, validation_fraction=0.5,
                         seed=0, device="cpu", precision="float32")
    result = train_to_end(images, labels, config, SMALL)
    assert all(r.val_dice is not None and 0 <= r.val_dice <= 1 for r in result.history)

    crops = painted_crops(images, labels, 32)
    assert [crop.source for crop in crops] == [0, 1, 2, 3]
    train_set, val_images, val_labels = prepare_training_data(
        images, crops, result.last.info, 0.5, np.random.default_rng(0)
    )
    assert len(train_set.labels) == len(val_labels) == len(val_images) == 4
    for crop, kept, held in zip(crops, train_set.labels, val_labels, strict=True):
        assert not np.any((kept > 0) & (held > 0))
        np.testing.assert_array_equal(np.where(held > 0, held, kept), crop.labels)
        for cls in (1, 2):  # the one stroke of each class is held out whole or not at all
            stroke = crop.labels == cls
            assert np.all(held[stroke] == cls) or not np.any(held[stroke])
    for cls in (1, 2):  # half of each class's 4 strokes, and training keeps the others
        assert sum(bool(np.any(held == cls)) for held in val_labels) == 2
        assert sum(bool(np.any(kept == cls)) for kept in train_set.labels) == 2

    # one image: the same seeded draw as the split of that image's windows alone
    from napari_selfreg.core.data import split_strokes_jointly

    image, lbl, _ = _scene()
    one = painted_crops([image], [lbl], 64)
    train_one, _, val_one = prepare_training_data([image], one, result.last.info, 0.2, np.random.default_rng(3))
    expected_train, expected_val = split_strokes_jointly([c.labels for c in one], 0.2, np.random.default_rng(3))
    for got, want in zip(train_one.labels + val_one, expected_train + expected_val, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_first_painted_image_decides_the_normalisation():
    """An unpainted image trains nothing, so it does not choose the model's input."""
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 4000, (48, 48), dtype=np.uint16)
    rgb, labels = _one_stroke_per_class(1)
    unpainted = np.zeros_like(labels)
    config = TrainConfig(steps=1, patch_size=32, batch_size=2, seed=0, device="cpu", precision="float32")
    result = train_to_end([gray16, rgb], [unpainted, labels], config, SMALL)
    assert result.last.info.normalization.mode == "uint8"
    assert result.last.info.normalization.channels == 3 and result.last.config.in_channels == 3
    first_layer = next(result.last.network.parameters())
    assert first_layer.shape[1] == 3
    # painted images that differ still train together; the first painted one decides
    for images, mode, channels in (([gray16, rgb], "percentile", 1), ([rgb, gray16], "uint8", 3)):
        mixed = train_to_end(images, [labels, labels], config, SMALL)
        assert mixed.steps == 1 and np.isfinite(mixed.history[-1].loss)
        assert mixed.last.info.normalization.mode == mode
        assert mixed.last.info.normalization.channels == channels == mixed.last.config.in_channels


def test_mismatched_pair_counts():
    image, labels, _ = _scene()
    with pytest.raises(InputError, match="one labels per image"):
        train_to_end([image, image], [labels], TrainConfig(steps=1), SMALL)


def test_one_array_instead_of_lists_is_named():
    image, labels, _ = _scene()
    with pytest.raises(InputError, match=r"labels is one array; .*pass \[image\], \[labels\]"):
        train_to_end(image, labels, TrainConfig(steps=1), SMALL)
    with pytest.raises(InputError, match=r"images is one array"):
        train_to_end(image[..., 0], [labels], TrainConfig(steps=1), SMALL)
    with pytest.raises(InputError, match=r"images is one array"):  # an RGB image was split into its rows
        train_to_end(image, [labels], TrainConfig(steps=1), SMALL)
    # an object array of images of different sizes is a sequence of images, as before
    other, other_labels, _ = _scene(seed=1, size=80)
    images = np.empty(2, object)
    images[:] = [image, other]
    assert len(train_to_end(images, [labels, other_labels], TrainConfig(steps=1, patch_size=32), SMALL).history) == 1


@pytest.mark.parametrize(
    "names, message",
    [("background,nuclei", "not one string"), ([1, 2], "must be strings"), (np.array([1, 2]), "must be strings")],
)
def test_class_names_that_would_make_an_unloadable_file_are_refused_before_training(names, message):
    image, labels, _ = _scene()
    with pytest.raises(InputError, match=message):
        train_to_end([image], [labels], TrainConfig(steps=1), SMALL, class_names=names)


def test_numpy_settings_and_names_train_save_and_load(tmp_path):
    """A seed sweep over np.arange used to fail at the first step, and numpy widths at save time."""
    from napari_selfreg.core.checkpoint import load_model, save_model

    image, labels, _ = _scene()
    config = TrainConfig(steps=np.int64(2), patch_size=np.int64(32), batch_size=2, seed=np.arange(3)[2])
    model_config = ModelConfig(base_channels=np.int64(4), depth=np.int64(2))
    result = train_to_end([image], [labels], config, model_config, class_names=np.array(["bg", "nuclei"]))
    loaded = load_model(save_model(result.model, tmp_path / "m.safetensors"))
    assert loaded.class_names == ["bg", "nuclei"] and loaded.config.base_channels == 4
    assert loaded.info.training["seed"] == 2 and len(result.history) == 2


def test_settings_and_the_starting_model_of_the_wrong_type_are_named():
    image, labels, _ = _scene()
    with pytest.raises(TypeError, match=r"config must be a TrainConfig .*not dict"):
        train_to_end([image], [labels], {"steps": 1}, SMALL)
    with pytest.raises(TypeError, match=r"model_config must be a ModelConfig .*not dict"):
        train_to_end([image], [labels], TrainConfig(steps=1), {"depth": 2})
    with pytest.raises(TypeError, match=r"initial must be a model \(load_model\(path\) reads one\), not str"):
        train_to_end([image], [labels], TrainConfig(steps=1), SMALL, initial="model.safetensors")


def test_keep_chooses_which_weights_the_run_hands_over():
    image, labels, _ = _scene()
    base = dict(steps=6, patch_size=32, batch_size=2, validation_every=2, seed=0)
    last = train_to_end([image], [labels], TrainConfig(**base), SMALL)
    assert last.keep == "last" and last.model is last.last
    best = train_to_end([image], [labels], TrainConfig(**base, keep="best"), SMALL)
    assert best.model is best.best and best.model is not best.last
    with pytest.raises(ValueError, match="keep"):
        TrainConfig(keep="first")


def test_a_stopped_widget_run_hands_over_the_weights_the_settings_keep():
    """The widget's worker: after Stop, "best" means the best held-out weights so far, not the last."""
    from napari_selfreg.widgets._workers import run_training

    image, labels, _ = _scene()
    stop = threading.Event()
    config = TrainConfig(steps=10_000, patch_size=48, batch_size=2, validation_every=1, seed=0,
                         learning_rate=3e-2, keep="best")
    run = run_training([image], [labels], config, SMALL, ["background", "disc"], None, stop)
    weights, scores = [], []
    for _ in range(8):
        kind, report = next(run)
        assert kind == "report"
        weights.append({k: v.clone() for k, v in report.model.network.state_dict().items()})
        scores.append(report.val_dice)
    stop.set()
    with pytest.raises(StopIteration) as done:
        next(run)
    result = done.value.value
    assert result.stopped and result.steps == 8 and result.keep == "best"
    best = int(np.argmax(scores))  # the first of equal scores, as training keeps it
    assert best < len(scores) - 1  # so "last" would be other weights
    kept = result.model.network.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in weights[best].items())
    assert _same_weights(result.last, weights[-1]) and not _same_weights(result.last, weights[best])


def test_the_warm_up_follows_the_decay_when_the_time_budget_runs_out():
    from napari_selfreg.core.train import _learning_rate

    peak = 1e-3
    steps = TrainConfig(steps=300, learning_rate=peak)
    timed = TrainConfig(steps=300, time_budget=2.0, learning_rate=peak)
    # a step budget ramps up over its first 10 steps, whatever the clock says
    assert [_learning_rate(steps, s, 100.0) for s in (0, 9)] == pytest.approx([peak / 10, peak])
    # a time budget that ends inside the warm-up hands over weights trained at the decayed tenth
    assert _learning_rate(timed, 9, elapsed=2.0) == pytest.approx(peak / 10)
    assert _learning_rate(timed, 9, elapsed=1.0) == pytest.approx(0.55 * peak)
    # early in a long budget the ramp is unchanged
    assert _learning_rate(timed, 4, elapsed=0.01) == pytest.approx(peak / 2)
