"""Format details of reading and writing: NIfTI's name lookup, MetaImage's header + data pair,
upper-case suffixes, planar TIFF samples, and the refusals of arrays a format cannot hold."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import tifffile

from napari_selfreg.io import (
    ImageFileError,
    _plane_geometry,
    check_planar,
    labels_note,
    open_image,
    read_image,
    write_image,
    write_labels,
)


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_nii_gz_is_read_and_not_the_nii_beside_it(tmp_path):
    """NIfTI's library, asked for X.nii.gz, reads X.nii where that file exists: pixels, class
    names, geometry and the stack check must all come from the file named."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.full((3, 4, 5), 7, np.uint8)), str(tmp_path / "pred.nii"))  # a stack
    write_image(tmp_path / "pred.nii.gz", np.full((4, 5), 3, np.uint8), class_names=["bg", "x"],
                geometry=((0.5, 0.25), (10.0, 20.0), (1.0, 0.0, 0.0, 1.0)))
    assert np.array_equal(read_image(tmp_path / "pred.nii.gz"), np.full((4, 5), 3))
    assert labels_note(tmp_path / "pred.nii.gz") == ["bg", "x"]
    spacing, origin, _ = _plane_geometry(tmp_path / "pred.nii.gz")
    assert tuple(spacing) == (0.5, 0.25) and tuple(origin) == (10.0, 20.0)
    check_planar(tmp_path / "pred.nii.gz")  # one plane, though pred.nii is a stack
    with pytest.raises(ImageFileError, match="stack"):
        check_planar(tmp_path / "pred.nii")
    # the reverse: a .nii beside a .nii.gz is itself
    write_image(tmp_path / "q.nii.gz", np.full((4, 5), 3, np.uint8))
    write_image(tmp_path / "q.nii", np.full((4, 5), 7, np.uint8))
    assert np.array_equal(read_image(tmp_path / "q.nii"), np.full((4, 5), 7))
    assert np.array_equal(read_image(tmp_path / "q.nii.gz"), np.full((4, 5), 3))


def test_without_symlinks_a_shadowed_nii_gz_is_copied_or_refused_by_name(tmp_path, monkeypatch):
    import shutil

    write_image(tmp_path / "a.nii", np.full((4, 5), 7, np.uint8))
    write_image(tmp_path / "a.nii.gz", np.full((4, 5), 3, np.uint8))

    def no_symlink(*args, **kwargs):
        raise OSError(1, "symbolic link privilege not held")

    monkeypatch.setattr(os, "symlink", no_symlink)
    assert np.array_equal(read_image(tmp_path / "a.nii.gz"), np.full((4, 5), 3))

    def no_copy(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_copy)
    with pytest.raises(ImageFileError, match=r"^could not read a\.nii\.gz: a\.nii lies beside it"):
        read_image(tmp_path / "a.nii.gz")
    assert np.array_equal(read_image(tmp_path / "a.nii"), np.full((4, 5), 7))  # nothing shadows a .nii


def test_evaluate_scores_the_nii_gz_named_not_an_older_nii(tmp_path, capsys):
    from napari_selfreg.cli import main

    truth = np.ones((20, 20), np.uint8)
    truth[5:15, 5:15] = 2
    write_image(tmp_path / "pred.nii", np.ones((20, 20), np.uint8))  # an earlier run's output
    write_image(tmp_path / "pred.nii.gz", truth)
    write_image(tmp_path / "mask.png", truth)
    capsys.readouterr()
    assert main(["evaluate", "--prediction", str(tmp_path / "pred.nii.gz"), "--mask", str(tmp_path / "mask.png")]) == 0
    assert json.loads(capsys.readouterr().out)["classes"]["2"]["dice"] == 1.0


def test_an_mhd_is_written_as_its_header_and_data_file_and_nothing_else(tmp_path, monkeypatch):
    import SimpleITK as sitk

    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_image(tmp_path / "labels.mhd", labels, class_names=["bg", "x"])
    assert _names(tmp_path) == ["labels.mhd", "labels.raw"]
    assert "ElementDataFile = labels.raw" in (tmp_path / "labels.mhd").read_text()
    assert np.array_equal(read_image(tmp_path / "labels.mhd"), labels)
    assert labels_note(tmp_path / "labels.mhd") == ["bg", "x"]
    write_image(tmp_path / "labels.mhd", np.full((3, 4), 7, np.uint8))  # overwritten: still the pair
    assert _names(tmp_path) == ["labels.mhd", "labels.raw"]
    assert np.array_equal(read_image(tmp_path / "labels.mhd"), np.full((3, 4), 7))
    # a header of an earlier version names a hidden data file: overwriting removes it
    legacy = (tmp_path / "labels.mhd").read_text().replace("labels.raw", ".labels.writing-123.raw")
    (tmp_path / "labels.mhd").write_text(legacy)
    os.replace(tmp_path / "labels.raw", tmp_path / ".labels.writing-123.raw")
    write_image(tmp_path / "labels.mhd", labels)
    assert _names(tmp_path) == ["labels.mhd", "labels.raw"]
    assert np.array_equal(read_image(tmp_path / "labels.mhd"), labels)

    def failing(image, path, *args, **kwargs):  # writes both files, then fails
        real(image, path)
        raise RuntimeError("ITK ERROR: MetaImageIO(0x1): File cannot be written\nReason: File too large")

    real = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", failing)
    with pytest.raises(ImageFileError) as error:
        write_image(tmp_path / "labels.mhd", np.zeros((3, 4), np.uint8))
    assert str(error.value) == f"could not write {tmp_path / 'labels.mhd'}: File too large"
    assert _names(tmp_path) == ["labels.mhd", "labels.raw"]
    assert np.array_equal(read_image(tmp_path / "labels.mhd"), labels)
    with pytest.raises(ImageFileError):
        write_image(tmp_path / "new.mhd", np.zeros((3, 4), np.uint8))
    assert _names(tmp_path) == ["labels.mhd", "labels.raw"]


def test_an_mhd_without_its_data_file_names_it(tmp_path):
    write_image(tmp_path / "scan.mhd", np.zeros((4, 5), np.uint8))
    (tmp_path / "scan.raw").unlink()
    with pytest.raises(ImageFileError, match=r"^could not read scan\.mhd: its data file scan\.raw is missing$"):
        read_image(tmp_path / "scan.mhd")


def test_a_short_mhd_write_on_a_full_disk_is_caught(tmp_path):
    pytest.importorskip("resource")  # POSIX
    import subprocess
    import sys

    script = """
import resource
import numpy as np
from napari_selfreg.io import ImageFileError, write_image
resource.setrlimit(resource.RLIMIT_FSIZE, (10240, resource.RLIM_INFINITY))
try:
    write_image("out.mhd", np.random.default_rng(0).integers(0, 255, (200, 200)).astype(np.uint8))
    print("written")
except ImageFileError as error:
    print(error)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("could not write out.mhd: ") and len(run.stdout.splitlines()) == 1
    assert _names(tmp_path) == []


@pytest.mark.parametrize("name", ["A.NII.GZ", "B.Nii.Gz", "C.MHA", "D.NRRD", "E.NII"])
def test_upper_and_mixed_case_suffixes_are_written_and_read_back(tmp_path, name):
    data = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    write_image(tmp_path / name, data, class_names=["bg", "x"])
    assert _names(tmp_path) == [name]
    assert np.array_equal(read_image(tmp_path / name, labels=True), data)
    assert labels_note(tmp_path / name) == ["bg", "x"]
    check_planar(tmp_path / name)


def test_an_upper_case_mhd_is_written_with_its_data_file_and_read_back(tmp_path):
    data = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    write_image(tmp_path / "G.MHD", data, class_names=["bg", "x"])
    assert _names(tmp_path) == ["G.MHD", "G.raw"]
    assert np.array_equal(read_image(tmp_path / "G.MHD"), data)
    assert labels_note(tmp_path / "G.MHD") == ["bg", "x"]
    (tmp_path / "J.MHA").write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageFileError, match=r"^could not read J\.MHA: not an image in the format its name says"):
        read_image(tmp_path / "J.MHA")


def test_a_gray_alpha_tiff_of_separate_planes_reads_like_one_of_interleaved_samples(tmp_path):
    la = np.random.default_rng(0).integers(0, 255, (16, 20, 2)).astype(np.uint8)
    expected = np.stack([la[..., 0]] * 3 + [la[..., 1]], axis=-1)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(la, -1, 0), photometric="minisblack",
                     extrasamples=["unassalpha"], planarconfig="separate")
    assert np.array_equal(read_image(tmp_path / "planar.tif"), expected)
    assert np.array_equal(np.asarray(open_image(tmp_path / "planar.tif", lazy_above=0)), expected)


def test_messages_name_the_users_file_not_the_temporary_one(tmp_path):
    with pytest.raises(OSError) as error:  # napari's writer hook
        write_labels(str(tmp_path / "my_labels.png"), np.zeros((5, 8, 9), np.int32), {})
    assert str(error.value) == "my_labels.png: a 3-D array does not fit a PNG; save it as TIFF or NIfTI"
    with pytest.raises(ImageFileError) as error:
        write_image(tmp_path / "scan.gif", np.zeros((4, 4), np.uint8))
    assert str(error.value).startswith("scan.gif: unsupported format")
    assert _names(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "data", "hint"),
    [
        ("u16rgb.png", np.full((4, 5, 3), 1000, np.uint16), "8-bit colour only"),
        ("i32rgb.png", np.full((4, 5, 3), 1000, np.int32), "8-bit colour only"),
        ("f32rgb.png", np.zeros((4, 5, 3), np.float32), "no floating-point pixels; save them as TIFF"),
        ("f32.png", np.zeros((4, 5), np.float32), "no floating-point pixels; save them as TIFF"),
        ("f32.bmp", np.zeros((4, 5), np.float64), "no floating-point pixels"),
        ("u16.bmp", np.full((4, 5), 1000, np.uint16), "BMP holds 8-bit pixels"),
        ("mask.jpg", np.eye(4, 5, dtype=bool), "JPEG is lossy and would change mask values"),
        ("rgba.jpg", np.zeros((4, 5, 4), np.uint8), "JPEG holds no alpha"),
    ],
)
def test_arrays_pillow_cannot_write_are_refused_in_one_line(tmp_path, name, data, hint):
    with pytest.raises(ImageFileError) as error:
        write_image(tmp_path / name, data)
    message = str(error.value)
    assert message.startswith(f"{name}: ") and hint in message and "\n" not in message
    assert _names(tmp_path) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".mhd", ".tif", ".png"])
@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f4"])
def test_big_endian_arrays_are_written(tmp_path, suffix, dtype):
    data = np.array([[1, 2], [300, 4]]).astype(dtype)
    if suffix == ".png" and dtype == ">f4":
        pytest.skip("PNG holds no floats")
    write_image(tmp_path / f"x{suffix}", data)
    back = read_image(tmp_path / f"x{suffix}")
    assert np.array_equal(back, data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_an_rgb_picture_is_one_plane_of_colour_pixels_in_simpleitk_formats(tmp_path, suffix):
    import SimpleITK as sitk

    rgb = np.random.default_rng(1).integers(0, 255, (5, 6, 3)).astype(np.uint8)
    write_image(tmp_path / f"rgb{suffix}", rgb)
    image = sitk.ReadImage(str(tmp_path / f"rgb{suffix}"))
    assert image.GetSize() == (6, 5) and image.GetNumberOfComponentsPerPixel() == 3
    assert np.array_equal(read_image(tmp_path / f"rgb{suffix}"), rgb)
    check_planar(tmp_path / f"rgb{suffix}")  # not a stack of 5 planes
    planes = np.zeros((3, 5, 3), np.float32)  # (K, H, W) probabilities stay planes
    write_image(tmp_path / f"p{suffix}", planes, planes=True)
    assert sitk.ReadImage(str(tmp_path / f"p{suffix}")).GetSize() == (3, 5, 3)


def test_labels_like_a_single_slice_volume_keep_its_z(tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.zeros((1, 6, 8), np.uint8))  # one slice exported from a CT volume
    image.SetOrigin((10.0, 20.0, 42.0))
    image.SetSpacing((0.5, 0.5, 2.0))
    sitk.WriteImage(image, str(tmp_path / "slice.nii.gz"))
    labels = np.ones((6, 8), np.uint8)
    write_image(tmp_path / "labels.nii.gz", labels, like=tmp_path / "slice.nii.gz", class_names=["bg", "x"])
    written = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert written.GetOrigin() == (10.0, 20.0, 42.0) and written.GetSpacing() == (0.5, 0.5, 2.0)
    assert np.array_equal(read_image(tmp_path / "labels.nii.gz"), labels)
    assert labels_note(tmp_path / "labels.nii.gz") == ["bg", "x"]


@pytest.mark.parametrize("suffix", [".tif", ".png", ".nii.gz", ".mhd"])
def test_a_file_written_over_keeps_its_permissions(tmp_path, suffix):
    """A labels file a lab keeps group-writable (0664) stays so when it is saved again; it
    took the umask's mode of the temporary copy (0644). A new file still follows the umask."""
    path = tmp_path / f"labels{suffix}"
    write_image(path, np.ones((6, 7), np.uint8))
    os.chmod(path, 0o664)
    write_image(path, np.full((6, 7), 2, np.uint8))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o664
    assert np.array_equal(read_image(path), np.full((6, 7), 2, np.uint8))
    fresh = tmp_path / f"fresh{suffix}"
    write_image(fresh, np.ones((6, 7), np.uint8))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o666 & ~umask


def test_a_model_written_over_keeps_its_permissions(tmp_path):
    from napari_selfreg.core.checkpoint import load_model, save_model
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    model = SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2)))
    path = save_model(model, tmp_path / "m.safetensors")
    os.chmod(path, 0o640)
    save_model(model, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and load_model(path).config.base_channels == 4
