"""Objects coloured by one of their measurements (QuPath's "measurement maps"), numpy only.

No Qt or napari here: the Segment widget gives the colormap's lookup table (napari's
viridis) and turns the colours into a ``DirectLabelColormap``. A column's values are scaled
between robust limits (its 2nd and 98th percentiles) so that one huge or tiny object does
not wash the others out; values beyond them take the colormap's ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ROBUST_PERCENTILES = (2.0, 98.0)
NO_VALUE_COLOUR = (0.5, 0.5, 0.5, 1.0)  # an object without a value (NaN: no outline to measure, say)
UNMEASURED_COLOUR = (1.0, 0.0, 1.0, 1.0)  # an id painted since the table was made: magenta, not on viridis
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)

# columns of the table that are ids, positions or flags, not measurements to colour by
NOT_MEASUREMENTS = frozenset({
    "id", "index", "class_id", "centroid_row", "centroid_col", "min_row", "min_col", "max_row", "max_col",
    "touches_edge",
})
# the measurements the pixel size relabels (ObjectTable.columns: "<stem>_px" beside "<stem>_<unit>")
_MEASURED_IN_UNITS = ("area_", "equivalent_diameter_", "perimeter_", "major_axis_length_", "minor_axis_length_")


@dataclass(frozen=True)
class MeasurementColours:
    """One RGBA colour per object (``colours``, in the values' order) and the scale used:
    ``low`` is shown in the colormap's first colour, ``high`` in its last (equal when every
    value is the same: they all take the middle colour; None when no object has a value).
    ``missing``: how many objects have no value (NaN), shown in ``NO_VALUE_COLOUR``."""

    colours: np.ndarray  # (n, 4) float32
    low: float | None
    high: float | None
    missing: int


def measurement_columns(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The columns objects can be coloured by, in the table's order: numeric ones (not yes/no
    flags), without the ids, class ids, centroids and bounding boxes."""
    chosen = {}
    for name, values in columns.items():
        values = np.asarray(values)
        if name not in NOT_MEASUREMENTS and values.ndim == 1 and values.dtype.kind in "iuf":
            chosen[name] = values
    return chosen


def follow_column(name: str, names: Sequence[str]) -> str | None:
    """The column that holds ``name``'s measurement once the pixel size relabelled the table:
    ``name`` itself; else the same measurement in the new unit ("area_scaled" -> "area_um2");
    else in pixels ("area_um2" -> "area_px"); None when the table no longer has it."""
    if name in names:
        return name
    if name.endswith("_px") or not name.startswith(_MEASURED_IN_UNITS):
        return None
    stem = name.rsplit("_", 1)[0]
    for other in names:
        if not other.endswith("_px") and other.rsplit("_", 1)[0] == stem:
            return other
    return f"{stem}_px" if f"{stem}_px" in names else None


def robust_limits(values: np.ndarray, percentiles: tuple[float, float] = ROBUST_PERCENTILES
                  ) -> tuple[float, float] | None:
    """The values at the two percentiles of the finite values; None when there is none."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, percentiles)
    return float(low), float(high)


def colour_by_values(values: np.ndarray, lookup: np.ndarray,
                     percentiles: tuple[float, float] = ROBUST_PERCENTILES) -> MeasurementColours:
    """Each value's colour in ``lookup`` ((m, 3) or (m, 4) colours from dark to bright, e.g.
    viridis' 256), scaled between the values' robust limits: the nearest of its colours, so a
    slide's objects share at most m colours. NaN gets ``NO_VALUE_COLOUR``."""
    values = np.asarray(values, np.float64)
    lookup = np.asarray(lookup, np.float32)
    if lookup.shape[1] == 3:
        lookup = np.concatenate([lookup, np.ones((len(lookup), 1), np.float32)], axis=1)
    last = len(lookup) - 1
    missing = np.isnan(values)
    limits = robust_limits(values, percentiles)
    if limits is None:
        position = np.zeros(values.shape, np.intp)
    else:
        low, high = limits
        if high > low:
            with np.errstate(invalid="ignore"):
                scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
            position = np.rint(np.nan_to_num(scaled) * last).astype(np.intp)
        else:  # one value (or nearly all one): it takes the middle, any others the ends
            position = np.where(values > high, last, np.where(values < low, 0, last // 2))
    colours = lookup[position]
    colours[missing] = NO_VALUE_COLOUR
    low, high = limits if limits is not None else (None, None)
    return MeasurementColours(colours, low, high, int(missing.sum()))


def colour_table(ids: np.ndarray, colours: np.ndarray) -> dict:
    """A labels colormap's ``{id: RGBA}``: each object's colour, id 0 (background) transparent,
    and under ``None`` the colour of ids not in the table (painted since it was made)."""
    table: dict = dict(zip(np.asarray(ids).tolist(), colours, strict=True))
    table[0] = np.array(TRANSPARENT, np.float32)
    table[None] = np.array(UNMEASURED_COLOUR, np.float32)
    return table


def scale_text(column: str, coloured: MeasurementColours) -> str:
    """How to read the colours: "circularity: dark 0.61 … bright 0.98" (and what grey is)."""
    if coloured.low is None:
        text = f"{column}: no object has a value"
    elif coloured.low == coloured.high:
        text = f"{column}: {number_text(coloured.low)} (almost) everywhere"
    else:
        text = f"{column}: dark {number_text(coloured.low)} … bright {number_text(coloured.high)}"
    if coloured.missing and coloured.low is not None:
        text += f"; grey: no value ({coloured.missing})"
    return text


def number_text(value: float) -> str:
    """A limit as people read it: 0.61, 12.5, 1234 (not 1.23e+03), 2.1e-05."""
    size = abs(value)
    if size >= 1000 or value == int(value):
        return f"{value:.0f}"
    if size >= 0.01 or math.isclose(size, 0.0):
        return f"{value:.3g}"
    return f"{value:.2g}"
