"""Reading and writing images and labels: TIFF (tifffile), PNG/JPEG/BMP (Pillow; 16-bit colour
PNGs through SimpleITK, since Pillow keeps only their high byte), and the medical formats
SimpleITK reads (.nii, .nii.gz, .mha, .mhd, .nrrd).

Used by the command line and, through the npe2 manifest, by napari's reader/writer hooks.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import struct
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from .core.files import replace_keeping_mode

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
ITK_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
LABEL_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".bmp", *ITK_SUFFIXES)  # lossless, integer ids
FLOAT_SUFFIXES = (*TIFF_SUFFIXES, *ITK_SUFFIXES)  # float32 probability maps
INSTANCE_SUFFIXES = (*TIFF_SUFFIXES, *ITK_SUFFIXES)  # int32 instance ids, more than a PNG holds
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# SimpleITK picks its ImageIO from a lower-case suffix only (C.MHA would be "not an image"): named from ours
ITK_IO = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO",
          ".nrrd": "NrrdImageIO", ".png": "PNGImageIO"}


# TIFFs with more pixels than this open lazily (``open_image``): a slide is read tile by
# tile as prediction reaches it instead of all at once
LAZY_PIXELS = 64 * 1024 * 1024
# PNG, JPEG and BMP are read whole; up to this many pixels (3 GiB as RGB) they open, instead of
# Pillow's decompression-bomb limit of ~179 Mpx, which refuses large H&E exports the user chose
WHOLE_PIXELS = 16 * LAZY_PIXELS
_PIL_LIMIT = threading.Lock()  # Pillow's limit is a module global: lifted only around our own opens


LABELS_KEY = "napari_selfreg_labels"  # in a labels file's header: its class names as JSON
NIFTI_NOTE = "napari-selfreg labels "  # NIfTI's description field: the same, after this prefix
GEOMETRY_KEY = "napari_selfreg_geometry"  # in a TIFF's header: spacing, origin, direction (x, y[, z])
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
                series = _first_series(tif, path)
                axes = zip(series.axes.upper(), series.shape, strict=True)
                # tifffile's plane axes other than Z and T (I, Q, ...) are plain pages
                planes = "".join(f"{a if a in 'ZT' else 'pages'}={n} " for a, n in axes if a not in "YXSC" and n > 1)
                planes = planes or _page_stack(tif)
        else:
            with _itk_reader(path) as reader:
                reader.ReadImageInformation()
            size = reader.GetSize()
            if len(size) > 2 and any(n > 1 for n in size[2:]):
                planes = f"Z={size[2]} "
    except Exception:  # unreadable headers are reported when the pixels are read
        return
    if planes:
        _refuse_stack(path, planes)


def _refuse_stack(path: Path, planes: str) -> None:
    raise ImageFileError(
        f"{path.name} is a stack ({planes.strip()}), not one 2-D image; save the slice you want as its own file"
    )


def _yx(series) -> tuple[int, int] | None:
    axes = series.axes.upper()
    return (series.shape[axes.index("Y")], series.shape[axes.index("X")]) if "Y" in axes and "X" in axes else None


def _first_series(tif, path: Path):
    """The image of a TIFF; a file without one (no pages, or a damaged first page) is named."""
    if not tif.series:
        raise ImageFileError(f"{Path(path).name} holds no image (a TIFF without readable pages)")
    return tif.series[0]


def _page_stack(tif) -> str:
    """"pages=N" for a stack written page by page (one ``TiffWriter.write`` per slice: each page
    is its own series, the size of the first), else "". Reduced-resolution levels, transparency
    masks and a slide's thumbnail, label or macro image are no slices: they have their own size
    or say what they are."""
    first = _yx(tif.series[0])
    slices = [
        s for s in tif.series[1:]
        if _yx(s) == first and not s.keyframe.subfiletype & 0b101
        and s.name.lower() not in ("thumbnail", "label", "macro", "map", "overview")
    ]
    return f"pages={1 + len(slices)}" if first is not None and slices else ""


# TIFF tags (tifffile.PHOTOMETRIC, tifffile.EXTRASAMPLE), without importing tifffile here
MINISWHITE, MINISBLACK, RGB, PALETTE, SEPARATED = 0, 1, 2, 3, 5
ALPHA = (1, 2)  # associated, unassociated


class _Colours:
    """How a TIFF's stored samples become the pixels Pillow would give: tifffile returns them as
    stored, so MinIsWhite gray would come inverted and a palette image as its indices."""

    def __init__(self, invert: int | None = None, lut: np.ndarray | None = None, gray_alpha: bool = False):
        self.invert = invert  # MinIsWhite: the largest stored value (unsigned), or -1 (signed: mirrored by ~)
        self.lut = lut  # palette: (2 ** bits, 3) colours
        self.gray_alpha = gray_alpha

    def apply(self, data):
        """``data`` as ``_tiff_to_yx`` gives it (numpy or dask), in colours."""
        alpha = None
        if self.gray_alpha:
            data, alpha = data[..., 0], data[..., 1]
        if self.invert is not None:
            data = ~data if self.invert < 0 else data.dtype.type(self.invert) - data
        if self.lut is not None:
            lut = self.lut
            data = data.astype(np.uint8) if data.dtype == np.bool_ else data  # an index, not a mask
            if isinstance(data, np.ndarray):
                data = lut[data]
            else:  # dask: per chunk, gaining the colour axis
                data = data.map_blocks(lambda block: lut[block], dtype=lut.dtype, new_axis=data.ndim,
                                       chunks=(*data.chunks, (lut.shape[1],)))
        if alpha is not None:  # spread to RGBA, as Pillow converts a gray+alpha PNG
            data = np.stack([data, data, data, alpha], axis=-1)
        return data


def _tiff_colours(series, path: Path, labels: bool) -> _Colours:
    """The colour conversion a TIFF's first page asks for, decided from its tags before any
    pixel is read; CMYK and a 4th channel that is not alpha are refused."""
    page = series.keyframe
    photometric, extras = int(page.photometric), tuple(int(e) for e in page.extrasamples or ())
    if photometric == SEPARATED:
        raise ImageFileError(f"{path.name} is a CMYK TIFF; convert it to RGB (e.g. in an image editor) and save again")
    sizes = {a: n for a, n in zip(series.axes.upper(), series.shape, strict=True) if n > 1}
    samples, channels = sizes.get("S", 1), sizes.get("C", 1)
    # RGBA only where the tags say so: a 4th channel of a fluorescence image must not vanish as "alpha"
    rgba = photometric == RGB and (not extras or extras[0] in ALPHA)
    if (samples == 4 and not rgba) or channels == 4:
        raise ImageFileError(
            f"{path.name} has 4 channels and the 4th is not marked as alpha; napari-selfreg reads gray, "
            "RGB or RGBA images: save 1 or 3 of the channels"
        )
    gray_alpha = photometric in (MINISWHITE, MINISBLACK) and samples == 2 and bool(extras) and extras[0] in ALPHA
    colours = _Colours(gray_alpha=gray_alpha)
    if labels:  # label ids are the stored values, whatever colours they are shown in
        return colours
    dtype = np.dtype(series.dtype)
    # 1-bit pages keep their values: tifffile writes every bool mask as MinIsWhite and reads it back as stored
    if photometric == MINISWHITE and dtype != np.bool_:
        if dtype.kind == "f":
            raise ImageFileError(f"{path.name} stores floating-point pixels as MinIsWhite; save it as MinIsBlack")
        colours.invert = (1 << int(page.bitspersample)) - 1 if dtype.kind == "u" else -1
    if photometric == PALETTE and page.colormap is not None:
        colormap = np.asarray(page.colormap)
        # 16-bit colour values (some writers store 8-bit ones): their high byte, as Pillow reads them
        colours.lut = (colormap >> 8 if colormap.max() > 255 else colormap).astype(np.uint8).T.copy()
    return colours


def _tiff_to_yx(data: np.ndarray, axes: str) -> np.ndarray:
    """Drop singleton axes and put samples/channels last, using the file's own axes string."""
    axes = axes.upper()
    keep = [i for i, a in enumerate(axes) if data.shape[i] > 1 or a in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    for channel_axis in ("S", "C"):
        # samples (S) are the components of each pixel (gray + alpha, RGB, ...) however they are stored;
        # channels (C) only as RGB(A): two channels last would be drawn as a plane of X by channel
        size = data.shape[axes.index(channel_axis)] if channel_axis in axes else 0
        if ((channel_axis == "S" and size > 1) or size in (3, 4)) and axes[-1] != channel_axis:
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

    ``labels``: a palette PNG or TIFF keeps its indices (the ids) instead of becoming colours,
    and a MinIsWhite TIFF its stored values.
    """
    path = Path(path)
    if not path.exists():
        raise ImageFileError(f"{path} does not exist")
    suffix = suffix_of(path)
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = _first_series(tif, path)
                if planes := _page_stack(tif):
                    _refuse_stack(path, planes)
                colours = _tiff_colours(series, path, labels)
                return colours.apply(_tiff_to_yx(series.asarray(), series.axes))
        if suffix in PIL_SUFFIXES and not _is_deep_colour_png(path):
            with _pil_open(path) as img:
                if labels and img.mode == "P":
                    return np.array(img)
                if img.mode in ("P", "CMYK", "YCbCr", "LA"):
                    img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
                return np.array(img)
        if suffix in ITK_SUFFIXES or suffix == ".png":
            import SimpleITK as sitk

            if suffix in NIFTI_SUFFIXES and (problem := _nifti_problem(path)):
                raise ImageFileError(f"could not read {path.name}: {problem}")
            if suffix == ".mhd" and (raw := _mhd_data_file(path)) is not None and not raw.is_file():
                raise ImageFileError(f"could not read {path.name}: its data file {raw.name} is missing")
            with _itk_reader(path) as reader:
                image = reader.Execute()
            data = sitk.GetArrayFromImage(image)
            # drop singleton Z (T, ...) axes, never a plane 1 pixel high or wide, nor the colour axis
            stack_axes = image.GetDimension() - 2
            return data.reshape([n for i, n in enumerate(data.shape) if i >= stack_axes or n > 1])
    except ImageFileError:
        raise
    except RuntimeError as error:  # SimpleITK's
        raise ImageFileError(f"could not read {path.name}: {_itk_reason(error, path)}") from None
    except Exception as error:  # corrupt files of any kind
        raise ImageFileError(f"could not read {path.name}: {error}") from None
    raise ImageFileError(
        f"{path.name}: unsupported format; use TIFF, PNG, JPEG or a SimpleITK format (.nii, .nii.gz, .mha, .nrrd)"
    )


def _pil_open(path: Path):
    """``Image.open`` with Pillow's decompression-bomb limit raised to ``WHOLE_PIXELS``: the file
    is one the user chose, and a 14000 x 14000 H&E export is no attack. Larger files are refused
    with a way out."""
    from PIL import Image

    with _PIL_LIMIT:
        default, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = default
    if img.width * img.height > WHOLE_PIXELS:
        img.close()
        raise ImageFileError(
            f"{path.name} has {img.width} x {img.height} pixels, more than napari-selfreg reads from a "
            f"{path.suffix.lstrip('.').upper()} file at once ({WHOLE_PIXELS:,}); save it as a tiled TIFF, "
            "which is read tile by tile"
        )
    return img


@contextlib.contextmanager
def _itk_reader(path: Path):
    """A SimpleITK ``ImageFileReader`` of ``path``. SimpleITK finds the ImageIO from a lower-case
    suffix only: for C.MHA it is named from ours (a lower-case name keeps SimpleITK's own check
    that the file is what its name says, which words damaged files better). NIfTI is read
    through a link to the file alone in a temporary folder, under a lower-case name: NIfTI's
    library, asked for X.nii.gz, reads X.nii instead where that file lies beside it, and refuses
    mixed-case suffixes. Where no link can be made (Windows), such a file is copied there."""
    import SimpleITK as sitk

    path = Path(path)
    suffix = suffix_of(path)
    reader = sitk.ImageFileReader()
    if suffix not in NIFTI_SUFFIXES:
        if not path.name.endswith(suffix):
            reader.SetImageIO(ITK_IO[suffix])
        reader.SetFileName(str(path))
        yield reader
        return
    with tempfile.TemporaryDirectory(prefix="napari-selfreg-") as folder:
        alone = Path(folder) / f"image{suffix}"
        try:
            os.symlink(os.path.abspath(path), alone)
        except OSError:
            shadow = _nifti_shadow(path)
            if shadow is None and path.name.endswith(suffix):
                alone = path  # nothing to be mistaken for it
            else:
                try:
                    shutil.copyfile(path, alone)
                except OSError as error:
                    beside = f"{shadow.name} lies beside it and would be read instead" if shadow else "mixed-case name"
                    raise ImageFileError(
                        f"could not read {path.name}: {beside}, and no copy could be made ({error.strerror or error}); "
                        f"rename it to end in {suffix}" + (f" or move {shadow.name} away" if shadow else "")
                    ) from None
        reader.SetFileName(str(alone))
        try:
            yield reader
        except RuntimeError as error:  # SimpleITK's message names the file it was given
            raise RuntimeError(str(error).replace(str(alone), str(path))) from None


def _nifti_shadow(path: Path) -> Path | None:
    """The X.nii that NIfTI's library reads when asked for X.nii.gz, where there is one."""
    if suffix_of(path) != ".nii.gz":
        return None
    stem = path.name[: -len(".nii.gz")]
    return next((p for p in (path.with_name(stem + ".nii"), path.with_name(stem + ".NII")) if p.exists()), None)


def _metaimage(path: Path) -> bool:
    """Whether a file begins like a MetaImage header (its first lines name its dimensions)."""
    try:
        with open(path, "rb") as handle:
            return b"NDims" in handle.read(4096)
    except OSError:
        return True  # SimpleITK says why


def _mhd_data_file(path: Path) -> Path | None:
    """The data file a MetaImage header (.mhd) names, beside it; None where the pixels are in the
    header's own file (LOCAL), in a list of files, or the header cannot be read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16).decode("latin-1")
    except OSError:
        return None
    found = re.search(r"^\s*ElementDataFile\s*=\s*(.*?)\s*$", head, re.MULTILINE)
    name = found.group(1) if found else ""
    if not name or name.upper() in ("LOCAL", "LIST") or " " in name or "%" in name:
        return None
    return Path(path).parent / name


def _itk_reason(error: Exception, path: Path | None = None) -> str:
    """SimpleITK's message in one line: its errors name the C++ source file and span several lines
    of ITK's internals, of which the user needs the last statement about the file."""
    lines = []
    for line in str(error).splitlines():
        line = re.sub(r"^Exception thrown in SimpleITK .*\.(?:cxx|hxx|txx|cpp|h):\d+:", "", line.strip())
        line = re.sub(r"^(sitk::ERROR:|ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|\[nrrd\] \w+:)\s*", "", line).strip()
        if line:
            lines.append(line)
    text = " ".join(lines)
    if path is not None:  # reading a file that exists
        if path.is_file() and path.stat().st_size == 0:
            return "the file is empty"
        if "Unable to determine ImageIO" in text or (suffix_of(path) in (".mha", ".mhd") and not _metaimage(path)):
            return "not an image in the format its name says (or damaged)"
        stale = re.search(r"not read completely|fread got only|[Tt]runcat|[Pp]remature|No such file or directory", text)
        if stale or ("File cannot be read" in text and text.endswith("Reason: Success")):
            # ITK's "Reason" is a stale errno when the pixels of a file that exists are cut short
            return "the file is shorter than its header says (cut off or damaged)"
    reasons = [line.removeprefix("Reason:").strip() for line in lines if line.startswith("Reason:")]
    statements = [line for line in lines if not line.startswith("Reason:")]
    if reasons and reasons[-1] not in ("", "Success"):  # errno 0: no reason given
        return reasons[-1]
    return statements[-1] if statements else type(error).__name__


def _nifti_header(head: bytes) -> tuple[int, int] | None:
    """(vox_offset, data bytes) of a one-file NIfTI-1 or -2 header (``n+1``, ``n+2``), else None."""
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348 and head[344:347] == b"n+1":
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
        elif size == 540 and len(head) >= 540 and head[4:7] == b"n+2":
            dims = struct.unpack(order + "8q", head[16:80])
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        if not 1 <= dims[0] <= 7 or bitpix <= 0 or min(dims[1 : dims[0] + 1]) < 0:
            return None
        return offset, (int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix + 7) // 8
    return None


def _nifti_problem(path: Path, written: bool = False) -> str | None:
    """Why a .nii or .nii.gz holds less than its header promises, or None. SimpleITK reads a cut
    file without complaint (the missing pixels become 0) and writes one on a full disk. The
    size of a .nii is checked from its header; a .nii.gz from the length gzip records at its
    end, or, when that does not match (several members, a cut stream), by decompressing it."""
    import gzip
    import zlib

    compressed = suffix_of(path) == ".nii.gz"
    try:
        with gzip.open(path) if compressed else open(path, "rb") as handle:
            found = _nifti_header(handle.read(540))
        if found is None:  # not a NIfTI-1/2 one-file header: SimpleITK says what it makes of it
            return "no complete NIfTI header" if written else None
        expected = sum(found)
        if not compressed:
            size = path.stat().st_size
            return None if size >= expected else f"the file has {size} of its {expected} bytes (cut off?)"
        with open(path, "rb") as raw:
            raw.seek(-4, os.SEEK_END)
            if struct.unpack("<I", raw.read(4))[0] == expected % 2**32:
                return None
        total = 0
        with gzip.open(path) as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except EOFError:
        return "the compressed data ends early (the file is cut off)"
    except (OSError, zlib.error) as error:
        return f"damaged compressed data ({error})" if compressed else str(error)
    return None if total >= expected else f"the file holds {total} of its {expected} bytes (cut off?)"


def open_image(path: str | Path, lazy_above: int | None = None):
    """``read_image``, except that a TIFF above ``lazy_above`` pixels (default ``LAZY_PIXELS``)
    comes back as a dask array over the file's own tiles or strips, read only where used.

    Needs the ``large`` extra (zarr, dask); without it, or for other formats, the file is read whole.
    """
    return _open(Path(path), lazy_above, every_level=False)[0]


def open_labels(path: str | Path, lazy_above: int | None = None):
    """``read_image(path, labels=True)``, except that a large TIFF comes back lazily, as from
    ``open_image``: a slide's objects measured band by band are never held whole."""
    return _open(Path(path), lazy_above, every_level=False, labels=True)[0]


def open_levels(path: str | Path, lazy_above: int | None = None) -> list:
    """The resolution levels of an image, full resolution first.

    A large pyramidal TIFF (a whole-slide export) gives every level, each lazy, so napari
    can show a slide from its overviews instead of reading full-resolution tiles to draw a
    zoomed-out view. Any other file gives one level, ``open_image``'s array.
    """
    return _open(Path(path), lazy_above, every_level=True)


def _open(path: Path, lazy_above: int | None, every_level: bool, labels: bool = False) -> list:
    limit = LAZY_PIXELS if lazy_above is None else lazy_above
    if suffix_of(path) not in TIFF_SUFFIXES or not path.exists():
        return [read_image(path, labels)]
    try:
        import dask.array  # noqa: F401
        import tifffile
        import zarr  # noqa: F401
    except ImportError:
        return [read_image(path, labels)]
    try:
        with tifffile.TiffFile(path) as tif:
            series = _first_series(tif, path)
            if planes := _page_stack(tif):
                _refuse_stack(path, planes)
            colours = _tiff_colours(series, path, labels)
            shape, axes, count = series.shape, series.axes.upper(), len(series.levels)
            if "Y" not in axes or "X" not in axes or shape[axes.index("Y")] * shape[axes.index("X")] <= limit:
                # small: read whole from the file already open
                return [colours.apply(_tiff_to_yx(series.asarray(), axes))]
            # read lazily, a cut file would fail only when a missing tile is drawn, mid-session
            _refuse_cut_short(path, series.levels[: count if every_level else 1])
        try:
            return [colours.apply(_lazy_level(path, axes, level)) for level in range(count if every_level else 1)]
        except Exception as error:  # e.g. zarr 2 beside a tifffile that needs zarr 3, or the reverse
            warnings.warn(
                f"{path.name} could not be opened lazily ({error}); reading it whole. For lazy reading "
                "install zarr>=3 with tifffile>=2025.5.21 (or zarr 2 with an older tifffile).",
                stacklevel=2,
            )
            return [read_image(path, labels)]
    except ImageFileError:
        raise
    except Exception as error:
        raise ImageFileError(f"could not read {path.name}: {error}") from None


def _refuse_cut_short(path: Path, levels) -> None:
    """Refuse a TIFF whose tiles or strips run past its end (an interrupted copy or download)."""
    size = path.stat().st_size
    beyond = total = 0
    for level in levels:
        for page in level.pages:
            if page is None:
                continue
            ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
            total += ends.size
            beyond += int((ends > size).sum())
    if beyond:
        raise ImageFileError(
            f"{path.name} is cut short: {beyond} of its {total} tiles or strips lie past the end of the file "
            "(an interrupted copy or download?); copy it again"
        )


def _lazy_level(path: Path, axes: str, level: int):
    import dask.array as da
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=0, level=level)
    return _tiff_to_yx(da.from_zarr(zarr.open(store, mode="r")), axes)


def _plane_geometry(reference: str | Path):
    """(spacing, origin, direction) of the 2-D plane of a SimpleITK-readable file, or of a TIFF
    that ``write_image`` gave one, in x, y order; None for any other file."""
    found = None if reference is None else _file_geometry(reference)
    if found is None:
        return None
    spacing, origin, direction = found  # napari's order: the plane's y, x last
    return tuple(spacing[-2:][::-1]), tuple(origin[-2:][::-1]), direction


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
    n = len(spacing)  # a plane's, or a labels volume's (``write_labels``)
    return (spacing, origin, direction) if n in (2, 3) and (len(origin), len(direction)) == (n, n * n) else None


def _placed(geometry) -> bool:
    """Whether a geometry places the pixels anywhere but at unit spacing from the origin."""
    spacing, origin, direction = geometry
    identity = np.eye(len(spacing)).ravel()
    return not (np.allclose(spacing, 1.0) and np.allclose(origin, 0.0) and np.allclose(direction, identity))


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
    directly as (spacing, origin, direction) in x, y order, or x, y, z for a volume (a 2-D one
    on (K, H, W) planes places each plane, a unit apart). ``class_names`` (labels) go into
    TIFF, MHA and NRRD headers and NIfTI's description, and mark the file as labels for the
    plugin's reader. ``planes``: a (K, H, W) stack, never a colour picture (an image 3 or 4
    pixels wide would look like one).

    The file is written under a temporary name beside it and then renamed, so a write that
    fails (a full disk, no permission) or is interrupted (Ctrl-C) leaves the file as it was,
    or absent, never half written; it raises ``ImageFileError`` in one line. SimpleITK's
    formats are written in a hidden folder beside it under their final names and moved from
    there: an .mhd's data file (X.raw, which its header names) first, then the header.
    """
    path = Path(path)
    data = np.asarray(data)
    suffix = suffix_of(path)
    if not data.dtype.isnative:  # big-endian data (from a big-endian TIFF): SimpleITK takes native order only
        data = data.astype(data.dtype.newbyteorder("="))
    if suffix not in TIFF_SUFFIXES:  # only TIFF holds half floats; SimpleITK holds no bool
        data = data.astype(np.float32) if data.dtype == np.float16 else data
        data = data.astype(np.uint8) if data.dtype == np.bool_ and suffix in ITK_SUFFIXES else data
    note = None if class_names is None else json.dumps(list(class_names))
    volume = _slice_volume(like) if geometry is None and suffix in ITK_SUFFIXES and data.ndim == 2 else None
    geometry = geometry if geometry is not None else _plane_geometry(like)
    target = path.resolve() if path.is_symlink() else path  # written through a link, as before
    existed = os.path.lexists(target)
    # a device or pipe is written into, never renamed over; SimpleITK's formats are written into a
    # private folder under their final names (an .mhd header names its data file) and moved from there
    partial = path if existed and not target.is_file() else _partial_name(target, suffix)
    options = dict(note=note, geometry=geometry, planes=planes, volume=volume, name=path.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if partial == path:
            _write(path, suffix, data, **options)
        elif suffix in ITK_SUFFIXES:
            _write_itk_into_place(target, partial, suffix, data, options)
        else:
            _write(partial, suffix, data, **options)
            replace_keeping_mode(partial, target)
    except OSError as error:
        if partial != path or not existed:
            _discard(partial)
        named = Path(error.filename) if error.filename else None  # a folder or file the user knows nothing of
        ours = named is None or named in (path, target, partial) or named.parent == partial
        where = "" if ours else f" ({error.filename})"
        reason = error.strerror or error
        if isinstance(error, FileExistsError) and not ours and not named.is_dir():  # mkdir of a folder that is a file
            reason = os.strerror(errno.ENOTDIR)
        # the path as given: its folder is often what went wrong (no permission, not a folder)
        raise ImageFileError(f"could not write {path}: {reason}{where}") from None
    except BaseException:
        if partial != path:
            _discard(partial)
        raise
    return path


def _partial_name(target: Path, suffix: str) -> Path:
    """A hidden name beside ``target`` with its suffix (the writers choose the format by it); for
    SimpleITK's formats a hidden folder, in which the file is written under its own name."""
    stem = target.name[: len(target.name) - len(suffix)]
    return target.with_name(f".{stem}.writing-{os.getpid()}" + ("" if suffix in ITK_SUFFIXES else suffix))


def _discard(partial: Path) -> None:
    """Remove a partial file or folder, if any; cleaning up never hides the error being reported
    (where the folder is a file, unlink raises ENOTDIR, which missing_ok does not cover)."""
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def _write_itk_into_place(target: Path, folder: Path, suffix: str, data: np.ndarray, options: dict) -> None:
    """Write a SimpleITK file in ``folder`` under ``target``'s stem and a lower-case suffix (NIfTI's
    writer refuses mixed case, MetaImage's lowers it), then move it over ``target``. An .mhd's data
    file goes first, then its header; a data file of ours that the old header named and the new
    one does not (an earlier version's hidden name) is removed."""
    folder.mkdir(exist_ok=True)  # a crashed run's of the same pid is only written over
    stem = target.name[: len(target.name) - len(suffix)]
    written = folder / f"{stem}{suffix}"
    _write(written, suffix, data, **options)
    if suffix == ".mhd":
        raw = _mhd_data_file(written)
        old = _mhd_data_file(target) if target.is_file() else None
        if raw is not None:
            replace_keeping_mode(raw, target.parent / raw.name)
        replace_keeping_mode(written, target)
        if old is not None and (raw is None or old.name != raw.name) and old.parent == target.parent:
            if re.fullmatch(rf"\.?{re.escape(stem)}(\.writing-\d+)?\.z?raw", old.name):
                old.unlink(missing_ok=True)
    else:
        replace_keeping_mode(written, target)
    shutil.rmtree(folder, ignore_errors=True)


def _slice_volume(like) -> tuple | None:
    """(spacing, origin, direction) in 3-D of a SimpleITK image of one slice (a plane exported
    from a CT or MR volume), so labels written like it keep its z; None for any other file."""
    if like is None or suffix_of(like) not in ITK_SUFFIXES or not Path(like).is_file():
        return None
    try:
        with _itk_reader(Path(like)) as reader:
            reader.ReadImageInformation()
    except Exception:  # unreadable: reported when its pixels are read
        return None
    if reader.GetDimension() != 3 or reader.GetSize()[2] != 1:
        return None
    return reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def _pil_refusal(suffix: str, data: np.ndarray, planes: bool = False) -> str | None:
    """Why Pillow cannot write ``data`` (integer labels already narrowed to uint8 or uint16) as
    PNG, JPEG or BMP, saying what to use instead; None where it can. ``planes``: never colour
    (a labels volume 3 slices wide is no RGB picture)."""
    kind = {".png": "PNG", ".bmp": "BMP"}.get(suffix, "JPEG")
    colour = data.ndim == 3 and data.shape[-1] in (3, 4) and not planes
    if data.ndim != 2 and not colour:
        return f"a {data.ndim}-D array does not fit a {kind}; save it as TIFF or NIfTI"
    if kind == "JPEG" and data.dtype == np.bool_:
        return "JPEG is lossy and would change mask values; save masks as TIFF or PNG"
    if kind == "JPEG" and np.issubdtype(data.dtype, np.integer) and data.ndim == 2:
        return "JPEG is lossy and would change label ids; save labels as TIFF or PNG"
    if data.dtype.kind == "f":
        return f"{kind} holds no floating-point pixels; save them as TIFF or NIfTI (or scale them to uint8)"
    if colour and data.dtype != np.uint8:
        return f"{kind} holds 8-bit colour only (uint8, 0-255); save it as TIFF or convert it to uint8"
    if kind == "JPEG" and data.shape[-1] == 4:
        return "JPEG holds no alpha; save RGBA images as PNG or TIFF"
    if kind == "BMP" and data.dtype == np.uint16:
        return "BMP holds 8-bit pixels; save values above 255 as PNG or TIFF"
    return None


def _write(path: Path, suffix: str, data: np.ndarray, note: str | None, geometry, planes: bool, volume=None,
           name: str | None = None) -> None:
    """Write ``data`` to ``path``; ``name`` is the user's file name, for messages."""
    name = name or path.name
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
                raise ImageFileError(f"{name}: labels above 65535 or below 0 do not fit a PNG; save as TIFF")
            data = data.astype(np.uint16 if data.max(initial=0) > 255 else np.uint8)
        if refusal := _pil_refusal(suffix, data, planes):
            raise ImageFileError(f"{name}: {refusal}")
        Image.fromarray(data).save(path)
        if not _pil_file_complete(path, suffix):  # Pillow's JPEG and BMP encoders miss a short write
            raise OSError("the file was cut short; is the disk full?")
    elif suffix in ITK_SUFFIXES:
        import SimpleITK as sitk

        # (H, W, 3 or 4): one RGB(A) plane of vector pixels, unless they are planes; one slice of a volume: 3-D
        vector = data.ndim == 3 and data.shape[-1] in (3, 4) and not planes
        out = sitk.GetImageFromArray(data[None] if volume is not None else data, isVector=vector)
        if note is not None:
            out.SetMetaData(LABELS_KEY, note)  # MHA, NRRD
            if suffix in NIFTI_SUFFIXES:  # NIfTI keeps only its 80-byte description
                fits = len(NIFTI_NOTE + note) < 80
                if not fits:
                    warnings.warn(
                        f"{name}: NIfTI's header has room for about 55 characters of class names, so they "
                        "are not saved (the ids are); save as .mha, .nrrd or .tif to keep them", stacklevel=4,
                    )
                out.SetMetaData("ITK_FileNotes", NIFTI_NOTE + (note if fits else "[]"))
        if volume is not None:
            out.SetSpacing(volume[0])
            out.SetOrigin(volume[1])
            out.SetDirection(volume[2])
        elif geometry is not None and len(geometry[0]) == out.GetDimension():  # a plane's, or a volume's
            out.SetSpacing(geometry[0])
            out.SetOrigin(geometry[1])
            out.SetDirection(geometry[2])
        elif geometry is not None and out.GetDimension() == 3:  # (K, H, W) probabilities: one plane per class
            (a, b), (c, d) = np.reshape(geometry[2], (2, 2))
            spacing, origin = (*geometry[0], 1.0), (*geometry[1], 0.0)  # the planes a unit apart
            direction = (a, b, 0.0, c, d, 0.0, 0.0, 0.0, 1.0)
            out.SetSpacing(spacing)
            out.SetOrigin(origin)
            out.SetDirection(direction)
        try:
            sitk.WriteImage(out, str(path))
        except RuntimeError as error:
            raise OSError(_itk_reason(error)) from None
        # SimpleITK's NIfTI, MHA and NRRD writers report no short write (a full disk): check the size
        problem = _nifti_problem(path, written=True) if suffix in NIFTI_SUFFIXES else None
        pixels = _mhd_data_file(path) if suffix == ".mhd" else path
        if suffix in (".mha", ".mhd", ".nrrd") and pixels is not None:
            size = pixels.stat().st_size if pixels.is_file() else 0
            if size < data.nbytes:
                problem = f"only {size} of its {data.nbytes} bytes of pixels were written"
        if problem:
            raise OSError(f"{problem}; is the disk full?")
    else:
        raise ImageFileError(f"{name}: unsupported format for writing; use .tif, .png or .nii.gz")


def _pil_file_complete(path: Path, suffix: str) -> bool:
    """Whether a written PNG ends in its IEND chunk, a JPEG in its end marker, a BMP at the size
    its header gives."""
    with open(path, "rb") as handle:
        head = handle.read(6)
        handle.seek(max(0, os.fstat(handle.fileno()).st_size - 12))
        tail = handle.read()
    if suffix == ".png":
        return tail == b"\0\0\0\0IEND\xaeB`\x82"
    if suffix in (".jpg", ".jpeg"):
        return tail.endswith(b"\xff\xd9")
    return len(head) == 6 and path.stat().st_size >= struct.unpack("<I", head[2:])[0]


# ------------------------------------------------------------------ npe2 reader / writer hooks


def napari_get_reader(path):
    """Reader contribution: TIFF with its axes handled, and the SimpleITK formats. napari passes
    a list of paths only to stack them (``viewer.open(paths, stack=True)``)."""
    paths = path if isinstance(path, list) else [path]
    if not paths or any(suffix_of(p) not in (*TIFF_SUFFIXES, *ITK_SUFFIXES) for p in paths):
        return None
    return _read_layers


def _read_layers(path):
    """Large TIFF images open lazily (``open_levels``): napari then reads only the tiles it shows,
    a pyramidal slide becomes a multiscale layer, and the Segment widget predicts tile by tile
    from full resolution. Labels are always read whole (level 0), because painting writes into them.
    Several paths become one layer, the files stacked along a new first axis."""
    paths = path if isinstance(path, list) else [path]
    layers = [_read_layer(p) for p in paths]
    return layers if len(layers) == 1 else [_stack_layers(paths, layers)]


def _read_layer(p) -> tuple:
    names = labels_note(p)
    # a palette or MinIsWhite mask keeps its stored ids instead of turning into a picture
    levels = _open(Path(p), None, every_level=True, labels=names is not None or _named_like_labels(p))
    data = levels[0]
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and _colour_last(p)
    kind = "labels" if names is not None or _looks_like_labels(p, data, rgb) else "image"
    meta = {"name": layer_name(p), **_placement(p, data.ndim - rgb)}
    if names:
        from .widgets.classes import class_colormap, class_features

        meta.update(features=class_features(names), colormap=class_colormap())
    if kind == "labels":
        data = np.asarray(data)
        data = data.astype(np.uint8) if data.dtype == np.bool_ else data  # napari paints no bool labels
    else:
        meta["rgb"] = rgb
        if len(levels) > 1:
            data, meta["multiscale"] = levels, True
    return data, meta, kind


def _stack_layers(paths: list, layers: list) -> tuple:
    """The layers of several files as one, along a new first axis (named and placed after the
    first file); files of other shapes or pixel kinds (integer, float) are refused."""
    first = Path(paths[0]).name
    full = [data[0] if meta.get("multiscale") else data for data, meta, _ in layers]  # full resolution
    group = {"b": "integer", "u": "integer", "i": "integer"}
    for p, data in zip(paths[1:], full[1:], strict=True):
        if data.shape != full[0].shape:
            raise ImageFileError(
                f"cannot stack {Path(p).name} on {first}: their shapes differ ({data.shape} and {full[0].shape})"
            )
        kinds = [group.get(d.dtype.kind, d.dtype.name) for d in (data, full[0])]
        if kinds[0] != kinds[1]:
            raise ImageFileError(f"cannot stack {Path(p).name} on {first}: {kinds[0]} and {kinds[1]} pixels")
    if all(isinstance(d, np.ndarray) for d in full):
        data = np.stack(full)
    else:  # lazily read slides stay lazy
        import dask.array as da

        data = da.stack(full)
    _, meta, _ = layers[0]
    kind = "labels" if all(k == "labels" for _, _, k in layers) else "image"
    dropped = ("multiscale",) if kind == "labels" else ("multiscale", "features", "colormap")  # a labels file's
    meta = {k: v for k, v in meta.items() if k not in dropped}
    if kind == "image":
        meta["rgb"] = all(m.get("rgb", False) for _, m, _ in layers)
    if "scale" in meta:  # the files' own place; one unit between them
        meta.update(scale=(1.0, *meta["scale"]), translate=(0.0, *meta["translate"]))
    return data, meta, kind


def layer_name(path) -> str:
    """A file's name without its format suffix only: run.2024.01.tif is run.2024.01."""
    name, suffix = Path(path).name, suffix_of(path)
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix) else name


def _colour_last(path) -> bool:
    """Whether the last axis holds colour: a TIFF's samples (YXS), not a third pixel axis ((K, H, W)
    planes of an image 3 or 4 pixels wide end in 3 or 4 too); a SimpleITK file's vector pixels of
    3 or 4 components, not a volume 3 or 4 voxels wide. Other formats: True."""
    suffix = suffix_of(path)
    try:
        if suffix in ITK_SUFFIXES:
            with _itk_reader(Path(path)) as reader:
                reader.ReadImageInformation()
            return reader.GetNumberOfComponents() in (3, 4)
        if suffix not in TIFF_SUFFIXES:
            return True
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = _first_series(tif, path)
            axes = "".join(a for a, n in zip(series.axes.upper(), series.shape, strict=True) if n > 1 or a in "YX")
    except Exception:  # unreadable headers are reported when the pixels are read
        return True
    return axes[-1:] in ("S", "C") or (len(axes) == 3 and axes[0] in "SC")


# whole words of a file name that mark it as labels, plural or numbered ("nuclei_masks2",
# StarDist's "mask2d"); "unlabeled" or "presegmentation" are no such word. camelCase parts count
# only as the long words ("nucleiMask", "cellLabels3"): "MoNuSeg" is no "seg"
_LONG_LABEL_WORDS = r"label(?:s|ed|led|map|maps)?|masks?|segmentations?|annotations?"
_NUMBERED = r"(?:\d+[a-z]*)?"
LABEL_WORDS = re.compile(rf"(?:{_LONG_LABEL_WORDS}|segs?|annos?|annotated){_NUMBERED}")
CAMEL_LABEL_WORDS = re.compile(rf"(?:{_LONG_LABEL_WORDS}){_NUMBERED}")


def _named_like_labels(path) -> bool:
    words = re.split(r"[_\-.\s]+", layer_name(path))
    if any(LABEL_WORDS.fullmatch(word.lower()) for word in words):
        return True
    parts = [part for word in words for part in re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", word).split()]
    return any(CAMEL_LABEL_WORDS.fullmatch(part.lower()) for part in parts)


def _looks_like_labels(path, data, rgb: bool) -> bool:
    """An integer or bool file named like labels, unless it is an RGB(A) picture ("masked tissue.tif")."""
    integer = data.dtype == np.bool_ or np.issubdtype(data.dtype, np.integer)
    return not rgb and integer and _named_like_labels(path)


def labels_note(path) -> list[str] | None:
    """The class names a file written by ``write_labels`` holds ([] when it holds none), or None
    for any other file."""
    suffix = suffix_of(path)
    try:
        if suffix in TIFF_SUFFIXES:
            note = _tiff_metadata(path).get(LABELS_KEY)
        elif suffix in ITK_SUFFIXES:
            with _itk_reader(Path(path)) as reader:
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


def _placement(path, ndim: int) -> dict:
    """napari's scale and translate for the ``ndim`` pixel axes a file opens with, from its
    spacing and origin: a SimpleITK volume's in full (z, y, x), a plane's (y, x), and (K, H, W)
    planes of probabilities unscaled along K. A direction other than the identity goes into
    the layer's metadata as its plane's 2 x 2 part, so labels saved from the layer keep it and
    overlay the image in ITK-SNAP or 3D Slicer (napari itself shows the pixels unrotated)."""
    geometry = _file_geometry(path)
    if geometry is None or ndim < 2:
        return {}
    spacing, origin, direction = geometry  # napari's order: ..., z, y, x
    spacing, origin = spacing[-ndim:], origin[-ndim:]
    pad = ndim - len(spacing)  # planes of a file placed in 2-D only
    placement = {"scale": (*(1.0,) * pad, *spacing), "translate": (*(0.0,) * pad, *origin)}
    if not np.allclose(direction, IDENTITY):
        placement["metadata"] = {DIRECTION_KEY: [float(v) for v in direction]}
    return placement


def pixel_size(path) -> tuple[float, float] | None:
    """The (row, col) size of a pixel where the file records one (NIfTI, MHA, NRRD, or a TIFF
    ``write_image`` wrote), else None: the units in which objects are measured."""
    geometry = _file_geometry(path)
    return None if geometry is None else tuple(float(v) for v in geometry[0][-2:])


def _file_geometry(path):
    """(spacing, origin) in napari's axis order of the axes ``read_image`` keeps, and the 2 x 2
    direction of the plane; None for a file without any (a TIFF not written by ``write_image``)."""
    if not Path(path).is_file():
        return None
    if suffix_of(path) in TIFF_SUFFIXES:
        found = _tiff_geometry(path)
        if found is None:
            return None
        (spacing, origin, direction), n = found, len(found[0])
        return spacing[::-1], origin[::-1], tuple(np.reshape(direction, (n, n))[:2, :2].ravel())
    if suffix_of(path) not in ITK_SUFFIXES:
        return None
    try:
        with _itk_reader(Path(path)) as reader:
            reader.ReadImageInformation()
    except Exception:  # unreadable headers are reported when the pixels are read
        return None
    n, size = reader.GetDimension(), reader.GetSize()[::-1]
    keep = [i for i, k in enumerate(size) if i >= n - 2 or k > 1]  # as read_image drops singleton stack axes
    spacing, origin = reader.GetSpacing()[::-1], reader.GetOrigin()[::-1]
    direction = np.asarray(reader.GetDirection()).reshape(n, n)[:2, :2]
    return tuple(spacing[i] for i in keep), tuple(origin[i] for i in keep), tuple(direction.ravel())


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """Writer contribution: a Labels layer (a plane or a volume) to TIFF, PNG or a SimpleITK
    format, ids unchanged; its class names, scale, translate and its image's direction go
    into TIFF and SimpleITK files (PNG keeps the ids only).

    A refusal is raised as ``OSError``: napari swallows a writer's ``ValueError``.
    """
    if attributes.get("multiscale") or isinstance(data, list | tuple):
        data = data[0]  # full resolution: np.asarray of napari's MultiScaleData is its smallest level
    data = np.asarray(data)
    names = _feature_class_names(attributes.get("features"))
    n = data.ndim
    # napari's (z,) y, x order reversed into the files' x, y (, z); 2-D and 3-D: what TIFF geometry holds
    scale = [float(v) for v in attributes.get("scale", (1.0,) * n)[-n:]][::-1]
    translate = [float(v) for v in attributes.get("translate", (0.0,) * n)[-n:]][::-1]
    # the image's direction as the reader keeps it: its plane's (x, y), any further axis unrotated
    found = np.asarray((attributes.get("metadata") or {}).get(DIRECTION_KEY, IDENTITY), float)
    direction = np.eye(n)
    if found.size == 4 and n >= 2:
        direction[:2, :2] = found.reshape(2, 2)
    geometry = (scale, translate, tuple(direction.ravel().tolist()))
    try:
        return [str(write_image(path, data, geometry=geometry, class_names=names or [], planes=True))]
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
