"""The command line end to end on a real image, and its one-line user errors (exit code 2)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from napari_selfreg.cli import main


def _strokes(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = np.zeros(mask.shape, np.uint8)
    regions = ((2, ndimage.binary_erosion(mask, iterations=2)), (1, ndimage.binary_erosion(~mask, iterations=4)))
    for cls, region in regions:
        ys, xs = np.nonzero(region)
        for i in rng.choice(len(ys), 12, replace=False):
            y, x = ys[i], xs[i]
            window = (slice(max(0, y - 2), y + 3), slice(max(0, x - 6), x + 7))
            labels[window][region[window]] = cls
    return labels


@pytest.mark.data
def test_train_predict_evaluate_on_a_real_image(tmp_path, monuseg_pair, capsys):
    image, mask = monuseg_pair
    image, mask = image[:384, :384], mask[:384, :384]
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", _strokes(mask))
    tifffile.imwrite(tmp_path / "mask.tif", (mask * 255).astype(np.uint8))
    rc = main([
        "train", "--image", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "labels.tif"),
        "--out", str(tmp_path / "model"), "--steps", "25", "--seed", "0", "--device", "cpu",
        "--class-names", "background,nuclei",
    ])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 25 and (tmp_path / "model.safetensors").exists()
    assert summary["kept"] == "last"

    rc = main([
        "predict", "--model", str(tmp_path / "model.safetensors"), "--image", str(tmp_path / "image.tif"),
        "--out", str(tmp_path / "pred.tif"), "--probabilities", str(tmp_path / "prob.tif"), "--tile-size", "256",
        "--instances", str(tmp_path / "inst.tif"), "--uncertainty", str(tmp_path / "unsure.tif"),
    ])
    assert rc == 0
    predicted_json = json.loads(capsys.readouterr().out)
    labels = tifffile.imread(tmp_path / "pred.tif")
    # instances: the watershed split of the written labels, objects only where structure is predicted
    from napari_selfreg.core.instances import separate_instances

    instances = tifffile.imread(tmp_path / "inst.tif")
    np.testing.assert_array_equal(instances, separate_instances(labels))
    assert predicted_json["instances"] == instances.max() > 10 and not (instances[labels == 1] > 0).any()
    assert predicted_json["instances_per_label"] == {"2": predicted_json["instances"]}  # one structure class
    from napari_selfreg.io import labels_note

    assert labels_note(tmp_path / "inst.tif") == []  # reopens in napari as labels, not as an image
    probs = tifffile.imread(tmp_path / "prob.tif")
    assert labels.shape == (384, 384) and set(np.unique(labels)) <= {1, 2}
    assert probs.shape == (2, 384, 384) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(labels, probs.argmax(0) + 1)
    # where the model is unsure: the entropy of the written probabilities over log 2, and its mean
    unsure = tifffile.imread(tmp_path / "unsure.tif")
    p = probs.astype(np.float64)
    assert unsure.shape == (384, 384) and unsure.dtype == np.float32
    np.testing.assert_allclose(unsure, -(p * np.log(np.clip(p, 1e-12, None))).sum(0) / np.log(2), atol=1e-4)
    assert predicted_json["mean_uncertainty"] == pytest.approx(unsure.mean(), abs=1e-4)
    wrong = (labels == 2) != mask.astype(bool)
    assert unsure[wrong].mean() > unsure[~wrong].mean()  # less sure where it is wrong

    # --flips: the averaged prediction of the mirrored image is the mirrored averaged prediction
    tifffile.imwrite(tmp_path / "mirrored.tif", np.ascontiguousarray(image[:, ::-1]))
    for name in ("image", "mirrored"):
        assert main([
            "predict", "--model", str(tmp_path / "model.safetensors"), "--image", str(tmp_path / f"{name}.tif"),
            "--out", str(tmp_path / f"{name}_flips.tif"), "--probabilities", str(tmp_path / f"{name}_fp.tif"),
            "--flips", "--precision", "float32", "--device", "cpu",
        ]) == 0
    capsys.readouterr()
    averaged, mirrored = tifffile.imread(tmp_path / "image_fp.tif"), tifffile.imread(tmp_path / "mirrored_fp.tif")
    np.testing.assert_allclose(mirrored[:, :, ::-1], averaged, atol=1e-4)

    rc = main(["evaluate", "--prediction", str(tmp_path / "pred.tif"), "--mask", str(tmp_path / "mask.tif")])
    assert rc == 0
    scores = json.loads(capsys.readouterr().out)["classes"]
    predicted, truth = labels == 2, mask
    expected = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert scores["2"]["dice"] == pytest.approx(expected)
    assert scores["2"]["dice"] > 0.5  # 25 steps on ~0.2 % painted pixels already finds nuclei


@pytest.mark.data
def test_a_slide_sized_tiff_is_predicted_lazily_into_the_same_files(tmp_path, monuseg_pair, capsys, monkeypatch):
    import napari_selfreg.io as io

    image, mask = monuseg_pair
    image = image[:512, :640]
    tifffile.imwrite(tmp_path / "image.tif", image, tile=(128, 128), photometric="rgb")
    tifffile.imwrite(tmp_path / "labels.tif", _strokes(mask[:512, :640]))
    assert main([
        "train", "--image", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "labels.tif"),
        "--out", str(tmp_path / "model"), "--steps", "5", "--device", "cpu",
    ]) == 0
    predict = ["predict", "--model", str(tmp_path / "model.safetensors"), "--image", str(tmp_path / "image.tif"),
               "--tile-size", "256", "--precision", "float32", "--device", "cpu"]
    assert main([*predict, "--out", str(tmp_path / "whole.tif"), "--probabilities", str(tmp_path / "whole_p.tif"),
                 "--instances", str(tmp_path / "whole_i.tif"), "--uncertainty", str(tmp_path / "whole_u.tif")]) == 0
    whole_counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pixels_per_label"]

    opened = []
    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)  # this 512 x 640 image now counts as a slide
    original = io.open_image
    monkeypatch.setattr(io, "open_image", lambda path, lazy_above=None: opened.append(original(path)) or opened[-1])
    out = tmp_path / "lazy" / "labels.tif"  # a folder that does not exist yet
    assert main([*predict, "--out", str(out), "--probabilities", str(tmp_path / "lazy_p.tif"),
                 "--instances", str(tmp_path / "lazy_i.tif"), "--uncertainty", str(tmp_path / "lazy_u.tif")]) == 0
    lazy_counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pixels_per_label"]

    assert not isinstance(opened[0], np.ndarray)  # read through the file's tiles, not whole
    np.testing.assert_array_equal(tifffile.imread(out), tifffile.imread(tmp_path / "whole.tif"))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "lazy_p.tif"), tifffile.imread(tmp_path / "whole_p.tif"))
    np.testing.assert_allclose(tifffile.imread(tmp_path / "lazy_u.tif"), tifffile.imread(tmp_path / "whole_u.tif"))
    assert lazy_counts == whole_counts and sum(lazy_counts.values()) == 512 * 640
    # the instances of a slide are split into a memory map beside the labels: the same objects
    lazy_instances = tifffile.imread(tmp_path / "lazy_i.tif")
    np.testing.assert_array_equal(lazy_instances, tifffile.imread(tmp_path / "whole_i.tif"))
    assert lazy_instances.max() >= 1  # (5 steps: the model finds structure, not yet nuclei)
    assert [p.name for p in out.parent.iterdir()] == ["labels.tif"]  # the memory maps are gone


def test_evaluate_instance_mask_counts_every_nonzero_pixel(tmp_path, capsys):
    from PIL import Image

    prediction = np.ones((10, 10), np.uint8)
    prediction[:5] = 2
    mask = np.zeros((10, 10), np.uint8)
    mask[:5, :5] = 3  # instance ids
    mask[:5, 5:] = 7
    Image.fromarray(prediction).save(tmp_path / "p.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert main(["evaluate", "--prediction", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png")]) == 0
    scores = json.loads(capsys.readouterr().out)["classes"]
    assert scores["2"] == {"dice": 1.0, "iou": 1.0} and scores["1"]["dice"] == 1.0


def test_evaluate_matches_objects_of_instance_files(tmp_path, capsys):
    """--instances: objects matched one to one at IoU > 0.5, against the mask's instance ids, or
    its connected pieces where it has none; one instance file per prediction."""
    import tifffile

    mask = np.zeros((20, 30), np.uint8)
    mask[2:10, 2:10], mask[2:10, 10:18] = 3, 9  # two touching objects
    mask[12:18, 20:28] = 4
    split = np.zeros((20, 30), np.int32)
    split[2:10, 2:10], split[2:10, 10:18], split[12:18, 20:28] = 1, 2, 3
    merged = np.where(mask > 0, 1, 0).astype(np.int32)  # the touching pair as one object, and the third
    merged[12:18, 20:28] = 2
    labels = np.where(mask > 0, 2, 1).astype(np.uint8)
    for name, array in (("m.tif", mask), ("p.tif", labels), ("split.tif", split), ("merged.tif", merged),
                        ("binary.tif", (mask > 0).astype(np.uint8) * 255)):
        tifffile.imwrite(tmp_path / name, array)
    evaluate = ["evaluate", "--prediction", str(tmp_path / "p.tif")]
    assert main([*evaluate, "--mask", str(tmp_path / "m.tif"), "--instances", str(tmp_path / "split.tif")]) == 0
    objects = json.loads(capsys.readouterr().out)["objects"]
    assert (objects["predicted"], objects["true"], objects["matched"], objects["f1"]) == (3, 3, 3, 1.0)
    assert objects["true_objects_from"] == "instance ids"
    assert main([*evaluate, "--mask", str(tmp_path / "m.tif"), "--instances", str(tmp_path / "merged.tif")]) == 0
    objects = json.loads(capsys.readouterr().out)["objects"]
    assert (objects["predicted"], objects["true"], objects["matched"]) == (2, 3, 1)
    assert objects["f1"] == pytest.approx(2 * 1 / 5) and objects["panoptic_quality"] == pytest.approx(0.4)
    # a binary mask cannot tell the touching pair apart: its connected pieces are the objects
    assert main([*evaluate, "--mask", str(tmp_path / "binary.tif"), "--instances", str(tmp_path / "merged.tif")]) == 0
    objects = json.loads(capsys.readouterr().out)["objects"]
    assert (objects["true"], objects["matched"], objects["true_objects_from"]) == (
        2, 2, "connected pieces of the non-zero pixels")
    # several pairs: counts summed, scores averaged over the images
    assert main(["evaluate", "--prediction", str(tmp_path / "p.tif"), str(tmp_path / "p.tif"),
                 "--mask", str(tmp_path / "m.tif"), str(tmp_path / "m.tif"),
                 "--instances", str(tmp_path / "split.tif"), str(tmp_path / "merged.tif")]) == 0
    mean = json.loads(capsys.readouterr().out)["mean"]["objects"]
    assert (mean["predicted"], mean["true"], mean["matched"]) == (5, 6, 4)
    assert mean["f1"] == pytest.approx((1.0 + 0.4) / 2)
    assert main([*evaluate, "--mask", str(tmp_path / "m.tif"), "--instances", str(tmp_path / "split.tif"),
                 str(tmp_path / "merged.tif")]) == 2
    assert "one instance file per prediction" in capsys.readouterr().err
    tifffile.imwrite(tmp_path / "small.tif", split[:10])
    assert main([*evaluate, "--mask", str(tmp_path / "m.tif"), "--instances", str(tmp_path / "small.tif")]) == 2
    assert "differ in shape" in capsys.readouterr().err
    # predict's labels given as the instances: every nucleus pixel read as one object, quietly
    assert main([*evaluate, "--mask", str(tmp_path / "m.tif"), "--instances", str(tmp_path / "p.tif")]) == 2
    assert "holds no 0 (no object), so it is a class map" in capsys.readouterr().err


def test_evaluate_reads_palette_masks_and_masks_without_background(tmp_path, capsys):
    """A palette PNG's indices are the ids (not its colours); an all-255 tile is all structure."""
    from PIL import Image

    prediction = np.ones((10, 10), np.uint8)
    prediction[:, :6] = 2
    instances = np.zeros((10, 10), np.uint8)
    instances[:, :3], instances[:, 3:6] = 1, 2  # instance 1's colour has no red: read as RGB it vanished
    palette = Image.fromarray(instances, mode="P")
    palette.putpalette([0, 0, 0, 0, 128, 0, 128, 0, 0] + [0] * 759)
    palette.save(tmp_path / "m.png")
    Image.fromarray(prediction).save(tmp_path / "p.png")
    assert main(["evaluate", "--prediction", str(tmp_path / "p.png"), "--mask", str(tmp_path / "m.png")]) == 0
    assert json.loads(capsys.readouterr().out)["classes"]["2"]["dice"] == 1.0
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "all.png")
    Image.fromarray(np.full((10, 10), 2, np.uint8)).save(tmp_path / "all_p.png")
    assert main(["evaluate", "--prediction", str(tmp_path / "all_p.png"), "--mask", str(tmp_path / "all.png")]) == 0
    assert json.loads(capsys.readouterr().out)["classes"]["2"]["dice"] == 1.0


def test_evaluate_means_the_same_whether_masks_hold_ids_or_0_255(tmp_path, capsys):
    """An image without structure in either file is left out of the structure's mean, for
    binary masks as for painting ids (before, 0/255 masks added a Dice of 1 to the mean)."""
    from PIL import Image

    prediction = np.ones((10, 10), np.uint8)
    prediction[:, :4] = 2  # 40 px
    truth = np.ones((10, 10), np.uint8)
    truth[:, 2:6] = 2  # 40 px, 20 shared: Dice 0.5
    empty = np.ones((10, 10), np.uint8)  # no structure anywhere
    for name, array in (("p.png", prediction), ("ids.png", truth), ("e.png", empty),
                        ("bin.png", np.where(truth == 2, 255, 0).astype(np.uint8)),
                        ("ebin.png", np.zeros((10, 10), np.uint8))):
        Image.fromarray(array).save(tmp_path / name)
    means = []
    for masks in (("ids.png", "e.png"), ("bin.png", "ebin.png")):
        assert main(["evaluate", "--prediction", str(tmp_path / "p.png"), str(tmp_path / "e.png"),
                     "--mask", *(str(tmp_path / m) for m in masks)]) == 0
        means.append(json.loads(capsys.readouterr().out)["mean"]["classes"])
    assert means[0] == means[1]
    assert means[1]["2"] == {"dice": 0.5, "iou": pytest.approx(1 / 3), "images": 1}
    assert means[1]["1"]["images"] == 2


def test_scores_of_forced_ids_leave_out_the_unpainted_id():
    from napari_selfreg.core.metrics import per_class_overlap

    mask = np.array([[0, 1], [2, 2]], np.uint8)
    assert sorted(per_class_overlap(mask, mask, "ids")) == ["1", "2"]


TRAIN = ["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m"]
_HAS_CUDA = torch.cuda.is_available()
_HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "--model", "{tmp}/missing.safetensors", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif"],
         "does not exist"),
        (["predict", "--model", "{tmp}/img.tif", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif"],
         "not a readable napari-selfreg model"),
        ([*TRAIN, "--steps", "1"],
         "nothing is painted"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/small.tif", "--out", "{tmp}/m", "--steps", "1"],
         "shape"),
        (["train", "--image", "{tmp}/img.tif", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif",
          "--out", "{tmp}/m"], "one --labels per --image"),
        (["train", "--image", "{tmp}/nope.xyz", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m"], "does not exist"),
        # painted labels: the device check itself refuses (it runs after the labels are checked)
        pytest.param(["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/painted.tif", "--out", "{tmp}/m",
                      "--steps", "1", "--device", "cuda"],
                     "^napari-selfreg train: error: CUDA was requested but no CUDA GPU is available",
                     marks=pytest.mark.skipif(_HAS_CUDA, reason="this machine has CUDA")),
        (["evaluate", "--prediction", "{tmp}/img.tif", "--mask", "{tmp}/small.tif"], "differ in shape"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/adir"], "is a folder"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/afile/m"],
         "is a file, not a folder"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m",
          "--time-budget", "0"], "positive number of seconds"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m",
          "--class-names", "nuclei"], "a name for background and each structure"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m",
          "--resume", "{tmp}/img.tif", "--width", "32"], "come from the model"),
        (["predict", "--model", "{tmp}/adir", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif"], "is a folder"),
        (["predict", "--model", "{tmp}/img.tif", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.jpg"],
         "cannot write this format"),
        (["predict", "--model", "{tmp}/img.tif", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif",
          "--probabilities", "{tmp}/p.png"], "cannot write this format"),
        (["inspect", "--model", "{tmp}/img.tif", "--image", "{tmp}/img.tif", "--out", "{tmp}/afile"], "is a file"),
        ([*TRAIN, "--seed", "-1"],
         "--seed must be 0 or more"),
        (["train", "--image", "{tmp}/zstack.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m"],
         "is a stack \\(Z=3\\)"),
        (["train", "--image", "{tmp}/volume.nii.gz", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m"],
         "is a stack \\(Z=3\\)"),
        (["train", "--image", "{tmp}/pages.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m"],
         "is a stack \\(pages=3\\)"),
        (["train", "--image", "{tmp}/bare_pages.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m"],
         "is a stack \\(pages=4\\)"),
        ([*TRAIN, "--time-budget", "inf"], "positive number of seconds"),
        ([*TRAIN, "--lambda-scr", "-1"], "SCR and IFD weights must be finite numbers, 0 or more"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--out", "{tmp}/img.tif"],
         "--out and --image name the same file"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif",
          "--probabilities", "{tmp}/o.tif"], "--probabilities and --out name the same file"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/colour.png", "--out", "{tmp}/m"],
         "colour.png is a colour picture, not labels"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/painted.tif", "--out", "{tmp}/m",
          "--class-names", "background,nuclei,glands"], "gives 3 names but there are 2 classes"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif",
          "--instances", "{tmp}/i.png"], "--instances i.png: cannot write this format"),
        ([*TRAIN, "--depth", "12"], "depth must be 1 to 8"),
        ([*TRAIN, "--width", "100000"], "width .* must be 2 to 512"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "{tmp}/painted.tif", "--out", "{tmp}/o.tif"],
         "--out must hold {stem} when predicting several images"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "{tmp}/adir/img.tif",
          "--out", "{tmp}/{{stem}}_labels.tif"], "share the name img, so their outputs would overwrite each other"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "{tmp}/adir/IMG.tif",
          "--out", "{tmp}/{{stem}}_labels.tif"], "have names that differ only in letter case, so their outputs"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--image", "{tmp}/adir/../img.tif",
          "--out", "{tmp}/{{stem}}_labels.tif"], "an --image is given twice"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--out", "{tmp}/out/{{stem}}.tif",
          "--probabilities", "{tmp}/{{stem}}.tif"], "--probabilities and --image name the same file"),
        (["evaluate", "--prediction", "{tmp}/img.tif", "{tmp}/empty.tif", "--mask", "{tmp}/empty.tif"],
         "2 --prediction files but 1 --mask files"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif",
          "--uncertainty", "{tmp}/u.png"], "--uncertainty u.png: cannot write this format"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/nuclei.TIF"],
         "--out nuclei.TIF names an image file, but train writes a model: name it e.g. nuclei.safetensors"),
        (["train", "--image", "{tmp}/img.tif", "--labels", "{tmp}/empty.tif", "--out", "{tmp}/m.nii.gz"],
         "name it e.g. m.safetensors"),
        (["predict", "--model", "{tmp}/m", "--image", "{tmp}/img.tif", "--out", "{tmp}/o.tif",
          "--uncertainty", "{tmp}/o.tif"], "--uncertainty and --out name the same file"),
    ],
    ids=["no-model", "not-a-model", "unpainted", "shape", "pair-count", "no-image", "cuda", "eval-shape",
         "out-folder", "out-under-file", "budget-0", "one-class-name", "resume-width", "model-folder",
         "labels-jpeg", "probabilities-png", "inspect-out-file", "seed", "imagej-z-stack", "nifti-volume",
         "gray-pages", "bare-gray-pages", "budget-inf", "negative-lambda", "out-is-image",
         "probabilities-is-out", "colour-labels", "extra-class-name", "instances-png", "depth-12", "width-100000",
         "several-without-stem", "same-stem", "stems-differing-in-case", "image-twice", "stem-names-the-image",
         "eval-pair-count", "uncertainty-png", "train-out-tif", "train-out-nifti", "uncertainty-is-out"],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, message):
    import re

    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32, 3), np.uint8))
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((32, 32), np.uint8))
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((16, 16), np.uint8))
    tifffile.imwrite(tmp_path / "zstack.tif", np.zeros((3, 32, 32), np.uint8), imagej=True, metadata={"axes": "ZYX"})
    from PIL import Image

    painted = np.zeros((32, 32), np.uint8)
    painted[2:6, 2:20], painted[20:26, 5:25] = 1, 2
    tifffile.imwrite(tmp_path / "painted.tif", painted)
    colour = np.stack([painted * 60, painted * 20, painted], axis=-1)  # a screenshot of painted labels
    Image.fromarray(colour).save(tmp_path / "colour.png")
    # three or four gray pages would pass for a channel-first RGB(A) image
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "bare_pages.tif", np.zeros((4, 32, 32), np.uint8), photometric="minisblack",
                     metadata=None)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 32, 32), np.uint8)), str(tmp_path / "volume.nii.gz"))
    (tmp_path / "adir").mkdir()
    tifffile.imwrite(tmp_path / "adir" / "img.tif", np.zeros((32, 32, 3), np.uint8))
    (tmp_path / "adir.safetensors").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    rc = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and re.search(message, err[0]), err
    assert "Traceback" not in err[0]


def test_gray_rgb_labels_a_tiny_budget_and_a_model_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    """Labels saved as an RGB picture of gray ids train; a budget shorter than a step still
    trains one; a model whose file fails at the end is saved elsewhere, and the message says where."""
    from PIL import Image

    from napari_selfreg.core import checkpoint
    from napari_selfreg.core.checkpoint import load_model

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "img.tif", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    painted = np.zeros((48, 48), np.uint8)
    painted[2:8, 2:30], painted[30:40, 5:35] = 1, 2
    Image.fromarray(np.repeat(painted[..., None], 3, axis=-1)).save(tmp_path / "gray_rgb.png")
    argv = ["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "gray_rgb.png"),
            "--width", "4", "--depth", "2", "--patch-size", "32", "--batch-size", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "tiny"), "--time-budget", "0.0001"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and summary["final_loss"] is not None
    assert load_model(summary["model"]).class_names == ["background", "foreground"]

    real_save = checkpoint.save_model
    full_disk = tmp_path / "full"

    def save(model, path):
        if full_disk in checkpoint.model_path(path).parents:
            raise OSError(28, "No space left on device")
        return real_save(model, path)

    monkeypatch.setattr(checkpoint, "save_model", save)
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", str(full_disk / "m"), "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    rescued = list(tmp_path.glob("m-rescued-*.safetensors"))
    assert len(rescued) == 1 and str(rescued[0].name) in err[0]
    assert load_model(rescued[0]).info.history[-1]["step"] == 2  # both steps kept


@pytest.mark.data
def test_several_images_in_one_run_match_single_runs_and_a_bad_one_is_skipped(tmp_path, monuseg_pair, capsys):
    """predict with several images names each output after its image ({stem}), writes what a
    run per image writes, reports a bad image and goes on (exit 2 at the end); evaluate
    scores pairs and their mean."""
    image, mask = monuseg_pair
    crops = {"a": (slice(0, 256), slice(0, 256)), "b": (slice(300, 556), slice(400, 656))}
    for name, window in crops.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", image[window])
        tifffile.imwrite(tmp_path / f"{name}_mask.tif", (mask[window] * 255).astype(np.uint8))
    tifffile.imwrite(tmp_path / "strokes.tif", _strokes(mask[crops["a"]]))
    bad = np.ones((64, 64), np.float32)
    bad[5, 5] = np.nan
    tifffile.imwrite(tmp_path / "bad.tif", bad)
    model = tmp_path / "m.safetensors"
    assert main(["train", "--image", str(tmp_path / "a.tif"), "--labels", str(tmp_path / "strokes.tif"),
                 "--out", str(model), "--steps", "15", "--width", "8", "--device", "cpu"]) == 0
    capsys.readouterr()

    out = tmp_path / "out"
    rc = main(["predict", "--model", str(model), "--image", str(tmp_path / "a.tif"), str(tmp_path / "bad.tif"),
               "--image", str(tmp_path / "b.tif"), "--out", str(out / "{stem}_labels.tif"),
               "--probabilities", str(out / "{stem}_p.tif"), "--tile-size", "128", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [line["image"] for line in lines] == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    err = captured.err.strip().splitlines()
    assert "bad.tif: the image contains NaN" in err[0] and "1 of 3 images failed" in err[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "a_p.tif", "b_labels.tif", "b_p.tif"]
    for name in crops:
        single = tmp_path / f"single_{name}.tif"
        assert main(["predict", "--model", str(model), "--image", str(tmp_path / f"{name}.tif"),
                     "--out", str(single), "--tile-size", "128", "--device", "cpu"]) == 0
        batch = tifffile.imread(out / f"{name}_labels.tif")
        np.testing.assert_array_equal(batch, tifffile.imread(single))
        assert set(np.unique(batch)) == {1, 2}
    capsys.readouterr()

    pairs = [(out / f"{name}_labels.tif", tmp_path / f"{name}_mask.tif") for name in crops]
    singles = []
    for prediction, truth in pairs:
        assert main(["evaluate", "--prediction", str(prediction), "--mask", str(truth)]) == 0
        singles.append(json.loads(capsys.readouterr().out)["classes"])
    assert main(["evaluate", "--prediction", *(str(p) for p, _ in pairs), "--mask", *(str(m) for _, m in pairs)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [pair["classes"] for pair in report["pairs"]] == singles
    assert report["pairs"][1]["mask"] == str(tmp_path / "b_mask.tif")
    for c in ("1", "2"):
        mean = (singles[0][c]["dice"] + singles[1][c]["dice"]) / 2
        assert report["mean"]["classes"][c]["dice"] == pytest.approx(mean)
        assert report["mean"]["classes"][c]["images"] == 2


def _console_script() -> str | None:
    """The installed ``napari-selfreg`` script: beside this Python (the environment's bin or
    Scripts folder), else on the PATH."""
    import os
    import shutil
    from pathlib import Path

    name = "napari-selfreg.exe" if os.name == "nt" else "napari-selfreg"
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which("napari-selfreg")


def test_console_script_is_installed(tmp_path):
    """The ``[project.scripts]`` entry runs main and hands its exit code to the shell."""
    script = _console_script()
    assert script is not None, "the napari-selfreg script is not installed beside this Python nor on the PATH"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: napari-selfreg") and "train" in out.stdout and "predict" in out.stdout
    from PIL import Image

    prediction = np.ones((8, 8), np.uint8)
    prediction[:4] = 2
    Image.fromarray(prediction).save(tmp_path / "p.png")
    Image.fromarray(np.full((4, 4), 2, np.uint8)).save(tmp_path / "small.png")
    scored = subprocess.run([script, "evaluate", "--prediction", str(tmp_path / "p.png"), "--mask",
                             str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["classes"]["2"] == {"dice": 1.0, "iou": 1.0}
    refused = subprocess.run([script, "evaluate", "--prediction", str(tmp_path / "p.png"), "--mask",
                              str(tmp_path / "small.png")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2  # the user-error code reaches the shell
    assert refused.stderr.strip().splitlines() == [
        "napari-selfreg evaluate: error: prediction p.png (8, 8) and mask small.png (4, 4) differ in shape"]
    module = subprocess.run([sys.executable, "-m", "napari_selfreg.cli", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "train" in module.stdout


def _untrained_model(path):
    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    return save_model(SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2))), path)


def test_a_damaged_slide_in_a_batch_is_one_line_and_the_rest_is_predicted(tmp_path, capsys, monkeypatch):
    """A slide is read lazily, so a damaged tile shows up mid-prediction, as the codec's own
    error: it is reported for that image, and the next image is still predicted."""
    import napari_selfreg.io as io

    model = _untrained_model(tmp_path / "m")
    rng = np.random.default_rng(0)
    for name in ("a", "slide", "c"):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 255, (96, 128, 3), dtype=np.uint8),
                         tile=(32, 32), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(tmp_path / "slide.tif") as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]
    with open(tmp_path / "slide.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)  # every image here counts as a slide
    rc = main(["predict", "--model", str(model), "--image", *(str(tmp_path / f"{n}.tif") for n in ("a", "slide", "c")),
               "--out", str(tmp_path / "out" / "{stem}.tif"), "--tile-size", "64", "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip().splitlines()
    assert "slide.tif: could not read part of the image" in err[0] and "Traceback" not in captured.err
    assert [json.loads(line)["image"] for line in captured.out.strip().splitlines()] == [
        str(tmp_path / "a.tif"), str(tmp_path / "c.tif")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "c.tif"]  # no scratch folder left


def test_several_pairs_are_scored_alike_when_one_mask_shows_no_background(tmp_path, capsys):
    """Painting-id masks, one of which holds no background (1): both are scored class by
    class, so the mean of class 2 is the mean of class 2."""
    truth_a = np.ones((20, 20), np.uint8)
    truth_a[:10, :10], truth_a[10:, 10:] = 2, 3
    truth_b = np.full((20, 20), 2, np.uint8)
    truth_b[:, 12:] = 3
    prediction_b = np.full((20, 20), 2, np.uint8)
    prediction_b[:, 10:] = 3
    for name, array in (("ma", truth_a), ("mb", truth_b), ("pa", truth_a), ("pb", prediction_b)):
        tifffile.imwrite(tmp_path / f"{name}.tif", array)
    assert main(["evaluate", "--prediction", str(tmp_path / "pa.tif"), str(tmp_path / "pb.tif"),
                 "--mask", str(tmp_path / "ma.tif"), str(tmp_path / "mb.tif")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["masks"] == "ids"
    b = report["pairs"][1]["classes"]
    assert b["2"]["dice"] == pytest.approx(2 * 200 / (200 + 240)) and b["3"]["dice"] == pytest.approx(2 * 160 / 360)
    assert report["mean"]["classes"]["2"]["dice"] == pytest.approx((1.0 + 400 / 440) / 2)
    assert report["mean"]["classes"]["3"]["images"] == 2 and report["mean"]["classes"]["1"]["images"] == 1


def test_an_ome_tiff_stem_drops_its_ome():
    from napari_selfreg.cli import image_stem

    assert [image_stem(n) for n in ("x.ome.tif", "Y.OME.TIFF", "z.nii.gz", "w.png")] == ["x", "Y", "z", "w"]


def test_a_label_id_without_strokes_is_a_warning(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "img.tif", rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    painted = np.zeros((48, 48), np.uint8)
    painted[2:8, 2:30], painted[30:40, 5:35] = 1, 3  # no 2
    tifffile.imwrite(tmp_path / "gap.tif", painted)
    assert main(["train", "--image", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "gap.tif"),
                 "--out", str(tmp_path / "m"), "--steps", "1", "--width", "4", "--depth", "2",
                 "--patch-size", "32", "--batch-size", "1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: label 2 is not painted, so this training does not teach that class" in err


def test_mistakes_found_by_an_audit_are_one_line_errors(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from napari_selfreg import cli
    from napari_selfreg.bench.__main__ import main as bench_main

    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "photo.png")
    Image.fromarray(np.full((16, 16), 2, np.uint8)).save(tmp_path / "p.png")
    strokes = np.ones((16, 16), np.uint8)
    strokes[:4] = 2
    Image.fromarray(strokes).save(tmp_path / "strokes.jpg")
    # a colour picture given as the mask (it used to score its red channel)
    assert main(["evaluate", "--prediction", str(tmp_path / "p.png"), "--mask", str(tmp_path / "photo.png")]) == 2
    assert "colour picture" in capsys.readouterr().err
    # JPEG labels (their compression adds ids nobody painted)
    args = ["train", "--image", str(tmp_path / "photo.png"), "--labels", str(tmp_path / "strokes.jpg")]
    assert main([*args, "--out", str(tmp_path / "m.safetensors"), "--steps", "1"]) == 2
    assert "PNG or TIFF" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()
    # an allocation too large for the machine
    monkeypatch.setattr(cli, "cmd_evaluate", lambda args: np.empty(1 << 62, np.uint8))
    assert main(["evaluate", "--prediction", str(tmp_path / "p.png"), "--mask", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and len(err.strip().splitlines()) == 1
    # a device that does not exist, refused before the runs (it used to fail each run and exit 0)
    assert bench_main(["interactive", "--device", "tpu", "--smoke", "--out", str(tmp_path / "b.json")]) == 2
    assert not (tmp_path / "b.json").exists()


def test_help_shows_the_defaults_worth_showing(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 128)" in text and "(default: 0.015)" in text and "(default: None)" not in text
    assert "repeatable (default: 0)" in text  # 0 is a value, not an absent default
    assert "(default: False)" not in text
    from napari_selfreg.bench.__main__ import main as bench_main

    with pytest.raises(SystemExit):
        bench_main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_train_takes_the_widgets_precision_and_validation_interval(tmp_path, capsys):
    from PIL import Image

    from napari_selfreg.core.checkpoint import load_model
    from napari_selfreg.sample_data import he_arrays

    sample = he_arrays()
    Image.fromarray(sample["image"]).save(tmp_path / "im.png")
    Image.fromarray(sample["strokes"]).save(tmp_path / "st.png")
    base = ["train", "--image", str(tmp_path / "im.png"), "--labels", str(tmp_path / "st.png"), "--steps", "4"]
    assert main([*base, "--out", str(tmp_path / "m"), "--precision", "float32", "--validate-every", "2"]) == 0
    settings = load_model(tmp_path / "m.safetensors").info.training
    assert settings["precision"] == "float32" and settings["validation_every"] == 2
    assert main([*base, "--out", str(tmp_path / "n"), "--precision", "half"]) == 2
    assert "unknown precision" in capsys.readouterr().err


# ------------------------------------------------------------ devices, stacks, the sample end to end, seeds

_ABSENT_DEVICES = [
    pytest.param("cuda", "CUDA was requested but no CUDA GPU is available; use --device auto or cpu",
                 marks=pytest.mark.skipif(_HAS_CUDA, reason="this machine has CUDA"), id="cuda"),
    pytest.param("mps", "MPS was requested but is not available; use --device auto or cpu",
                 marks=pytest.mark.skipif(_HAS_MPS, reason="this machine has MPS"), id="mps"),
    pytest.param("tpu", "unknown device 'tpu'; choose auto, cpu, cuda or mps", id="unknown"),
]


def test_a_cuda_index_the_machine_lacks_or_a_malformed_one_is_refused_before_any_work(monkeypatch):
    """cuda:7 on a one-GPU machine passed and failed at the first tensor; cuda:x raised torch's RuntimeError."""
    from napari_selfreg.core.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"cuda:7 was requested but this machine has 1 CUDA GPU\(s\), cuda:0 to"):
        resolve_device("cuda:7")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        resolve_device("cuda:x")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """A 48 x 48 RGB image, labels painted with 1 and 2, and an untrained tiny model."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    tifffile.imwrite(folder / "img.tif", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    painted = np.zeros((48, 48), np.uint8)
    painted[2:8, 2:30], painted[30:40, 5:35] = 1, 2
    tifffile.imwrite(folder / "painted.tif", painted)
    _untrained_model(folder / "m")
    return folder


@pytest.mark.parametrize("command", ["train", "predict", "inspect"])
@pytest.mark.parametrize(("device", "message"), _ABSENT_DEVICES)
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(small_inputs, tmp_path, capsys, command, device, message):
    """The same command runs with --device cpu, so the device alone is what refuses it; nothing is written."""
    import shutil

    d, out = small_inputs, tmp_path / "out"
    argv = {
        "train": ["train", "--image", str(d / "img.tif"), "--labels", str(d / "painted.tif"),
                  "--out", str(out / "m.safetensors"), "--steps", "1", "--width", "4", "--depth", "2",
                  "--patch-size", "32", "--batch-size", "2"],
        "predict": ["predict", "--model", str(d / "m.safetensors"), "--image", str(d / "img.tif"),
                    "--out", str(out / "labels.tif")],
        "inspect": ["inspect", "--model", str(d / "m.safetensors"), "--image", str(d / "img.tif"), "--out", str(out)],
    }[command]
    assert main([*argv, "--device", "cpu"]) == 0
    assert out.is_dir() and any(out.iterdir())
    capsys.readouterr()
    shutil.rmtree(out)
    assert main([*argv, "--device", device]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"napari-selfreg {command}: error: {message}"]
    assert not out.exists()


def _z_stack(path):
    tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint8), imagej=True, metadata={"axes": "ZYX"})


def _eight_planes(path):  # planes filed as channels: the file's header lets them through
    tifffile.imwrite(path, np.zeros((8, 40, 48), np.uint8), photometric="minisblack", metadata={"axes": "CYX"})


def _two_rgb_planes(path):
    tifffile.imwrite(path, np.zeros((2, 40, 48, 3), np.uint8), photometric="rgb", metadata={"axes": "CYXS"})


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_z_stack, r"stack\.tif is a stack \(Z=3\), not one 2-D image"),  # from the file's header
        (_eight_planes, r"image of shape \(8, 40, 48\) looks like a 3-D stack; select one 2-D slice"),  # from the array
        (_two_rgb_planes, r"image has 4 dimensions \(2, 40, 48, 3\); .*split stacks and time series into 2-D slices"),
    ],
    ids=["z-stack", "eight-planes", "4-d"],
)
def test_predict_refuses_a_stack_in_one_line(small_inputs, tmp_path, capsys, write, message):
    import re

    write(tmp_path / "stack.tif")
    out = tmp_path / "labels.tif"
    rc = main(["predict", "--model", str(small_inputs / "m.safetensors"), "--image", str(tmp_path / "stack.tif"),
               "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and re.match(r"napari-selfreg predict: error: " + message, err[0]), err
    assert not out.exists()


def _sample_files():
    from napari_selfreg.sample_data import SAMPLE_DIR

    return SAMPLE_DIR / "he_tissue.png", SAMPLE_DIR / "he_strokes.png", SAMPLE_DIR / "he_ground_truth.png"


E2E_STEPS = 40


def test_train_predict_evaluate_on_the_shipped_sample(tmp_path, capsys):
    """train -> predict -> evaluate on the package's own sample (no data folder needed)."""
    import math

    from PIL import Image

    from napari_selfreg.core.checkpoint import load_model

    image, strokes, truth_path = _sample_files()
    model = tmp_path / "model.safetensors"
    assert main(["train", "--image", str(image), "--labels", str(strokes), "--out", str(model),
                 "--steps", str(E2E_STEPS), "--width", "8", "--patch-size", "64", "--batch-size", "4",
                 "--seed", "0", "--device", "cpu", "--precision", "float32", "--validate-every", "20",
                 "--class-names", "background,nucleus"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == str(model) and summary["steps"] == E2E_STEPS and not summary["stopped"]
    assert math.isfinite(summary["final_loss"]) and 0.0 <= summary["best_val_dice"] <= 1.0
    loaded = load_model(model)
    assert loaded.class_names == ["background", "nucleus"] and loaded.info.history[-1]["step"] == E2E_STEPS

    labels_path, probabilities_path = tmp_path / "labels.tif", tmp_path / "probabilities.tif"
    assert main(["predict", "--model", str(model), "--image", str(image), "--out", str(labels_path),
                 "--probabilities", str(probabilities_path), "--device", "cpu", "--precision", "float32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    labels = tifffile.imread(labels_path)
    with Image.open(truth_path) as opened:
        truth = np.array(opened)
    assert labels.shape == truth.shape == (256, 256) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {1, 2}  # painting ids, both classes found
    assert printed["pixels_per_label"] == {"1": int((labels == 1).sum()), "2": int((labels == 2).sum())}
    probabilities = tifffile.imread(probabilities_path)
    assert probabilities.shape == (2, 256, 256)
    np.testing.assert_array_equal(labels, probabilities.argmax(0) + 1)

    assert main(["evaluate", "--prediction", str(labels_path), "--mask", str(truth_path)]) == 0
    scores = json.loads(capsys.readouterr().out)["classes"]
    assert set(scores) == {"1", "2"}
    for c in (1, 2):
        predicted, true = labels == c, truth == c
        both = int((predicted & true).sum())
        assert scores[str(c)]["dice"] == pytest.approx(2 * both / (predicted.sum() + true.sum()), abs=1e-12)
        assert scores[str(c)]["iou"] == pytest.approx(both / (predicted | true).sum(), abs=1e-12)
    nuclei = int((truth == 2).sum())
    all_nucleus = 2 * nuclei / (nuclei + truth.size)  # the Dice of "everything is nucleus"
    assert scores["2"]["dice"] > 2 * all_nucleus


def test_the_seed_makes_a_cpu_training_run_repeatable(tmp_path, capsys):
    """Two CPU runs with one --seed write the same weights; another seed writes others."""
    from safetensors.torch import load_file

    from napari_selfreg.core.checkpoint import load_model

    image, strokes, _ = _sample_files()
    base = ["train", "--image", str(image), "--labels", str(strokes), "--steps", "3", "--width", "4", "--depth", "2",
            "--patch-size", "32", "--batch-size", "2", "--device", "cpu", "--precision", "float32"]
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main([*base, "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        path = tmp_path / f"{name}.safetensors"
        assert load_model(path).info.training["seed"] == seed
        runs.append((summary["final_loss"], load_file(path)))
    (loss_a, a), (loss_b, b), (loss_c, c) = runs
    assert a.keys() == b.keys() == c.keys() and len(a) > 10
    assert loss_a == loss_b and all(torch.equal(a[k], b[k]) for k in a)
    different = [k for k in a if not torch.equal(a[k], c[k])]
    assert loss_a != loss_c and any(k.endswith("weight") for k in different), different


def test_a_reader_that_leaves_the_pipe_ends_predict_quietly(tmp_path):
    """`predict ... | head -1`: the second image's line meets a closed pipe. That ends the run
    as a shell's SIGPIPE would, without a traceback."""
    from PIL import Image

    script = _console_script()
    assert script is not None
    model = _untrained_model(tmp_path / "m")
    rng = np.random.default_rng(0)
    images = []
    for name in ("a", "b", "c"):
        images.append(tmp_path / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images[-1])
    process = subprocess.Popen(
        [script, "predict", "--model", str(model), "--image", *map(str, images), "--out",
         str(tmp_path / "out" / "{stem}.tif"), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()  # as `head -1` does once it has its line
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141, err
    assert json.loads(first)["image"] == str(images[0])
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_a_prediction_and_mask_given_the_other_way_round_are_named(tmp_path, capsys):
    """A 0/255 mask given as --prediction against predict's labels given as --mask scored
    every class 0 (and a class '255'); a 0/255 prediction against a 0/255 mask still scores."""
    from PIL import Image

    truth = np.zeros((16, 16), np.uint8)
    truth[4:10, 4:10] = 255
    Image.fromarray(truth).save(tmp_path / "mask.png")
    Image.fromarray(np.where(truth > 0, 2, 1).astype(np.uint8)).save(tmp_path / "labels.png")
    swapped = ["--prediction", str(tmp_path / "mask.png"), "--mask", str(tmp_path / "labels.png")]
    assert main(["evaluate", *swapped]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mask.png holds 255" in err[0] and "other way round" in err[0]
    assert main(["evaluate", "--prediction", str(tmp_path / "labels.png"), "--mask", str(tmp_path / "mask.png")]) == 0
    assert json.loads(capsys.readouterr().out)["classes"]["2"]["dice"] == 1.0
    assert main(["evaluate", "--prediction", str(tmp_path / "mask.png"), "--mask", str(tmp_path / "mask.png")]) == 0
    assert json.loads(capsys.readouterr().out)["classes"]["2"]["dice"] == 1.0


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_train_saves_once_and_aborts_twice(small_inputs, tmp_path, capsys, monkeypatch, presses):
    """The README's promise: Ctrl-C stops after the current step and the model is saved; a
    second Ctrl-C aborts without writing it. The interrupts are real SIGINTs, sent once
    training has made two steps."""
    import os
    import signal

    import napari_selfreg.core.train as core_train
    from napari_selfreg.core.checkpoint import load_model

    real_train = core_train.train

    def interrupted(*args, **kwargs):
        run = real_train(*args, **kwargs)
        while True:
            try:
                report = next(run)
            except StopIteration as done:
                return done.value
            yield report
            if report.step == 2:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(core_train, "train", interrupted)
    image, strokes = small_inputs / "img.tif", small_inputs / "painted.tif"
    out = tmp_path / "m.safetensors"
    before = signal.getsignal(signal.SIGINT)
    rc = main(["train", "--image", str(image), "--labels", str(strokes), "--out", str(out), "--steps", "1000",
               "--width", "4", "--depth", "2", "--patch-size", "32", "--device", "cpu"])
    captured = capsys.readouterr()
    assert signal.getsignal(signal.SIGINT) is before  # the user's handler is back
    if presses == 1:
        assert rc == 0, captured.err
        result = json.loads(captured.out)
        assert result["stopped"] is True and result["steps"] == 2  # no step begins after the press
        assert load_model(out).config.base_channels == 4
    else:
        assert rc == 130 and "aborted" in captured.err and not out.exists()
