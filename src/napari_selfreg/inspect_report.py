"""``napari-selfreg inspect``: per-block redundancy maps and figures of one or two models, on disk.

Writes into the output folder:

- ``redundancy.json``: per block the redundancy index and the numbers behind the maps
  (``{"blocks": [{"name", "redundancy_index", ...}], ...}``), and the same for the compared
  model under ``"compare"``;
- ``<block>_redundancy.tif``, ``<block>_scr.tif``, ``<block>_ifd.tif``: float32 maps with
  the image's (or the region's) height and width, values in [0, 1];
- ``<block>_features.png``: the first three principal components of the block as RGB;
- ``redundancy.png``: the index per block as bars, and each block's channel-similarity
  heatmap (the view of the SelfReg paper's Figure 1c);
- ``compare/``: the compared model's maps, under the same names.

A rerun into the same folder removes the maps the earlier ``redundancy.json`` lists and it
does not rewrite; other files in the folder are left alone.

SCR and IFD distances have no natural upper bound, so their maps are divided by a per-block
scale (``scr_scale`` / ``ifd_scale`` in the JSON: the 99th percentile of the raw distance
over the image, shared by both models when comparing, so paired maps use one colour scale)
and clipped to [0, 1]: raw distance = value x scale wherever the value is below 1.

The plotting helpers here need only numpy and matplotlib, so the dock widget uses them too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .core.redundancy import RedundancyReport

SCALE_PERCENTILE = 99.0
SCALING_NOTE = (
    "redundancy maps: the redundancy index in windows of `window` block pixels, in [0, 1] as computed. "
    "SCR / IFD maps: per-pixel mean squared distance divided by the block's scr_scale / ifd_scale "
    f"(the {SCALE_PERCENTILE:g}th percentile of the raw distance over the image, shared by the compared "
    "models) and clipped to [0, 1]; raw = value * scale where value < 1."
)


# ----------------------------------------------------------------------------- figures


def plot_index_bars(ax, reports: Sequence[RedundancyReport], labels: Sequence[str]) -> None:
    """Grouped bars: the redundancy index per block, one colour per model."""
    names = list(reports[0].names)
    width = 0.8 / len(reports)
    x = np.arange(len(names))
    for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
        values = [report.indices().get(n, np.nan) for n in names]
        ax.bar(x + (i - (len(reports) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"redundancy index ({reports[0].similarity})")
    ax.set_title("channel redundancy per block")
    if len(reports) > 1:
        ax.legend(fontsize="small")


def plot_similarity(ax, similarity: np.ndarray, title: str, colorbar: bool = False):
    """The |channel similarity| heatmap of one block on a 0..1 scale."""
    image = ax.imshow(np.abs(similarity), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return image


def redundancy_figure(reports: Sequence[RedundancyReport], labels: Sequence[str]):
    """A matplotlib Figure (no pyplot, so no GUI backend): bars on top, then one row of
    heatmaps per model."""
    from matplotlib.figure import Figure

    names = reports[0].names
    cols = len(names)
    rows = 1 + len(reports)
    figure = Figure(figsize=(max(8.0, 1.6 * cols), 3.2 + 1.9 * len(reports)), layout="constrained")
    grid = figure.add_gridspec(rows, cols, height_ratios=[1.8] + [1.0] * len(reports))
    plot_index_bars(figure.add_subplot(grid[0, :]), reports, labels)
    image = None
    for r, (report, label) in enumerate(zip(reports, labels, strict=True)):
        for c, name in enumerate(names):
            ax = figure.add_subplot(grid[1 + r, c])
            block = report.block(name)
            image = plot_similarity(ax, block.similarity, f"{name} {block.redundancy_index:.2f}")
            if c == 0:
                ax.set_ylabel(label, fontsize="small")
    if image is not None:
        figure.colorbar(image, ax=figure.axes[1:], shrink=0.8, label="|channel similarity|")
    return figure


# ----------------------------------------------------------------------------- files


def _write_maps(report: RedundancyReport, folder: Path, scales: dict[str, dict[str, float]]) -> dict[str, dict]:
    from PIL import Image

    from .io import write_image

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    for name in report.names:
        entry = {}
        for kind in ("redundancy", "scr", "ifd"):
            scale = scales[kind][name] if kind != "redundancy" else None
            path = folder / f"{name}_{kind}.tif"
            write_image(path, report.image_map(name, kind, scale).astype(np.float32))
            entry[kind] = path.name
        if report.block(name).features_rgb is not None:
            path = folder / f"{name}_features.png"
            Image.fromarray(report.features_image(name)).save(path)
            entry["features"] = path.name
        files[name] = entry
    return files


def _block_entries(report: RedundancyReport, scales, files) -> list[dict]:
    entries = []
    for block in report.blocks:
        entry = block.summary()
        entry["scr_scale"] = scales["scr"][block.name]
        entry["ifd_scale"] = scales["ifd"][block.name]
        entry["files"] = files[block.name]
        entries.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()})
    return entries


REPORT_FILE = re.compile(r"^(redundancy\.(json|png)|[A-Z]\d+_(redundancy|scr|ifd)\.tif|[A-Z]\d+_features\.png)$")


def check_inputs_outside_report(out_dir: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an input that the report would overwrite: a file of the report's names in the
    output folder or its ``compare/`` folder (the folder itself may hold other files)."""
    from .core.data import InputError

    folders = {Path(out_dir).resolve(), (Path(out_dir) / "compare").resolve()}
    for option, path in inputs.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved.parent in folders and REPORT_FILE.match(resolved.name):
            raise InputError(
                f"{option} {path} would be overwritten by the report written into {out_dir}; give --out another folder"
            )


def _earlier_report_files(out: Path) -> set[Path]:
    """The map files an earlier report in ``out`` lists. Those this run does not rewrite (a
    deeper model's blocks, a compared model left out now) are removed after it, so the folder
    never holds two reports' maps under one ``redundancy.json``; files it does not list, the
    user's own, are never touched."""
    try:
        document = json.loads((out / "redundancy.json").read_text())
        sections = [(out, document.get("blocks") or [])]
        if isinstance(document.get("compare"), dict):
            sections.append((out / "compare", document["compare"].get("blocks") or []))
        return {
            folder / name
            for folder, blocks in sections
            for block in blocks
            for name in (block.get("files") or {}).values()
            if isinstance(name, str) and REPORT_FILE.match(name)  # a bare report name, never a path
        }
    except (OSError, ValueError, AttributeError, TypeError):  # no report there, or not ours
        return set()


def _remove_stale(earlier: set[Path], written: set[Path], compare: Path) -> None:
    for path in earlier - written:
        path.unlink(missing_ok=True)
    if compare not in {p.parent for p in written} and compare.is_dir() and not any(compare.iterdir()):
        compare.rmdir()


def run_inspect(
    model_path: str | Path,
    image_path: str | Path,
    out_dir: str | Path,
    compare_path: str | Path | None = None,
    device: str = "auto",
    region: tuple[int, int, int, int] | None = None,
    similarity: str = "cosine",
    window: int = 16,
    progress=None,
) -> Path:
    """Compute and write everything listed in the module docstring; returns the JSON's path.

    ``region`` is (top, left, bottom, right) in image pixels; the maps then have the region's
    size. ``progress`` (optional) is called with each ``RedundancyProgress``. User errors
    raise ``InputError``, ``ModelFileError`` or ``ImageFileError`` with a readable message.
    """
    from .core.checkpoint import load_model
    from .core.data import InputError, as_channels_last
    from .core.device import resolve_device
    from .core.progress import drain
    from .core.redundancy import RedundancyConfig, compute_redundancy, map_scale
    from .io import check_planar, read_image

    try:
        torch_device = resolve_device(device)
    except ValueError as error:
        raise InputError(str(error)) from None
    check_inputs_outside_report(out_dir, {"--image": image_path, "--model": model_path, "--compare": compare_path})
    paths = [Path(model_path)] + ([Path(compare_path)] if compare_path is not None else [])
    models = [load_model(p, device=torch_device) for p in paths]
    if len(models) == 2 and models[0].config.depth != models[1].config.depth:
        raise InputError(  # before minutes of computing what cannot be paired
            f"the models have depths {models[0].config.depth} and {models[1].config.depth}; "
            "compare models of the same depth"
        )
    check_planar(image_path)
    image = as_channels_last(read_image(image_path))
    config = RedundancyConfig(similarity=similarity, window=window, device=str(torch_device))

    reports = [drain(compute_redundancy(model, image, config, region), progress) for model in models]

    out = Path(out_dir)
    earlier = _earlier_report_files(out)
    out.mkdir(parents=True, exist_ok=True)
    names = reports[0].names
    scales = {
        kind: {n: map_scale(reports, n, kind, SCALE_PERCENTILE) for n in names} for kind in ("scr", "ifd")
    }
    labels = [p.stem for p in paths]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (model)", f"{labels[1]} (compare)"]

    first = reports[0]
    document = {
        "model": str(paths[0]),
        "image": str(image_path),
        "image_shape": list(first.image_shape),
        "region": list(first.region),
        "map_shape": list(first.region_shape),
        "similarity": first.similarity,
        "window": first.window,
        "device": str(torch_device),
        "blocks": _block_entries(first, scales, written := _write_maps(first, out, scales)),
        "scaling": SCALING_NOTE,
        "scale_percentile": SCALE_PERCENTILE,
        "seconds": first.seconds,
        "settings": first.settings,
        "figure": "redundancy.png",
    }
    files = {out / name for entry in written.values() for name in entry.values()}
    if len(reports) == 2:
        second = reports[1]
        compared = _write_maps(second, out / "compare", scales)
        files |= {out / "compare" / name for entry in compared.values() for name in entry.values()}
        document["compare"] = {
            "model": str(paths[1]),
            "folder": "compare",
            "blocks": _block_entries(second, scales, compared),
            "seconds": second.seconds,
        }
    figure = redundancy_figure(reports, labels)
    figure.savefig(out / "redundancy.png", dpi=110)
    path = out / "redundancy.json"
    path.write_text(json.dumps(document, indent=2))
    _remove_stale(earlier, files, out / "compare")
    return path
