"""Readers and writers behind the manifest: round trips through every format."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_selfreg.io import (
    ImageFileError,
    labels_note,
    napari_get_reader,
    open_image,
    read_image,
    write_image,
    write_labels,
)


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4, size=(40, 50)).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".tif", ".tiff", ".png", ".nii", ".nii.gz", ".mha", ".nrrd"])
def test_labels_round_trip(tmp_path, labels, suffix):
    path = tmp_path / f"labels{suffix}"
    written = write_labels(str(path), labels, {})
    assert written == [str(path)]
    back = read_image(path)
    assert back.shape == labels.shape and np.array_equal(back, labels)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_large_label_ids_survive_tiff_and_nifti(tmp_path, dtype):
    data = (np.arange(30 * 20).reshape(30, 20) * 7).astype(dtype)
    for name in ("a.tif", "a.nii.gz"):
        write_image(tmp_path / name, data)
        assert np.array_equal(read_image(tmp_path / name), data)


def test_png_keeps_ids_up_to_65535_and_refuses_more(tmp_path):
    data = np.array([[0, 1, 300, 65535]], np.int64)
    write_image(tmp_path / "a.png", data)
    assert np.array_equal(read_image(tmp_path / "a.png"), data)
    with pytest.raises(ImageFileError, match="TIFF"):
        write_image(tmp_path / "b.png", np.array([[70000]], np.int64))


@pytest.mark.parametrize("channels", [3, 4])
def test_a_16_bit_colour_png_keeps_its_16_bits(tmp_path, channels):
    """Pillow cuts 16-bit RGB(A) PNGs to their high byte: a 12-bit image would become 16 gray levels."""
    import SimpleITK as sitk

    data = np.random.default_rng(0).integers(0, 4096, (20, 30, channels)).astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(data, isVector=True), str(tmp_path / "deep.png"))
    back = read_image(tmp_path / "deep.png")
    assert back.dtype == np.uint16 and np.array_equal(back, data)
    assert np.array_equal(open_image(tmp_path / "deep.png"), data)
    # 8-bit colour PNGs still go through Pillow, palettes included
    write_image(tmp_path / "plain.png", (data >> 4).astype(np.uint8))
    assert np.array_equal(read_image(tmp_path / "plain.png"), (data >> 4).astype(np.uint8))


def test_jpeg_refuses_labels(tmp_path, labels):
    with pytest.raises(ImageFileError, match="lossy"):
        write_image(tmp_path / "a.jpg", labels)


@pytest.mark.parametrize(
    ("shape", "axes", "expected"),
    [
        ((3, 32, 40), "CYX", (32, 40, 3)),  # channel-first RGB moves last
        ((1, 1, 32, 40), "TZYX", (32, 40)),  # singleton axes dropped
        ((5, 32, 40), "ZYX", (5, 32, 40)),  # a real stack keeps its axis
        ((32, 40, 3), "YXS", (32, 40, 3)),
    ],
)
def test_tiff_axes(tmp_path, shape, axes, expected):
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, data, metadata={"axes": axes}, photometric="minisblack" if "S" not in axes else "rgb")
    back = read_image(path)
    assert back.shape == expected
    if axes == "CYX":
        assert np.array_equal(back, np.moveaxis(data, 0, -1))
    lazy = open_image(path, lazy_above=0)  # the same axes rules on the lazy path
    assert not isinstance(lazy, np.ndarray)
    assert np.array_equal(np.asarray(lazy), back)


def test_open_image_reads_a_large_tiff_only_where_asked(tmp_path):
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, size=(1024, 768, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, data, tile=(256, 256), photometric="rgb")
    assert isinstance(open_image(path), np.ndarray)  # small files are read whole, as before
    lazy = open_image(path, lazy_above=1000)
    assert not isinstance(lazy, np.ndarray) and lazy.shape == data.shape
    assert lazy.chunksize[:2] == (256, 256)  # the file's own tiles
    assert np.array_equal(np.asarray(lazy[300:420, 500:700]), data[300:420, 500:700])
    assert isinstance(open_image(path, lazy_above=data.shape[0] * data.shape[1]), np.ndarray)  # at the limit: whole


def test_a_zarr_that_cannot_read_the_tiff_lazily_falls_back_to_a_whole_read(tmp_path, monkeypatch):
    """zarr 2 beside a tifffile that needs zarr 3 (or the reverse) used to make every large
    TIFF unreadable; the file is read whole instead, with a warning that says what to install."""
    zarr = pytest.importorskip("zarr")
    pytest.importorskip("dask")
    data = np.random.default_rng(1).integers(0, 255, size=(300, 200, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, data, tile=(64, 64), photometric="rgb")

    def mismatched(*args, **kwargs):
        raise TypeError("Unsupported type for store_like: 'ZarrTiffStore'")

    monkeypatch.setattr(zarr, "open", mismatched)
    with pytest.warns(UserWarning, match="could not be opened lazily.*zarr>=3"):
        whole = open_image(path, lazy_above=1000)
    assert isinstance(whole, np.ndarray) and np.array_equal(whole, data)


def test_reader_hook(tmp_path, labels):
    assert napari_get_reader(str(tmp_path / "a.png")) is None  # napari's own reader handles PNG
    assert napari_get_reader([]) is None
    image = np.zeros((20, 30, 3), np.uint8)
    write_image(tmp_path / "tissue.tif", image)
    write_image(tmp_path / "tissue_mask.nii.gz", labels)
    reader = napari_get_reader(str(tmp_path / "tissue.tif"))
    ((data, meta, kind),) = reader(str(tmp_path / "tissue.tif"))
    assert kind == "image" and meta["rgb"] and data.shape == (20, 30, 3)
    reader = napari_get_reader([str(tmp_path / "tissue_mask.nii.gz")])
    ((data, meta, kind),) = reader([str(tmp_path / "tissue_mask.nii.gz")])
    assert kind == "labels" and meta["name"] == "tissue_mask" and np.array_equal(data, labels)


def test_reader_hook_opens_large_tiff_images_lazily_and_labels_whole(tmp_path, monkeypatch):
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    import napari_selfreg.io as io

    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)  # a "slide" of 512 x 384 pixels
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, size=(512, 384, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, size=(512, 384), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", image, tile=(128, 128), photometric="rgb")
    tifffile.imwrite(tmp_path / "slide_labels.tif", labels, tile=(128, 128))
    ((data, meta, kind),) = napari_get_reader(str(tmp_path / "slide.tif"))(str(tmp_path / "slide.tif"))
    assert kind == "image" and meta["rgb"] and not isinstance(data, np.ndarray)
    assert data.chunksize[:2] == (128, 128) and np.array_equal(np.asarray(data[100:300, 50:90]), image[100:300, 50:90])
    ((data, meta, kind),) = napari_get_reader(str(tmp_path / "slide_labels.tif"))(str(tmp_path / "slide_labels.tif"))
    assert kind == "labels" and isinstance(data, np.ndarray) and np.array_equal(data, labels)  # paintable


def test_reader_hook_opens_a_large_pyramidal_tiff_as_a_multiscale_image(tmp_path, monkeypatch):
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    import napari_selfreg.io as io

    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)
    image = np.random.default_rng(2).integers(0, 255, size=(512, 384, 3), dtype=np.uint8)
    levels = [image, image[::2, ::2], image[::4, ::4]]
    path = str(tmp_path / "pyramid.tif")
    with tifffile.TiffWriter(path) as tif:  # the layout of whole-slide exports: overviews in sub-IFDs
        tif.write(levels[0], subifds=2, tile=(128, 128), photometric="rgb")
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(64, 64), photometric="rgb")
    ((data, meta, kind),) = napari_get_reader(path)(path)
    assert kind == "image" and meta["rgb"] and meta["multiscale"]
    assert [d.shape for d in data] == [level.shape for level in levels]
    assert all(np.array_equal(np.asarray(d), level) for d, level in zip(data, levels, strict=True))
    assert np.array_equal(np.asarray(io.open_image(path)), image)  # the command line predicts level 0
    (small,) = io.open_levels(path, lazy_above=10**9)  # below the threshold: one plain array
    assert isinstance(small, np.ndarray) and np.array_equal(small, image)


def test_unreadable_files_raise_image_file_error(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    with pytest.raises(ImageFileError, match=r"broken\.tif"):
        read_image(bad)
    with pytest.raises(ImageFileError, match="does not exist"):
        read_image(tmp_path / "missing.nii.gz")
    with pytest.raises(ImageFileError, match="unsupported"):
        write_image(tmp_path / "a.xyz", np.zeros((2, 2), np.uint8))


def test_npe2_reads_and_writes_through_the_plugin(tmp_path, labels):
    npe2 = pytest.importorskip("npe2")
    npe2.PluginManager.instance().discover(include_npe1=False)
    write_image(tmp_path / "cells.tif", labels)
    layers = npe2.read([str(tmp_path / "cells.tif")], plugin_name="napari-selfreg", stack=False)
    assert np.array_equal(layers[0][0], labels)
    out = npe2.write(
        str(tmp_path / "out.nii.gz"), [(labels, {"name": "x"}, "labels")], plugin_name="napari-selfreg"
    )
    assert np.array_equal(read_image(out[0]), labels)


@pytest.mark.gui
def test_viewer_opens_and_saves_with_the_plugin(make_napari_viewer, tmp_path, labels):
    write_image(tmp_path / "seg_mask.tif", labels)
    viewer = make_napari_viewer()
    viewer.open(str(tmp_path / "seg_mask.tif"), plugin="napari-selfreg")
    layer = viewer.layers["seg_mask"]
    assert layer.__class__.__name__ == "Labels"
    written = viewer.layers.save(str(tmp_path / "saved.png"), selected=False, plugin="napari-selfreg")
    assert np.array_equal(read_image(written[0]), labels)


@pytest.mark.gui
@pytest.mark.parametrize("suffix", [".tif", ".nii.gz", ".mha"])
def test_a_saved_labels_layer_reopens_as_labels_with_its_classes_and_place(make_napari_viewer, tmp_path, suffix):
    """Whatever its name: the file says it holds labels, and which classes."""
    from napari_selfreg.widgets.classes import class_features, class_names_of

    viewer = make_napari_viewer()
    data = np.zeros((30, 40), np.uint8)
    data[5:10, 5:30], data[20:25, 10:20] = 1, 3
    viewer.add_labels(data, name="strokes", features=class_features(["stroma", "gland", "lumen"]),
                      scale=(0.5, 0.25), translate=(20.0, 10.0))
    path = str(tmp_path / f"strokes{suffix}")
    assert viewer.layers.save(path, selected=False, plugin="napari-selfreg") == [path]
    [layer] = viewer.open(path, plugin="napari-selfreg")
    assert layer.__class__.__name__ == "Labels" and np.array_equal(layer.data, data)
    assert class_names_of(layer) == ["stroma", "gland", "lumen"]
    np.testing.assert_allclose(layer.scale, (0.5, 0.25))
    np.testing.assert_allclose(layer.translate, (20.0, 10.0))


@pytest.mark.gui
def test_the_writers_refusals_reach_the_user(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_labels(np.full((4, 4), 70000, np.int64), name="many")
    with pytest.raises(OSError, match="do not fit a PNG"):
        viewer.layers.save(str(tmp_path / "many.png"), selected=False, plugin="napari-selfreg")
    with pytest.raises(ImageFileError, match="3-D array does not fit a PNG"):
        write_image(tmp_path / "volume.png", np.zeros((2, 4, 5), np.uint8))
    # class names reach MHA and NRRD headers too (the CLI writes those)
    for suffix in (".mha", ".nrrd"):
        write_image(tmp_path / f"l{suffix}", np.ones((4, 4), np.uint8), class_names=["bg", "gland"])
        assert labels_note(tmp_path / f"l{suffix}") == ["bg", "gland"]


def test_the_reader_keeps_two_channels_first_and_an_rgb_picture_named_mask_an_image(tmp_path):
    two = np.zeros((2, 16, 20), np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", two, metadata={"axes": "CYX"}, photometric="minisblack")
    assert read_image(tmp_path / "two.tif").shape == (2, 16, 20)  # not (16, 20, 2), drawn sideways
    tifffile.imwrite(tmp_path / "masked tissue.tif", np.zeros((16, 20, 3), np.uint8))
    [(_, meta, kind)] = napari_get_reader(str(tmp_path / "masked tissue.tif"))(str(tmp_path / "masked tissue.tif"))
    assert kind == "image" and meta["rgb"]


def test_a_simpleitk_output_keeps_the_images_spacing_and_origin(tmp_path):
    import SimpleITK as sitk

    from napari_selfreg.io import write_image

    source = sitk.GetImageFromArray(np.zeros((20, 30), np.uint8))
    source.SetSpacing((0.25, 0.5))
    source.SetOrigin((10.0, 20.0))
    sitk.WriteImage(source, str(tmp_path / "image.nii.gz"))
    write_image(tmp_path / "labels.nii.gz", np.ones((20, 30), np.uint8), like=tmp_path / "image.nii.gz")
    written = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert written.GetSpacing() == (0.25, 0.5) and written.GetOrigin() == (10.0, 20.0)
    write_image(tmp_path / "plain.nii.gz", np.ones((20, 30), np.uint8), like=tmp_path / "nothing.png")
    assert sitk.ReadImage(str(tmp_path / "plain.nii.gz")).GetSpacing() == (1.0, 1.0)
    # (K, H, W) probabilities: the plane's geometry, one unit per class
    write_image(tmp_path / "p.nii.gz", np.zeros((2, 20, 30), np.float32), like=tmp_path / "image.nii.gz")
    probabilities = sitk.ReadImage(str(tmp_path / "p.nii.gz"))
    assert probabilities.GetSize() == (30, 20, 2)
    assert probabilities.GetSpacing() == (0.25, 0.5, 1.0) and probabilities.GetOrigin() == (10.0, 20.0, 0.0)


def _png(path, array: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = array.shape[:2]
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_a_16_bit_gray_alpha_png_still_opens_and_an_integer_stack_named_mask_is_labels(tmp_path):
    _png(tmp_path / "la16.png", np.full((6, 8, 2), 40000, np.uint16), colour_type=4)
    assert read_image(tmp_path / "la16.png").shape == (6, 8, 4)  # Pillow's 8 bits, as before
    _png(tmp_path / "rgb16.png", np.full((6, 8, 3), 40000, np.uint16), colour_type=2)
    assert (read_image(tmp_path / "rgb16.png") == 40000).all()
    tifffile.imwrite(tmp_path / "nuclei_mask_stack.tif", np.zeros((5, 16, 20), np.uint16))
    [(_, _, kind)] = napari_get_reader(str(tmp_path / "nuclei_mask_stack.tif"))(str(tmp_path / "nuclei_mask_stack.tif"))
    assert kind == "labels"


@pytest.mark.gui
@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_labels_painted_on_an_image_with_a_direction_overlay_it_in_other_viewers(make_napari_viewer, tmp_path, suffix):
    """A NIfTI read by ITK usually has direction diag(-1, -1): labels made on it in napari and
    saved must carry the same direction and origin, or ITK-SNAP / 3D Slicer place them mirrored."""
    import SimpleITK as sitk

    from napari_selfreg.widgets._common import placement

    source = sitk.GetImageFromArray(np.zeros((20, 30), np.uint8))
    source.SetSpacing((0.5, 0.25))
    source.SetOrigin((15.0, -4.0))
    source.SetDirection((-1.0, 0.0, 0.0, -1.0))
    sitk.WriteImage(source, str(tmp_path / "image.nii.gz"))
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "image.nii.gz"), plugin="napari-selfreg")
    labels = viewer.add_labels(np.ones((20, 30), np.uint8), name="strokes", **placement(image))
    path = str(tmp_path / f"strokes{suffix}")
    viewer.layers.selection = {labels}
    assert viewer.layers.save(path, selected=True, plugin="napari-selfreg") == [path]
    if suffix != ".tif":
        written = sitk.ReadImage(path)
        for index in ((0, 0), (7, 3), (29, 19)):  # the same pixel lies at the same physical point
            expected = source.TransformIndexToPhysicalPoint(index)
            assert written.TransformIndexToPhysicalPoint(index) == pytest.approx(expected)
    [reopened] = viewer.open(path, plugin="napari-selfreg")
    np.testing.assert_allclose(reopened.scale, image.scale)
    np.testing.assert_allclose(reopened.translate, image.translate)
    assert reopened.metadata["napari_selfreg_direction"] == [-1.0, 0.0, 0.0, -1.0]


def test_probabilities_of_three_classes_and_instances_reopen_as_what_they_are(tmp_path):
    """(3, H, W) probabilities are three planes, not a channel-first RGB picture; instance ids
    written by predict reopen as labels whatever the file is called."""
    probabilities = np.random.default_rng(0).random((3, 12, 16)).astype(np.float32)
    write_image(tmp_path / "p.tif", probabilities)
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), probabilities)
    [(data, meta, kind)] = napari_get_reader(str(tmp_path / "p.tif"))(str(tmp_path / "p.tif"))
    assert kind == "image" and not meta["rgb"] and data.shape == (3, 12, 16)
    instances = np.arange(12 * 16, dtype=np.int32).reshape(12, 16)
    write_image(tmp_path / "crop_inst.tif", instances, class_names=[])
    [(data, _, kind)] = napari_get_reader(str(tmp_path / "crop_inst.tif"))(str(tmp_path / "crop_inst.tif"))
    assert kind == "labels" and np.array_equal(data, instances)


def test_class_names_too_long_for_nifti_are_a_warning_and_the_ids_are_kept(tmp_path):
    names = ["background", "epithelial nucleus", "lymphocyte", "stroma cell"]
    with pytest.warns(UserWarning, match="room for about 55 characters of class names"):
        write_image(tmp_path / "l.nii.gz", np.full((4, 4), 3, np.uint8), class_names=names)
    assert labels_note(tmp_path / "l.nii.gz") == [] and (read_image(tmp_path / "l.nii.gz") == 3).all()
    write_image(tmp_path / "l.mha", np.full((4, 4), 3, np.uint8), class_names=names)
    assert labels_note(tmp_path / "l.mha") == names


def test_probabilities_keep_their_place_and_a_narrow_image_stays_planes(tmp_path):
    """(K, H, W) probabilities written like a placed image open in the same place, their
    class axis unscaled; an image 3 pixels wide does not turn its planes into an RGB picture."""
    import SimpleITK as sitk

    source = sitk.GetImageFromArray(np.zeros((12, 16), np.uint8))
    source.SetSpacing((0.25, 0.5))
    source.SetOrigin((10.0, 20.0))
    sitk.WriteImage(source, str(tmp_path / "image.nii.gz"))
    for suffix in (".tif", ".mha"):
        path = tmp_path / f"p{suffix}"
        write_image(path, np.zeros((3, 12, 16), np.float32), like=tmp_path / "image.nii.gz", planes=True)
        [(data, meta, kind)] = napari_get_reader(str(path))(str(path))
        assert data.shape == (3, 12, 16) and kind == "image" and not meta["rgb"]
        np.testing.assert_allclose(meta["scale"], (1.0, 0.5, 0.25))
        np.testing.assert_allclose(meta["translate"], (0.0, 20.0, 10.0))
    narrow = np.random.default_rng(0).random((2, 40, 3)).astype(np.float32)
    write_image(tmp_path / "narrow.tif", narrow, planes=True)
    np.testing.assert_array_equal(read_image(tmp_path / "narrow.tif"), narrow)
    [(data, meta, _)] = napari_get_reader(str(tmp_path / "narrow.tif"))(str(tmp_path / "narrow.tif"))
    assert data.shape == (2, 40, 3) and not meta["rgb"]


# ------------------------------------------------------------------ findings of the I/O audit


@pytest.mark.parametrize("compression", ["lzw", "jpeg"])
def test_lzw_and_jpeg_compressed_tiffs_open_eagerly_and_lazily(tmp_path, compression):
    """The usual compression of image editors, bfconvert and slide scanners (imagecodecs decodes it)."""
    pytest.importorskip("zarr")
    pytest.importorskip("dask")
    yy, xx = np.mgrid[:64, :96]
    data = np.stack([yy * 3, xx * 2, yy + xx], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it close
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="rgb", compression=compression, tile=(32, 32))
    back, lazy = read_image(tmp_path / "c.tif"), np.asarray(open_image(tmp_path / "c.tif", lazy_above=100))
    assert back.shape == data.shape and np.array_equal(lazy, back)
    if compression == "lzw":
        assert np.array_equal(back, data)
    else:
        assert np.abs(back.astype(int) - data).mean() < 3


def test_a_cut_slide_is_refused_when_opened_not_when_a_missing_tile_is_drawn(tmp_path, monkeypatch):
    """Read lazily, a TIFF cut short by an interrupted copy opened fine and failed later, with a
    codec's error (DeflateError) when napari drew or predict reached a tile past the end."""
    pytest.importorskip("dask")
    import napari_selfreg.io as io

    data = np.random.default_rng(5).integers(0, 255, size=(512, 512, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, data, tile=(128, 128), photometric="rgb", compression="zlib")
    assert np.array_equal(np.asarray(open_image(path, lazy_above=1000)), data)  # whole, it opens lazily
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(ImageFileError, match=r"slide\.tif is cut short: \d+ of its 16 tiles"):
        open_image(path, lazy_above=1000)
    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)
    with pytest.raises(ImageFileError, match="is cut short"):
        napari_get_reader(str(path))(str(path))


def test_a_pyramid_cut_in_its_overviews_is_refused_by_the_viewer_that_shows_them(tmp_path, monkeypatch):
    pytest.importorskip("dask")
    import napari_selfreg.io as io

    image = np.random.default_rng(6).integers(0, 255, size=(512, 384, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=1, tile=(128, 128), photometric="rgb", compression="zlib")
        tif.write(image[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        overview = tif.series[0].levels[1].pages[0]
        cut = overview.dataoffsets[-1] + 10  # into the overview's last tile, after every full-size tile
        assert cut > max(np.add(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    with open(path, "r+b") as handle:
        handle.truncate(cut)
    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)
    with pytest.raises(ImageFileError, match="1 of its 24 tiles"):  # 12 full-size tiles, 12 overview tiles
        napari_get_reader(str(path))(str(path))
    assert np.array_equal(np.asarray(io.open_image(path)), image)  # predict reads level 0 alone: it is whole


def test_a_missing_codec_on_the_lazy_path_is_not_blamed_on_the_file():
    from napari_selfreg.core.data import InputError
    from napari_selfreg.core.predict import _TileReader

    class Slide:  # a lazily read slide whose tiles need a codec tifffile lacks
        shape, dtype = (64, 64, 3), np.dtype(np.uint8)

        def __getitem__(self, index):
            raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    with pytest.raises(InputError, match="install imagecodecs") as error:
        _TileReader(Slide()).read(slice(0, 32), slice(0, 32))
    assert "damaged" not in str(error.value)


def _failing_tifffile_write(monkeypatch):
    """tifffile.imwrite that runs out of disk half way through the file."""
    import errno

    def imwrite(path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"II*\0" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", imwrite)


def test_a_failed_write_is_one_image_file_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import SimpleITK as sitk

    _failing_tifffile_write(monkeypatch)
    with pytest.raises(ImageFileError) as error:
        write_image(tmp_path / "out.tif", np.ones((8, 8), np.uint8))
    assert str(error.value) == f"could not write {tmp_path / 'out.tif'}: No space left on device"  # as given
    assert not (tmp_path / "out.tif").exists()
    existing = tmp_path / "kept.tif"
    existing.write_bytes(b"the user's file")  # not ours: never removed, nor half overwritten
    with pytest.raises(ImageFileError):
        write_image(existing, np.ones((8, 8), np.uint8))
    assert existing.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.tif"]  # no partial file beside it

    def itk_write(image, path, *args):
        open(path, "wb").close()
        raise RuntimeError(
            "Exception thrown in SimpleITK ImageFileWriter_Execute: /src/ITK/Modules/IO/Meta/src/itkMetaImageIO.cxx:"
            "1131:\nITK ERROR: MetaImageIO(0x55d0): File cannot be written: out.mha\nReason: File too large"
        )

    monkeypatch.setattr(sitk, "WriteImage", itk_write)
    with pytest.raises(ImageFileError) as error:
        write_image(tmp_path / "out.mha", np.ones((8, 8), np.uint8))
    assert str(error.value) == f"could not write {tmp_path / 'out.mha'}: File too large"
    assert not (tmp_path / "out.mha").exists()
    with pytest.raises(OSError, match="File too large"):  # napari's writer hook
        write_labels(str(tmp_path / "l.mha"), np.ones((8, 8), np.uint8), {})


def test_an_interrupted_write_leaves_the_earlier_file_whole(tmp_path, monkeypatch):
    """Ctrl-C while a large output is written: the file keeps its earlier content, and an
    overwrite that completes leaves nothing else beside it."""
    import tifffile

    target = tmp_path / "labels.tif"
    write_image(target, np.full((8, 8), 2, np.uint8))
    real = tifffile.imwrite

    def interrupted(path, *args, **kwargs):
        real(path, *args, **kwargs)
        with open(path, "r+b") as handle:
            handle.truncate(20)
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(target, np.full((8, 8), 3, np.uint8))
    np.testing.assert_array_equal(read_image(target), 2)
    monkeypatch.setattr(tifffile, "imwrite", real)
    write_image(target, np.full((8, 8), 3, np.uint8))
    np.testing.assert_array_equal(read_image(target), 3)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]


def test_a_short_write_on_a_full_disk_is_caught_in_every_format(tmp_path):
    """SimpleITK's NIfTI, MHA and NRRD writers and Pillow's JPEG and BMP encoders report no short
    write; the file size limit (RLIMIT_FSIZE) makes every write past 10 kB fail, as a full disk would."""
    pytest.importorskip("resource")  # POSIX
    script = """
import json, resource, sys
import numpy as np
from napari_selfreg.io import ImageFileError, write_image
resource.setrlimit(resource.RLIMIT_FSIZE, (10240, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
found = {}
for suffix in sys.argv[1:]:
    data = rng.integers(0, 255, (200, 200, 3) if suffix == ".jpg" else (200, 200)).astype(np.uint8)
    try:
        write_image("out" + suffix, data)
        found[suffix] = "written"
    except ImageFileError as error:
        found[suffix] = str(error)
print(json.dumps(found))
"""
    import json
    import subprocess
    import sys

    suffixes = [".tif", ".png", ".jpg", ".bmp", ".nii", ".nii.gz", ".mha", ".nrrd"]
    run = subprocess.run([sys.executable, "-c", script, *suffixes], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    for suffix in suffixes:
        message = found[suffix]
        assert message.startswith(f"could not write out{suffix}: ") and "\n" not in message and ".cxx" not in message
        assert not (tmp_path / f"out{suffix}").exists()


def test_predict_reports_an_output_it_cannot_write_in_one_line(tmp_path, capsys, monkeypatch):
    import os
    import stat

    from napari_selfreg.cli import main
    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelConfig, ModelInfo
    from napari_selfreg.core.model import SegmentationModel

    model = save_model(SegmentationModel.create(ModelInfo(model=ModelConfig(base_channels=4, depth=2))), tmp_path / "m")
    write_image(tmp_path / "img.png", np.random.default_rng(0).integers(0, 255, (40, 48, 3)).astype(np.uint8))
    argv = ["predict", "--model", str(model), "--image", str(tmp_path / "img.png"), "--device", "cpu", "--out"]
    full = "/dev/full"
    if os.path.exists(full) and stat.S_ISCHR(os.stat(full).st_mode):  # a real full disk, where there is one
        os.symlink(full, tmp_path / "full.tif")
        assert main([*argv, str(tmp_path / "full.tif")]) == 2
        err = capsys.readouterr().err
        assert f"could not write {tmp_path / 'full.tif'}: No space left on device" in err
        assert len(err.strip().splitlines()) == 1
    _failing_tifffile_write(monkeypatch)
    assert main([*argv, str(tmp_path / "out.tif")]) == 2
    err = capsys.readouterr().err
    expected = f"could not write {tmp_path / 'out.tif'}: No space left on device"
    assert err.strip() == f"napari-selfreg predict: error: {expected}"
    assert not (tmp_path / "out.tif").exists()


def test_a_stack_written_page_by_page_is_refused_and_a_slides_overviews_are_not(tmp_path):
    from napari_selfreg.io import check_planar

    stack = np.random.default_rng(0).integers(0, 255, (3, 32, 40)).astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "loop.tif") as tif:  # the usual loop: one series per slice
        for plane in stack:
            tif.write(plane)
    for read in (check_planar, read_image, lambda p: open_image(p, lazy_above=0)):
        with pytest.raises(ImageFileError, match=r"is a stack \(pages=3\)"):
            read(tmp_path / "loop.tif")
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3)).astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "slide.tif") as tif:  # levels, then a thumbnail: other sizes
        tif.write(image, photometric="rgb", tile=(32, 32), subifds=1)
        tif.write(image[::2, ::2], photometric="rgb", subfiletype=1, tile=(32, 32))
        tif.write(image[::8, ::8], photometric="rgb")
    check_planar(tmp_path / "slide.tif")
    assert np.array_equal(read_image(tmp_path / "slide.tif"), image)


def test_min_is_white_gray_is_inverted_back_and_label_ids_stay_as_stored(tmp_path):
    gray = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    tifffile.imwrite(tmp_path / "scan.tif", 255 - gray, photometric="miniswhite")  # stored: 0 shows white
    assert np.array_equal(read_image(tmp_path / "scan.tif"), gray)
    assert np.array_equal(np.asarray(open_image(tmp_path / "scan.tif", lazy_above=0)), gray)
    assert np.array_equal(read_image(tmp_path / "scan.tif", labels=True), 255 - gray)
    mask = np.eye(6, dtype=bool)
    tifffile.imwrite(tmp_path / "mask.tif", mask)  # tifffile stores bool masks as MinIsWhite
    assert np.array_equal(read_image(tmp_path / "mask.tif"), mask)


def test_a_palette_tiff_is_rgb_as_an_image_and_its_indices_as_labels(tmp_path):
    from PIL import Image

    indices = np.random.default_rng(0).integers(0, 4, (12, 16)).astype(np.uint8)
    colours = np.zeros((256, 3), np.uint8)
    colours[:4] = [[0, 0, 0], [255, 0, 0], [0, 200, 0], [10, 20, 250]]
    tifffile.imwrite(tmp_path / "p.tif", indices, photometric="palette", colormap=colours.T.astype(np.uint16) * 257)
    assert np.array_equal(read_image(tmp_path / "p.tif"), colours[indices])
    assert np.array_equal(np.asarray(open_image(tmp_path / "p.tif", lazy_above=0)), colours[indices])
    assert np.array_equal(read_image(tmp_path / "p.tif", labels=True), indices)
    pil = Image.fromarray(indices, "P")
    pil.putpalette(colours.ravel().tolist())
    pil.save(tmp_path / "pil.tif")  # Pillow's 16-bit colours are value * 256
    assert np.array_equal(read_image(tmp_path / "pil.tif"), colours[indices])
    (tmp_path / "p_mask.tif").write_bytes((tmp_path / "p.tif").read_bytes())
    [(data, _, kind)] = napari_get_reader(str(tmp_path / "p_mask.tif"))(str(tmp_path / "p_mask.tif"))
    assert kind == "labels" and np.array_equal(data, indices)  # a coloured mask keeps its ids


def test_cmyk_and_a_fourth_channel_that_is_not_alpha_are_refused_and_rgba_is_read(tmp_path):
    from PIL import Image

    four = np.random.default_rng(0).integers(0, 255, (12, 16, 4)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "cmyk.tif", four, photometric="separated")
    with pytest.raises(ImageFileError, match=r"^cmyk\.tif is a CMYK TIFF; convert it to RGB"):
        read_image(tmp_path / "cmyk.tif")
    tifffile.imwrite(tmp_path / "rgbx.tif", four, photometric="rgb", extrasamples=["unspecified"])
    tifffile.imwrite(tmp_path / "c4.tif", np.moveaxis(four, -1, 0), imagej=True, metadata={"axes": "CYX"})
    for name in ("rgbx.tif", "c4.tif"):  # a 4th fluorescence channel must not vanish as "alpha"
        with pytest.raises(ImageFileError, match="4 channels and the 4th is not marked as alpha"):
            read_image(tmp_path / name)
    tifffile.imwrite(tmp_path / "rgba.tif", four, photometric="rgb")
    Image.fromarray(four).save(tmp_path / "pil_rgba.tif")
    tifffile.imwrite(tmp_path / "rgba_planar.tif", np.moveaxis(four, -1, 0), photometric="rgb", planarconfig="separate")
    for name in ("rgba.tif", "pil_rgba.tif", "rgba_planar.tif"):
        assert np.array_equal(read_image(tmp_path / name), four)
    tifffile.imwrite(tmp_path / "rgb.ome.tif", np.moveaxis(four[..., :3], -1, 0), metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "ij.tif", four[..., :3], imagej=True, photometric="rgb")
    for name in ("rgb.ome.tif", "ij.tif"):
        assert np.array_equal(read_image(tmp_path / name), four[..., :3])


def test_a_gray_alpha_tiff_opens_like_a_gray_alpha_png(tmp_path):
    from PIL import Image

    la = np.random.default_rng(0).integers(0, 255, (12, 16, 2)).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    Image.fromarray(la, "LA").save(tmp_path / "pil_la.tif")
    tifffile.imwrite(tmp_path / "la.tif", la, photometric="minisblack", planarconfig="contig",
                     extrasamples=["unassalpha"])
    expected = read_image(tmp_path / "la.png")
    for name in ("la.tif", "pil_la.tif"):
        assert np.array_equal(read_image(tmp_path / name), expected)
    assert np.array_equal(np.asarray(open_image(tmp_path / "la.tif", lazy_above=0)), expected)


def test_a_png_above_pillows_bomb_limit_opens_without_lifting_the_limit_for_others(tmp_path, monkeypatch):
    from PIL import Image

    import napari_selfreg.io as io

    write_image(tmp_path / "big.png", np.full((100, 120, 3), 7, np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for Pillow's ~179 Mpx
    assert read_image(tmp_path / "big.png").shape == (100, 120, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(Image.DecompressionBombError):  # the process's other readers keep the limit
        Image.open(tmp_path / "big.png")
    monkeypatch.setattr(io, "WHOLE_PIXELS", 5000)
    with pytest.raises(ImageFileError, match="save it as a tiled TIFF"):
        read_image(tmp_path / "big.png")


def test_simpleitk_reads_drop_only_a_singleton_z(tmp_path):
    import SimpleITK as sitk

    row = np.arange(15, dtype=np.uint8).reshape(1, 5, 3)
    sitk.WriteImage(sitk.GetImageFromArray(row, isVector=True), str(tmp_path / "row.mha"))
    assert np.array_equal(read_image(tmp_path / "row.mha"), row)  # not a 5 x 3 gray image
    sitk.WriteImage(sitk.GetImageFromArray(row[:, :1], isVector=True), str(tmp_path / "px.mha"))
    assert read_image(tmp_path / "px.mha").shape == (1, 1, 3)
    write_image(tmp_path / "p.nii.gz", np.zeros((2, 1, 5), np.float32))
    assert read_image(tmp_path / "p.nii.gz").shape == (2, 1, 5)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((1, 6, 7), np.uint8)), str(tmp_path / "z1.nii.gz"))
    assert read_image(tmp_path / "z1.nii.gz").shape == (6, 7)


def test_simpleitk_errors_are_one_line_without_its_source_paths(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "junk.nrrd").write_bytes(b"not an image at all")
    data = np.random.default_rng(0).integers(0, 255, (60, 70)).astype(np.uint8)
    for suffix in (".mha", ".nrrd"):
        write_image(tmp_path / f"whole{suffix}", data)
        (tmp_path / f"cut{suffix}").write_bytes((tmp_path / f"whole{suffix}").read_bytes()[:-2000])
    expected = {
        "empty.nii.gz": "the file is empty", "junk.nrrd": "not an image",
        "cut.mha": "shorter than its header says", "cut.nrrd": "shorter than its header says",
    }
    for name, reason in expected.items():
        with pytest.raises(ImageFileError) as error:
            read_image(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"could not read {name}: ") and reason in message
        assert "\n" not in message and ".cxx" not in message and "No such file" not in message


def test_a_cut_nifti_is_refused(tmp_path):
    import gzip

    data = np.random.default_rng(0).integers(0, 255, (60, 70)).astype(np.uint8)
    for name in ("a.nii", "a.nii.gz"):
        write_image(tmp_path / name, data)
        whole = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(whole[: len(whole) * 2 // 3])
        with pytest.raises(ImageFileError, match=rf"could not read cut_{name}: .*cut off"):
            read_image(tmp_path / f"cut_{name}")
    # a .nii.gz of two gzip members (its trailer's length is the second's) is whole
    raw = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert np.array_equal(read_image(tmp_path / "two.nii.gz"), data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd", ".tif"])
def test_bool_and_half_float_arrays_are_written(tmp_path, suffix):
    mask = np.eye(5, 6, dtype=bool)
    write_image(tmp_path / f"m{suffix}", mask)
    assert np.array_equal(read_image(tmp_path / f"m{suffix}"), mask)
    half = np.linspace(0, 1, 30, dtype=np.float16).reshape(5, 6)
    write_image(tmp_path / f"h{suffix}", half)
    assert np.array_equal(read_image(tmp_path / f"h{suffix}"), half)


def test_a_tiff_without_pages_is_named_so(tmp_path):
    path = tmp_path / "empty.tif"
    path.write_bytes(b"II*\x00\x00\x00\x00\x00")  # a TIFF header whose first page offset is 0
    with pytest.raises(ImageFileError, match="holds no image"):
        read_image(path)
