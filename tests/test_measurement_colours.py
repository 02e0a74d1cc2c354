"""Objects coloured by a measurement: the numpy part (values -> one colour per id, scaled between
robust limits) and the napari colormap the Segment widget makes of it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_selfreg.widgets.measurement_colours import (
    NO_VALUE_COLOUR,
    TRANSPARENT,
    UNMEASURED_COLOUR,
    colour_by_values,
    colour_table,
    follow_column,
    measurement_columns,
    number_text,
    robust_limits,
    scale_text,
)

# a ramp of 11 colours whose red channel is its own position: colours read back as positions
RAMP = np.stack([np.linspace(0, 1, 11), np.zeros(11), 1 - np.linspace(0, 1, 11)], axis=1)


def _positions(colours: np.ndarray) -> np.ndarray:
    return np.rint(colours[:, 0] * 10).astype(int)


def test_values_are_scaled_between_their_2nd_and_98th_percentiles():
    values = np.concatenate([np.arange(101.0), [np.nan, 10_000.0, -500.0]])  # two outliers, one without a value
    coloured = colour_by_values(values, RAMP)
    low, high = np.percentile(values[np.isfinite(values)], [2, 98])
    assert (coloured.low, coloured.high) == (pytest.approx(low), pytest.approx(high))
    assert coloured.missing == 1 and coloured.colours.shape == (104, 4) and coloured.colours.dtype == np.float32
    positions = _positions(coloured.colours)
    assert positions[-1] == 0 and positions[-2] == 10  # the outliers take the ends, not the scale
    assert positions[0] == 0 and positions[100] == 10
    expected = np.rint(np.clip((values[:101] - low) / (high - low), 0, 1) * 10)
    np.testing.assert_array_equal(positions[:101], expected)  # the nearest of the ramp's colours
    assert np.all(np.diff(positions[:101]) >= 0)
    np.testing.assert_array_equal(coloured.colours[101], NO_VALUE_COLOUR)  # NaN: grey
    np.testing.assert_array_equal(coloured.colours[:101, 3], 1.0)  # RGB lookups get an opaque alpha


def test_one_value_gives_one_colour_and_no_value_gives_grey():
    same = colour_by_values(np.full(7, 3.5), RAMP)
    assert same.low == same.high == 3.5
    assert len(np.unique(same.colours, axis=0)) == 1 and _positions(same.colours)[0] == 5  # the middle
    assert scale_text("area_px", same) == "area_px: 3.5 (almost) everywhere"
    mostly = colour_by_values(np.array([1.0] * 98 + [0.0, 9.0]), RAMP)  # the limits meet: the rest at the ends
    np.testing.assert_array_equal(_positions(mostly.colours)[-3:], [5, 0, 10])
    empty = colour_by_values(np.array([np.nan, np.nan]), RAMP)
    assert empty.low is None and empty.missing == 2
    np.testing.assert_array_equal(empty.colours, [NO_VALUE_COLOUR] * 2)
    assert scale_text("circularity", empty) == "circularity: no object has a value"
    assert robust_limits(np.array([np.inf, np.nan])) is None
    assert colour_by_values(np.array([], float), RAMP).colours.shape == (0, 4)


def test_the_scale_is_said_as_people_read_numbers():
    coloured = colour_by_values(np.linspace(0.61, 0.98, 2), RAMP, percentiles=(0, 100))
    assert scale_text("circularity", coloured) == "circularity: dark 0.61 … bright 0.98"
    with_nan = colour_by_values(np.array([20.0, 30.0, np.nan]), RAMP, percentiles=(0, 100))
    assert scale_text("area_px", with_nan) == "area_px: dark 20 … bright 30; grey: no value (1)"
    assert [number_text(v) for v in (1234.56, 12.345, 0.0123, 2.1e-5, -3.0)] == ["1235", "12.3", "0.0123",
                                                                                "2.1e-05", "-3"]


def test_only_measurements_are_offered():
    columns = {
        "id": np.arange(3), "class_id": np.ones(3, int), "area_px": np.array([4, 5, 6]),
        "equivalent_diameter_px": np.ones(3), "circularity": np.ones(3), "solidity": np.ones(3),
        "centroid_row": np.ones(3), "centroid_col": np.ones(3), "min_row": np.zeros(3, int),
        "min_col": np.zeros(3, int), "max_row": np.ones(3, int), "max_col": np.ones(3, int),
        "touches_edge": np.zeros(3, bool), "class_name": np.array(["a", "b", "c"]), "mean_red": np.ones(3),
    }
    assert list(measurement_columns(columns)) == ["area_px", "equivalent_diameter_px", "circularity", "solidity",
                                                  "mean_red"]  # the table's order; a new measurement too


def test_a_measurement_is_followed_when_the_pixel_size_renames_it():
    pixels = ["area_px", "equivalent_diameter_px", "perimeter_px", "circularity"]
    micrometres = ["area_px", "area_um2", "equivalent_diameter_px", "equivalent_diameter_um", "circularity"]
    scaled = ["area_px", "area_scaled", "major_axis_length_px", "major_axis_length_scaled"]
    assert follow_column("circularity", pixels) == "circularity"
    assert follow_column("area_scaled", micrometres) == "area_um2"
    assert follow_column("equivalent_diameter_um", pixels) == "equivalent_diameter_px"
    assert follow_column("major_axis_length_um", scaled) == "major_axis_length_scaled"
    assert follow_column("perimeter_um", micrometres) is None  # not square pixels: no perimeter in units
    assert follow_column("perimeter_px", micrometres) is None
    assert follow_column("mean_red", pixels) is None  # the image is gone


def test_the_colour_table_has_background_and_unmeasured_ids():
    coloured = colour_by_values(np.array([1.0, 2.0, 3.0]), RAMP, percentiles=(0, 100))
    table = colour_table(np.array([3, 7, 40]), coloured.colours)
    assert sorted(k for k in table if k is not None) == [0, 3, 7, 40]
    np.testing.assert_array_equal(table[0], TRANSPARENT)
    np.testing.assert_array_equal(table[None], UNMEASURED_COLOUR)
    np.testing.assert_array_equal(table[40], coloured.colours[2])
    assert all(value.dtype == np.float32 and value.shape == (4,) for value in table.values())


def test_a_slides_objects_are_coloured_at_once():
    """50 000 objects: the colours and napari's colormap of them in well under a second (about
    0.01 s and 0.02 s here), and the colormap shows each object's colour."""
    pytest.importorskip("napari")
    from napari.utils.colormaps import ensure_colormap

    from napari_selfreg.widgets.segment_widget import _direct_colormap

    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(65_536, 50_000, replace=False)) + 1  # napari without numba: ids <= 2**16
    values = rng.gamma(3.0, 40.0, ids.size)
    values[::97] = np.nan
    viridis = np.asarray(ensure_colormap("viridis").colors)
    began = time.perf_counter()
    coloured = colour_by_values(values, viridis)
    colormap = _direct_colormap(colour_table(ids, coloured.colours))
    assert time.perf_counter() - began < 1.0
    np.testing.assert_allclose(colormap.map(ids), coloured.colours)  # napari reads the colours given
    np.testing.assert_allclose(colormap.map(np.array([0, 10**7])), [TRANSPARENT, UNMEASURED_COLOUR])
    assert len(np.unique(coloured.colours, axis=0)) <= 257  # viridis' 256 and grey: a small texture
    np.testing.assert_allclose(coloured.colours[np.nanargmax(values)], viridis[-1])
    np.testing.assert_allclose(coloured.colours[np.nanargmin(values)], viridis[0])
