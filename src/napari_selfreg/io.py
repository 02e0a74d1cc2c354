"""Reading and writing images and labels: TIFF (tifffile), PNG/JPEG/BMP (Pillow; 16-bit colour
PNGs through SimpleITK, since Pillow keeps only their high byte), and the medical formats
SimpleITK reads (.nii, .nii.gz, .mha, .mhd, .nrrd).

Used by the command line and, through the npe2 manifest, by napari's reader/writer hooks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
LABEL_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".bmp", *ITK_SUFFIXES)  # lossless, integer ids
FLOAT_SUFFIXES = (*TIFF_SUFFIXES, *ITK_SUFFIXES)  # float32 probability maps
INSTANCE_SUFFIXES = (*TIFF_SUFFIXES, *ITK_SUFFIXES)  # int32 instance ids, more than a PNG holds


# TIFFs with more pixels than this open lazily (``open_image``): a slide is read tile by
# tile as prediction reaches it instead of all at once
LAZY_PIXELS = 64 * 1024 * 1024


LABELS_KEY = "napari_selfreg_labels"  # in a labels file's header: its class names as JSON
NIFTI_NOTE = "napari-selfreg labels "  # NIfTI's description field: the same, after this prefix
GEOMETRY_KEY = "napari_selfreg_geometry"  # in a TIFF's header: spacing, origin, direction (x, y)
DIRECTION_KEY = "napari_selfreg_direction"  # in a layer's metadata: its file's 2 x 2 direction
IDENTITY = (1.0, 0.0, 0.0, 1.0)


class ImageFileError(ValueError):
    """A file that cannot be read or written as an image."""


def suffix_of(path: str | Path) -> str:
    name = str(path).lower()
    for suffix in (*TIFF_SUFFIXES, *PIL_SUFFIXES, *ITK_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def check_planar(path: str | Path) -> None:
    """Refuse a file that holds a z-stack, time series or several gray pages, from its header
    alone: squeezed to (3, H, W) or (4, H, W) such a stack would pass for a channel-first
    RGB(A) image. Only samples (S) and channels (C) may sit beside Y and X."""
    path = Path(path)
    suffix = suffix_of(path)
    if not path.is_file() or suffix not in (*TIFF_SUFFIXES, *ITK_SUFFIXES):
        return
    planes = ""
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes = zip(series.axes.upper(), series.shape, strict=True)
                # tifffile's plane axes other than Z and T (I, Q, ...) are plain pages
                planes = "".join(f"{a if a in 'ZT' else 'pages'}={n} " for a, n in axes if a not in "YXSC" and n > 1)
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            if len(size) > 2 and any(n > 1 for n in size[2:]):
                planes = f"Z={size[2]} "
    except Exception:  # unreadable headers are reported when the pixels are read
        return
    if planes:
        raise ImageFileError(
            f"{path.name} is a stack ({planes.strip()}), not one 2-D image; save the slice you want as its own file"
        )


def _tiff_to_yx(data: np.ndarray, axes: str) -> np.ndarray:
    """Drop singleton axes and put samples/channels last, using the file's own axes string."""
    axes = axes.upper()
    keep = [i for i, a in enumerate(axes) if data.shape[i] > 1 or a in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    for channel_axis in ("S", "C"):
        # RGB(A) only: two channels last would be drawn as a plane of X by channel
        if channel_axis in axes and data.shape[axes.index(channel_axis)] in (3, 4) and axes[-1] != channel_axis:
            i = axes.index(channel_axis)
            data = np.moveaxis(data, i, -1)
            axes = axes[:i] + axes[i + 1 :] + channel_axis
    return data


def _is_deep_colour_png(path: Path) -> bool:
    """A 16-bit RGB(A) PNG, which Pillow would cut to 8 bits (16-bit gray it keeps; 16-bit gray +
    alpha SimpleITK cannot read, so Pillow's 8 bits stay): the bit depth and colour type are
    bytes 24 and 25 of the file, in its IHDR chunk."""
    if suffix_of(path) != ".png":
        return False
    with open(path, "rb") as handle:
        head = handle.read(26)
    return len(head) == 26 and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6)


def read_image(path: str | Path, labels: bool = False) -> np.ndarray:
    """The pixel array of an image file (H, W) or (H, W, C); stacks keep their leading axes.

    ``labels``: a palette PNG keeps its indices (the ids), instead of becoming colours.
    """
    path = Path(path)
    if not path.exists():
        raise ImageFileError(f"{path} does not exist")
    suffix = suffix_of(path)
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return _tiff_to_yx(series.asarray(), series.axes)
        if suffix in PIL_SUFFIXES and not _is_deep_colour_png(path):
            from PIL import Image

            with Image.open(path) as img:
                if labels and img.mode == "P":
                    return np.array(img)
                if img.mode in ("P", "CMYK", "YCbCr", "LA"):
                    img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
                return np.array(img)
        if suffix in ITK_SUFFIXES or suffix == ".png":
            import SimpleITK as sitk

            data = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            return np.squeeze(data) if data.ndim > 2 else data
    except ImageFileError:
        raise
    except Exception as error:  # corrupt files of any kind
        raise ImageFileError(f"could not read {path.name}: {error}") from None
    raise ImageFileError(
        f"{path.name}: unsupported format; use TIFF, PNG, JPEG or a SimpleITK format (.nii, .nii.gz, .mha, .nrrd)"
    )


def open_image(path: str | Path, lazy_above: int | None = None):
    """``read_image``, except that a TIFF above ``lazy_above`` pixels (default ``LAZY_PIXELS``)
    comes back as a dask array over the file's own tiles or strips, read only where used.

    Needs the ``large`` extra (zarr, dask); without it, or for other formats, the file is read whole.
    """
    return _open(Path(path), lazy_above, every_level=False)[0]


def open_levels(path: str | Path, lazy_above: int | None = None) -> list:
    """The resolution levels of an image, full resolution first.

    A large pyramidal TIFF (a whole-slide export) gives every level, each lazy, so napari
    can show a slide from its overviews instead of reading full-resolution tiles to draw a
    zoomed-out view. Any other file gives one level, ``open_image``'s array.
    """
    return _open(Path(path), lazy_above, every_level=True)


def _open(path: Path, lazy_above: int | None, every_level: bool) -> list:
    limit = LAZY_PIXELS if lazy_above is None else lazy_above
    if suffix_of(path) not in TIFF_SUFFIXES or not path.exists():
        return [read_image(path)]
    try:
        import dask.array  # noqa: F401
        import tifffile
        import zarr  # noqa: F401
    except ImportError:
        return [read_image(path)]
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, count = series.shape, series.axes.upper(), len(series.levels)
            if "Y" not in axes or "X" not in axes or shape[axes.index("Y")] * shape[axes.index("X")] <= limit:
                return [_tiff_to_yx(series.asarray(), axes)]  # small: read whole from the file already open
        try:
            return [_lazy_level(path, axes, level) for level in range(count if every_level else 1)]
        except Exception as error:  # e.g. zarr 2 beside a tifffile that needs zarr 3, or the reverse
            warnings.warn(
                f"{path.name} could not be opened lazily ({error}); reading it whole. For lazy reading "
                "install zarr>=3 with tifffile>=2025.5.21 (or zarr 2 with an older tifffile).",
                stacklevel=2,
            )
            return [read_image(path)]
    except ImageFileError:
        raise
    except Exception as error:
        raise ImageFileError(f"could not read {path.name}: {error}") from None


def _lazy_level(path: Path, axes: str, level: int):
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=0, level=level)
    return _tiff_to_yx(da.from_zarr(zarr.open(store, mode="r")), axes)


def _plane_geometry(reference: str | Path):
    """(spacing, origin, direction) of the 2-D plane of a SimpleITK-readable file, or of a TIFF
    that ``write_image`` gave one; None for any other file."""
    if reference is None or not Path(reference).is_file():
        return None
    if suffix_of(reference) in TIFF_SUFFIXES:
        return _tiff_geometry(reference)
    if suffix_of(reference) not in ITK_SUFFIXES:
        return None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(reference))
    reader.ReadImageInformation()
    n = reader.GetDimension()
    direction = np.asarray(reader.GetDirection()).reshape(n, n)[:2, :2]
    return reader.GetSpacing()[:2], reader.GetOrigin()[:2], tuple(direction.ravel())


def _tiff_metadata(path) -> dict:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            shaped = tif.shaped_metadata or ({},)
            return dict(shaped[0])
    except Exception:  # not a TIFF tifffile can read: no metadata of ours
        return {}


def _tiff_geometry(path):
    try:
        found = json.loads(_tiff_metadata(path).get(GEOMETRY_KEY) or "null")
        if found is None:
            return None
        spacing, origin, direction = (tuple(float(v) for v in found[k]) for k in ("spacing", "origin", "direction"))
    except (TypeError, ValueError, KeyError):
        return None
    return (spacing, origin, direction) if (len(spacing), len(origin), len(direction)) == (2, 2, 4) else None


def _placed(geometry) -> bool:
    """Whether a geometry places the plane anywhere but at unit pixels from the origin."""
    spacing, origin, direction = geometry
    return not (np.allclose(spacing, 1.0) and np.allclose(origin, 0.0) and np.allclose(direction, IDENTITY))


def write_image(
    path: str | Path,
    data: np.ndarray,
    like: str | Path | None = None,
    geometry: tuple | None = None,
    class_names: list[str] | None = None,
    planes: bool = False,
) -> Path:
    """Write labels or images; integer labels keep their ids (no scaling).

    ``like``: an input image whose spacing, origin and direction a SimpleITK output keeps,
    so the labels overlay the image in ITK-SNAP or 3D Slicer; ``geometry`` gives them
    directly as (spacing, origin, direction) in x, y order. ``class_names`` (labels) go into
    TIFF, MHA and NRRD headers and NIfTI's description, and mark the file as labels for the
    plugin's reader. ``planes``: a (K, H, W) stack, never a colour picture (an image 3 or 4
    pixels wide would look like one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    suffix = suffix_of(path)
    note = None if class_names is None else json.dumps(list(class_names))
    geometry = geometry if geometry is not None else _plane_geometry(like)
    if suffix in TIFF_SUFFIXES:
        import tifffile

        compression = "zlib" if data.dtype != np.float32 else None
        metadata = {LABELS_KEY: note} if note else {}
        if geometry is not None and _placed(geometry):
            spacing, origin, direction = ([float(v) for v in part] for part in geometry)
            metadata[GEOMETRY_KEY] = json.dumps({"spacing": spacing, "origin": origin, "direction": direction})
        # (K, H, W) probabilities of 3 or 4 classes are planes, not a channel-first RGB(A) picture
        photometric = "rgb" if data.ndim == 3 and data.shape[-1] in (3, 4) and not planes else "minisblack"
        tifffile.imwrite(path, data, compression=compression, metadata=metadata, photometric=photometric)
    elif suffix in PIL_SUFFIXES:
        from PIL import Image

        if data.dtype not in (np.uint8, np.uint16) and np.issubdtype(data.dtype, np.integer):
            if data.max(initial=0) > 65535 or data.min(initial=0) < 0:
                raise ImageFileError("labels above 65535 or below 0 do not fit a PNG; save as TIFF")
            data = data.astype(np.uint16 if data.max(initial=0) > 255 else np.uint8)
        if suffix in (".jpg", ".jpeg") and np.issubdtype(data.dtype, np.integer) and data.ndim == 2:
            raise ImageFileError("JPEG is lossy and would change label ids; save labels as TIFF or PNG")
        if data.ndim != 2 and not (data.ndim == 3 and data.shape[-1] in (3, 4)):
            raise ImageFileError(f"{path.name}: a {data.ndim}-D array does not fit a PNG; save it as TIFF or NIfTI")
        Image.fromarray(data).save(path)
    elif suffix in ITK_SUFFIXES:
        import SimpleITK as sitk

        out = sitk.GetImageFromArray(data)
        if note is not None:
            out.SetMetaData(LABELS_KEY, note)  # MHA, NRRD
            if suffix in (".nii", ".nii.gz"):  # NIfTI keeps only its 80-byte description
                fits = len(NIFTI_NOTE + note) < 80
                if not fits:
                    warnings.warn(
                        f"{path.name}: NIfTI's header has room for about 55 characters of class names, so they "
                        "are not saved (the ids are); save as .mha, .nrrd or .tif to keep them", stacklevel=2,
                    )
                out.SetMetaData("ITK_FileNotes", NIFTI_NOTE + (note if fits else "[]"))
        if geometry is not None and out.GetDimension() in (2, 3):
            spacing, origin, direction = geometry
            if out.GetDimension() == 3:  # (K, H, W) probabilities: one plane per class, a unit apart
                (a, b), (c, d) = np.reshape(direction, (2, 2))
                spacing, origin, direction = (*spacing, 1.0), (*origin, 0.0), (a, b, 0.0, c, d, 0.0, 0.0, 0.0, 1.0)
            out.SetSpacing(spacing)
            out.SetOrigin(origin)
            out.SetDirection(direction)
        sitk.WriteImage(out, str(path))
    else:
        raise ImageFileError(f"{path.name}: unsupported format for writing; use .tif, .png or .nii.gz")
    return path


# ------------------------------------------------------------------ npe2 reader / writer hooks


def napari_get_reader(path):
    """Reader contribution: TIFF with its axes handled, and the SimpleITK formats."""
    if isinstance(path, list):
        if not path:
            return None
        path = path[0]
    if suffix_of(path) not in (*TIFF_SUFFIXES, *ITK_SUFFIXES):
        return None
    return _read_layers


def _read_layers(path):
    """Large TIFF images open lazily (``open_levels``): napari then reads only the tiles it shows,
    a pyramidal slide becomes a multiscale layer, and the Segment widget predicts tile by tile
    from full resolution. Labels are always read whole (level 0), because painting writes into them."""
    paths = path if isinstance(path, list) else [path]
    layers = []
    for p in paths:
        levels = open_levels(p)
        data = levels[0]
        rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and _colour_last(p)
        names = labels_note(p)
        kind = "labels" if names is not None or _looks_like_labels(p, data, rgb) else "image"
        meta = {"name": Path(p).name.split(".")[0]}
        if data.ndim - rgb == 2:
            meta.update(_plane_placement(p))
        elif data.ndim - rgb == 3 and (placement := _plane_placement(p)):  # (K, H, W) probabilities
            placement.update(scale=(1.0, *placement["scale"]), translate=(0.0, *placement["translate"]))
            meta.update(placement)
        if names:
            from .widgets.classes import class_colormap, class_features

            meta.update(features=class_features(names), colormap=class_colormap())
        if kind == "labels" and not isinstance(data, np.ndarray):
            data = np.asarray(data)
        elif kind == "image":
            meta["rgb"] = rgb
            if len(levels) > 1:
                data, meta["multiscale"] = levels, True
        layers.append((data, meta, kind))
    return layers


def _colour_last(path) -> bool:
    """Whether a TIFF's last axis holds colour samples (YXS), not a third pixel axis: (K, H, W)
    planes of an image 3 or 4 pixels wide end in 3 or 4 too. Other formats: True."""
    if suffix_of(path) not in TIFF_SUFFIXES:
        return True
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = "".join(a for a, n in zip(series.axes.upper(), series.shape, strict=True) if n > 1 or a in "YX")
    except Exception:  # unreadable headers are reported when the pixels are read
        return True
    return axes[-1:] in ("S", "C") or (len(axes) == 3 and axes[0] in "SC")


def _looks_like_labels(path, data, rgb: bool) -> bool:
    """An integer file named like labels, unless it is an RGB(A) picture ("masked tissue.tif")."""
    name = Path(path).name.lower()
    return (
        not rgb
        and np.issubdtype(data.dtype, np.integer)
        and any(word in name for word in ("label", "mask", "seg", "anno"))
    )


def labels_note(path) -> list[str] | None:
    """The class names a file written by ``write_labels`` holds ([] when it holds none), or None
    for any other file."""
    suffix = suffix_of(path)
    try:
        if suffix in TIFF_SUFFIXES:
            note = _tiff_metadata(path).get(LABELS_KEY)
        elif suffix in ITK_SUFFIXES:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            note = reader.GetMetaData(LABELS_KEY) if reader.HasMetaDataKey(LABELS_KEY) else None
            descrip = reader.GetMetaData("descrip") if reader.HasMetaDataKey("descrip") else ""
            if note is None and descrip.startswith(NIFTI_NOTE):
                note = descrip[len(NIFTI_NOTE) :]
        else:
            return None
        names = json.loads(note) if note else None
    except Exception:  # no note, or not one of ours
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _plane_placement(path) -> dict:
    """napari's scale and translate (y, x) from a file's spacing and origin. A direction other
    than the identity goes into the layer's metadata, so labels saved from the layer keep it
    and overlay the image in ITK-SNAP or 3D Slicer (napari itself shows the plane unrotated)."""
    geometry = _plane_geometry(path)
    if geometry is None:
        return {}
    (sx, sy), (ox, oy), direction = geometry
    placement = {"scale": (sy, sx), "translate": (oy, ox)}
    if not np.allclose(direction, IDENTITY):
        placement["metadata"] = {DIRECTION_KEY: [float(v) for v in direction]}
    return placement


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """Writer contribution: a Labels layer to TIFF, PNG or NIfTI, ids unchanged; its class
    names, scale, translate and its image's direction go into TIFF and SimpleITK files (PNG
    keeps the ids only).

    A refusal is raised as ``OSError``: napari swallows a writer's ``ValueError``.
    """
    names = _feature_class_names(attributes.get("features"))
    geometry = None
    if np.ndim(data) == 2:
        sy, sx = attributes.get("scale", (1.0, 1.0))[-2:]
        ty, tx = attributes.get("translate", (0.0, 0.0))[-2:]
        direction = (attributes.get("metadata") or {}).get(DIRECTION_KEY, IDENTITY)
        geometry = ((float(sx), float(sy)), (float(tx), float(ty)), tuple(float(v) for v in direction))
    try:
        return [str(write_image(path, np.asarray(data), geometry=geometry, class_names=names or []))]
    except ImageFileError as error:
        raise OSError(str(error)) from None


def _feature_class_names(features) -> list[str] | None:
    if features is None:
        return None
    from types import SimpleNamespace

    from .widgets.classes import class_names_of

    if isinstance(features, dict):
        import pandas as pd

        features = pd.DataFrame(features)
    return class_names_of(SimpleNamespace(features=features))
