"""napari's reader and writer hooks: volumes keep their place, names and masks open as what
they are, several files stack, and a failed save says which file in one line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_selfreg.io import ImageFileError, napari_get_reader, read_image, write_image, write_labels

SPACING, ORIGIN = (0.5, 0.7, 2.5), (10.0, 20.0, 30.0)  # x, y, z: a CT volume's


def _read(path):
    return napari_get_reader(str(path))(str(path))


def _itk_volume(path, data, spacing=SPACING, origin=ORIGIN):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(data)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_a_simpleitk_volume_opens_with_its_z_spacing_and_origin(tmp_path, suffix):
    volume = np.random.default_rng(0).integers(0, 4, (6, 40, 50)).astype(np.uint8)
    _itk_volume(tmp_path / f"ct_seg{suffix}", volume)
    [(data, meta, kind)] = _read(tmp_path / f"ct_seg{suffix}")
    assert kind == "labels" and np.array_equal(data, volume)
    np.testing.assert_allclose(meta["scale"], (2.5, 0.7, 0.5), rtol=1e-6)  # z, y, x
    np.testing.assert_allclose(meta["translate"], (30.0, 20.0, 10.0))


def test_a_volume_three_voxels_wide_is_no_rgb_picture_and_a_colour_plane_is(tmp_path):
    import SimpleITK as sitk

    narrow = np.random.default_rng(0).integers(0, 4000, (6, 40, 3)).astype(np.uint16)
    _itk_volume(tmp_path / "ct.nrrd", narrow)
    [(data, meta, kind)] = _read(tmp_path / "ct.nrrd")
    assert kind == "image" and meta["rgb"] is False and data.shape == (6, 40, 3)
    np.testing.assert_allclose(meta["scale"], (2.5, 0.7, 0.5), rtol=1e-6)
    rgb = np.random.default_rng(1).integers(0, 255, (5, 6, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "photo.mha"))
    [(data, meta, kind)] = _read(tmp_path / "photo.mha")
    assert kind == "image" and meta["rgb"] is True and np.array_equal(data, rgb)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".tif"])
def test_a_labels_volume_is_saved_with_its_scale_and_translate_and_reopens_in_place(tmp_path, suffix):
    volume = np.random.default_rng(0).integers(0, 4, (6, 40, 3)).astype(np.uint8)  # 3 wide: no RGB either
    path = tmp_path / f"out{suffix}"
    attributes = {"scale": (2.5, 0.7, 0.5), "translate": (30.0, 20.0, 10.0)}
    assert write_labels(str(path), volume, attributes) == [str(path)]
    if suffix != ".tif":
        import SimpleITK as sitk

        written = sitk.ReadImage(str(path))
        assert written.GetSize() == (3, 40, 6) and written.GetNumberOfComponentsPerPixel() == 1
        np.testing.assert_allclose(written.GetSpacing(), SPACING, rtol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), ORIGIN)
    [(data, meta, _)] = _read(path)
    assert np.array_equal(data, volume)
    np.testing.assert_allclose(meta["scale"], (2.5, 0.7, 0.5), rtol=1e-6)
    np.testing.assert_allclose(meta["translate"], (30.0, 20.0, 10.0))


def test_a_labels_volume_keeps_its_images_plane_direction(tmp_path):
    import SimpleITK as sitk

    attributes = {"scale": (2.0, 1.0, 1.0), "metadata": {"napari_selfreg_direction": [-1.0, 0.0, 0.0, -1.0]}}
    write_labels(str(tmp_path / "l.nii.gz"), np.ones((2, 4, 5), np.uint8), attributes)
    written = sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    assert written.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert written.GetSpacing() == (1.0, 1.0, 2.0)
    [(_, meta, _)] = _read(tmp_path / "l.nii.gz")
    assert meta["metadata"]["napari_selfreg_direction"] == [-1.0, 0.0, 0.0, -1.0]


def test_a_labels_volume_is_no_colour_png(tmp_path):
    with pytest.raises(OSError, match=r"^v\.png: a 3-D array does not fit a PNG"):
        write_labels(str(tmp_path / "v.png"), np.ones((2, 4, 3), np.uint8), {})
    assert list(tmp_path.iterdir()) == []


def test_a_bool_mask_tiff_opens_as_uint8_labels(tmp_path):
    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    tifffile.imwrite(tmp_path / "nuclei_mask.tif", mask)
    [(data, meta, kind)] = _read(tmp_path / "nuclei_mask.tif")
    assert kind == "labels" and data.dtype == np.uint8 and np.array_equal(data, mask)
    assert meta["name"] == "nuclei_mask"


def test_a_failed_save_where_the_folder_is_a_file_is_one_line_naming_the_path_given(tmp_path, monkeypatch):
    (tmp_path / "notes").write_text("the user's notes")
    monkeypatch.chdir(tmp_path)
    for name in ("lab.tif", "lab.nii.gz"):
        with pytest.raises(OSError) as error:  # napari's writer hook
            write_labels(f"notes/{name}", np.ones((8, 8), np.uint8), {})
        assert type(error.value) is OSError
        assert str(error.value) == f"could not write notes/{name}: Not a directory (notes)"
    with pytest.raises(ImageFileError) as error:
        write_image(tmp_path / "notes" / "sub" / "p.tif", np.ones((8, 8), np.uint8))
    assert str(error.value).startswith(f"could not write {tmp_path / 'notes' / 'sub' / 'p.tif'}: Not a directory")
    assert (tmp_path / "notes").read_text() == "the user's notes"


def test_a_multiscale_labels_layer_is_saved_at_full_resolution(tmp_path):
    from napari.layers import Labels

    levels = [np.ones((64, 64), np.uint8), np.full((32, 32), 2, np.uint8)]
    levels[0][:8] = 3
    data, attributes, _ = Labels(levels, multiscale=True).as_layer_data_tuple()
    write_labels(str(tmp_path / "ms.tif"), data, attributes)
    assert np.array_equal(read_image(tmp_path / "ms.tif"), levels[0])
    write_labels(str(tmp_path / "list.tif"), levels, {})  # a plain list of levels too
    assert read_image(tmp_path / "list.tif").shape == (64, 64)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("run.2024.01.tif", "run.2024.01"), ("scan.v2.nii.gz", "scan.v2"), ("CT.Body.NII.GZ", "CT.Body"),
     ("a.b.TIFF", "a.b"), ("x.y.mha", "x.y"), ("x.y.nrrd", "x.y")],
)
def test_a_layer_is_named_after_its_file_without_only_the_suffix(tmp_path, name, expected):
    write_image(tmp_path / name, np.zeros((4, 5), np.uint16))
    [(_, meta, _)] = _read(tmp_path / name)
    assert meta["name"] == expected


@pytest.mark.parametrize(
    "name",
    ["x_mask", "labels", "nuclei-seg", "anno", "annotation", "segmentation", "x_labels_v2", "seg_mask",
     "tissue_mask", "slide_labels", "nuclei_mask_stack", "cells.masks", "Nuclei Mask", "mask2", "labelled_cells",
     "mask2d", "nucleiMask", "cellLabels3"],
)
def test_integer_files_named_with_a_labels_word_open_as_labels(tmp_path, name):
    tifffile.imwrite(tmp_path / f"{name}.tif", np.ones((8, 8), np.uint16))
    [(_, _, kind)] = _read(tmp_path / f"{name}.tif")
    assert kind == "labels"


@pytest.mark.parametrize(
    "name", ["unlabeled_raw", "unmasked", "presegmentation", "segue", "annotator_view", "masked_raw", "Unlabeled",
             "MoNuSeg_TCGA-2Z_gray", "GlaSAnnoView"]
)
def test_a_labels_word_inside_another_word_does_not_make_labels(tmp_path, name):
    tifffile.imwrite(tmp_path / f"{name}.tif", np.ones((8, 8), np.uint16))
    [(_, meta, kind)] = _read(tmp_path / f"{name}.tif")
    assert kind == "image" and meta["rgb"] is False


def test_several_paths_stack_into_one_layer_and_other_shapes_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    planes = [rng.integers(0, 4000, (32, 40)).astype(np.uint16) for _ in range(2)]
    paths = [str(tmp_path / "run.2024.01.tif"), str(tmp_path / "run.2024.02.tif")]
    for path, plane in zip(paths, planes, strict=True):
        write_image(path, plane, geometry=((0.5, 0.25), (10.0, 20.0), (1.0, 0.0, 0.0, 1.0)))
    [(data, meta, kind)] = napari_get_reader(paths)(paths)
    assert kind == "image" and meta["name"] == "run.2024.01" and not meta["rgb"]
    assert data.shape == (2, 32, 40) and data.dtype == np.uint16 and np.array_equal(data, np.stack(planes))
    assert meta["scale"] == (1.0, 0.25, 0.5) and meta["translate"] == (0.0, 20.0, 10.0)
    masks = [str(tmp_path / "a_mask.tif"), str(tmp_path / "b_mask.tif")]
    for path in masks:
        tifffile.imwrite(path, np.eye(32, 40, dtype=bool))
    [(data, _, kind)] = napari_get_reader(masks)(masks)
    assert kind == "labels" and data.shape == (2, 32, 40) and data.dtype == np.uint8
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((32, 32), np.uint16))
    odd = [paths[0], str(tmp_path / "small.tif")]
    with pytest.raises(ImageFileError) as error:
        napari_get_reader(odd)(odd)
    assert str(error.value) == "cannot stack small.tif on run.2024.01.tif: their shapes differ ((32, 32) and (32, 40))"
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((32, 40), np.float32))
    with pytest.raises(ImageFileError, match=r"^cannot stack float\.tif on run\.2024\.01\.tif: float32 and integer"):
        napari_get_reader([paths[0], str(tmp_path / "float.tif")])([paths[0], str(tmp_path / "float.tif")])
    assert napari_get_reader([paths[0], str(tmp_path / "a.png")]) is None  # a file that is not ours


def test_the_viewer_stacks_files_opened_with_stack_and_opens_them_one_by_one_without(make_napari_viewer, tmp_path):
    paths = [str(tmp_path / "run.2024.01.tif"), str(tmp_path / "run.2024.02.tif")]
    for i, path in enumerate(paths):
        tifffile.imwrite(path, np.full((32, 32), i, np.uint16))
    viewer = make_napari_viewer()
    [layer] = viewer.open(paths, stack=True, plugin="napari-selfreg")
    assert layer.name == "run.2024.01" and layer.data.shape == (2, 32, 32)
    assert np.array_equal(layer.data[1], np.ones((32, 32)))
    viewer.layers.clear()
    layers = viewer.open(paths, plugin="napari-selfreg")
    assert [(layer.name, layer.data.shape) for layer in layers] == [("run.2024.01", (32, 32)),
                                                                    ("run.2024.02", (32, 32))]


def test_the_viewer_saves_labels_as_mhd(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_labels(np.eye(8, dtype=np.uint8) * 2, name="lab", scale=(0.5, 0.25))
    path = str(tmp_path / "lab.mhd")
    assert viewer.layers.save(path, selected=False, plugin="napari-selfreg") == [path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.mhd", "lab.raw"]
    [(data, meta, kind)] = _read(path)
    assert kind == "labels" and np.array_equal(data, np.eye(8) * 2) and meta["scale"] == (0.5, 0.25)
