"""Per-object measurements (core.measurements) and ``predict --measurements``: exact values on
hand-built maps, the same table whatever the band and the array type, agreement with
skimage's regionprops on a real MoNuSeg mask, and the CSV the command line writes."""

from __future__ import annotations

import csv
import json
import math
import threading

import numpy as np
import pytest
import tifffile

from napari_selfreg.core.data import InputError
from napari_selfreg.core.measurements import (
    MeasureProgress,
    class_summary,
    measure_objects,
    measure_to_end,
    write_csv,
)
from napari_selfreg.core.progress import drain


def _hand_built():
    """Four objects with sparse ids (3, 7, 40, 1000) on a 10 x 12 map; classes 2 and 3."""
    instances = np.zeros((10, 12), np.int32)
    classes = np.ones((10, 12), np.uint8)
    instances[0:2, 0:3] = 7  # 6 px, top-left corner: touches the edge
    instances[4:7, 5:7] = 3  # 6 px, inside
    instances[5, 7] = 3  # 7 px now: centroid (5, 40/7)
    instances[9, 11] = 40  # 1 px, bottom-right corner
    instances[3:8, 9] = 1000  # 5 px column, not at the edge (col 9 of 12)
    classes[instances > 0] = 2
    classes[9, 11] = 3
    classes[3:6, 9] = 3  # object 1000: 3 pixels of class 3, 2 of class 2 -> class 3
    return instances, classes


def test_hand_built_objects_have_their_exact_measurements():
    instances, classes = _hand_built()
    table = measure_to_end(instances, classes)
    assert table.complete and len(table) == 4 and table.shape == (10, 12)
    np.testing.assert_array_equal(table.ids, [3, 7, 40, 1000])  # only the ids present, in order
    np.testing.assert_array_equal(table.class_ids, [2, 2, 3, 3])
    np.testing.assert_array_equal(table.area, [7, 6, 1, 5])
    np.testing.assert_allclose(table.centroid, [[5.0, 40 / 7], [0.5, 1.0], [9.0, 11.0], [5.0, 9.0]], rtol=0, atol=1e-12)
    # min_row, min_col, max_row, max_col: the max exclusive
    np.testing.assert_array_equal(table.bbox, [[4, 5, 7, 8], [0, 0, 2, 3], [9, 11, 10, 12], [3, 9, 8, 10]])
    np.testing.assert_array_equal(table.touches_edge, [False, True, True, False])
    np.testing.assert_allclose(table.equivalent_diameter, np.sqrt(4 * np.array([7, 6, 1, 5]) / math.pi))
    assert table.spacing is None and table.area_scaled is None
    columns = table.columns()
    assert list(columns) == ["id", "class_id", "area_px", "equivalent_diameter_px", "perimeter_px",
                             "major_axis_length_px", "minor_axis_length_px", "eccentricity", "circularity",
                             "solidity", "centroid_row", "centroid_col", "min_row", "min_col", "max_row", "max_col",
                             "touches_edge"]
    assert all(len(v) == 4 for v in columns.values())


def test_hand_built_objects_have_their_exact_shapes():
    """The shape columns by hand: Crofton's perimeter of a pixel is the sum of the weights of the
    four windows it is a corner of; a 2 x 3 block's second moments are those of its rows and
    columns; a one-pixel-wide bar is a line (eccentricity 1); a pixel has no axes."""
    instances, classes = _hand_built()
    table = measure_to_end(instances, classes)
    pixel = math.pi / 2 * (1 + 1 / math.sqrt(2))  # windows coded 1, 2, 8 and 4 (weight 0)
    assert table.perimeter[2] == pytest.approx(pixel, rel=1e-12)
    # object 7 (rows 0-1, cols 0-2): row variance 1/4, column variance 2/3, no covariance
    major, minor = table.ellipse_axes()
    assert major[1] == pytest.approx(4 * math.sqrt(2 / 3)) and minor[1] == pytest.approx(4 * math.sqrt(1 / 4))
    assert table.eccentricity[1] == pytest.approx(math.sqrt(1 - (1 / 4) / (2 / 3)))
    # object 1000: 5 pixels in one column, row variance 2; object 40: one pixel
    assert (major[3], minor[3], table.eccentricity[3]) == (pytest.approx(4 * math.sqrt(2)), 0.0, 1.0)
    assert (major[2], minor[2], table.eccentricity[2]) == (0.0, 0.0, 0.0)
    # a pixel's estimated outline is short for its area: capped at 1; the bar is far from round
    assert table.circularity[2] == 1.0
    assert table.circularity[3] == pytest.approx(4 * math.pi * 5 / table.perimeter[3] ** 2)
    assert table.circularity[3] < 0.7
    # all four are convex as pixels go: the hull of object 3's pixel edge midpoints (a 3 x 2 block and
    # a pixel beside its middle row) passes outside the pixel centres (4, 7) and (6, 7)
    np.testing.assert_array_equal(table.convex_area, [7, 6, 1, 5])
    np.testing.assert_array_equal(table.solidity, [1, 1, 1, 1])


def test_circularity_and_eccentricity_of_digital_discs_ellipses_and_touching_objects():
    """A disc is round (circularity within 6 % of 1 from radius 3 up, eccentricity ~0); an
    ellipse of axes 2a and 2b has eccentricity sqrt(1 - b^2/a^2); objects that touch are each
    measured whole, as when alone."""
    from skimage.draw import disk, ellipse

    for radius in (3, 5, 12, 30):
        instances = np.zeros((2 * radius + 9,) * 2, np.int32)
        instances[disk((radius + 4, radius + 4), radius + 0.5)] = 9
        table = measure_to_end(instances, band=4)
        assert abs(table.circularity[0] - 1) < 0.06 and table.eccentricity[0] < 1e-6, radius
    instances = np.zeros((90, 90), np.int32)
    instances[ellipse(45, 45, 30.5, 10.5)] = 1  # long axis along the rows
    alone = measure_to_end(instances, band=7)
    assert alone.eccentricity[0] == pytest.approx(math.sqrt(1 - (10.5 / 30.5) ** 2), abs=0.01)
    assert alone.ellipse_axes()[0][0] == pytest.approx(61, rel=0.01)
    a, b = 30.5, 10.5  # the continuous ellipse: Ramanujan's perimeter, circularity 0.677
    h = ((a - b) / (a + b)) ** 2
    outline = math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))
    assert alone.circularity[0] == pytest.approx(4 * math.pi * math.pi * a * b / outline**2, abs=0.02)
    touching = instances.copy()
    touching[:, 46:][touching[:, 46:] == 1] = 2  # cut in two halves that touch along a column
    touching[10:80, 56:70] = 3  # and a block beside them
    halves = measure_to_end(touching, band=5)
    for k, object_id in enumerate(halves.ids):
        single = measure_to_end(np.where(touching == object_id, object_id, 0))
        assert halves.perimeter[k] == pytest.approx(single.perimeter[0], rel=1e-12), object_id


def test_a_class_tie_takes_the_smaller_class_and_no_class_map_gives_0():
    instances = np.zeros((4, 4), np.uint16)
    instances[1, 1:3] = 5
    classes = np.ones((4, 4), np.uint8)
    classes[1, 1], classes[1, 2] = 4, 2
    assert measure_to_end(instances, classes).class_ids.tolist() == [2]
    assert measure_to_end(instances).class_ids.tolist() == [0]
    mask = instances > 0  # a boolean class map: True = structure, read as id 2 (as the split reads it)
    assert measure_to_end(instances, mask).class_ids.tolist() == [2]


def test_a_pixel_size_adds_areas_and_diameters_in_its_units():
    instances, classes = _hand_built()
    table = measure_to_end(instances, classes, spacing=(0.5, 0.25))
    assert table.spacing == (0.5, 0.25)
    np.testing.assert_allclose(table.area_scaled, [7 / 8, 6 / 8, 1 / 8, 5 / 8])
    np.testing.assert_allclose(table.equivalent_diameter_scaled, np.sqrt(4 * np.array([7, 6, 1, 5]) / 8 / math.pi))
    assert list(table.columns())[3:6] == ["area_scaled", "equivalent_diameter_px", "equivalent_diameter_scaled"]
    # a known unit names the columns, and then a size of 1 is a size
    in_um = measure_to_end(instances, classes, spacing=(1.0, 1.0), unit="um")
    assert in_um.spacing == (1.0, 1.0) and in_um.unit == "um"
    assert list(in_um.columns())[3:6] == ["area_um2", "equivalent_diameter_px", "equivalent_diameter_um"]
    np.testing.assert_array_equal(in_um.columns()["area_um2"], [7, 6, 1, 5])
    # lengths along the outline need square pixels; the ellipse's axes are taken in the pixel size's frame
    assert "perimeter_scaled" not in table.columns() and "perimeter_px" in table.columns()
    # object 7: in pixels the columns spread more (2/3 against 1/4); in 0.5 x 0.25 pixels, the rows
    np.testing.assert_allclose(table.columns()["major_axis_length_scaled"][[1, 3]],
                               [4 * math.sqrt(1 / 4 * 0.5**2), 4 * math.sqrt(2 * 0.5**2)])
    square = measure_to_end(instances, classes, spacing=(0.5, 0.5), unit="um")
    np.testing.assert_allclose(square.columns()["perimeter_um"], square.perimeter / 2)
    np.testing.assert_allclose(square.columns()["minor_axis_length_um"], square.ellipse_axes()[1] / 2)
    np.testing.assert_array_equal(square.columns()["eccentricity"], measure_to_end(instances, classes).eccentricity)
    with pytest.raises(InputError, match="above 0"):
        measure_to_end(instances, classes, spacing=(0.0, 0.5), unit="um")
    # a layer's scale of ones (or a volume's, of which the plane's two count) is pixels
    assert measure_to_end(instances, classes, spacing=(1.0, 1.0)).spacing is None
    assert measure_to_end(instances, classes, spacing=(3.0, 1.0, 1.0)).spacing is None
    assert measure_to_end(instances, classes, spacing=(3.0, 2.0, 1.0)).spacing == (2.0, 1.0)


def test_the_per_class_summary():
    instances, classes = _hand_built()
    summary = class_summary(measure_to_end(instances, classes))
    assert sorted(summary) == [2, 3]
    two, three = summary[2], summary[3]
    assert (two.count, two.total_area, two.mean_area, two.median_area) == (2, 13, 6.5, 6.5)
    assert (three.count, three.total_area, three.mean_area, three.median_area) == (2, 6, 3.0, 3.0)
    assert two.area_fraction == pytest.approx(13 / 120) and three.area_fraction == pytest.approx(6 / 120)
    table = measure_to_end(instances, classes)
    circularity = table.circularity
    assert two.median_circularity == pytest.approx(np.median(circularity[table.class_ids == 2]))
    assert three.median_circularity == pytest.approx(np.median(circularity[table.class_ids == 3]))
    assert two.median_solidity == three.median_solidity == 1.0
    assert class_summary(measure_to_end(np.zeros((5, 5), np.int32))) == {}


def _many_objects(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blobs with shuffled sparse ids, one of them a tall bar that crosses many bands."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    blobs, n = ndimage.label(ndimage.binary_opening(rng.random((97, 83)) > 0.55))
    ids = np.concatenate([[0], rng.permutation(np.arange(1, n + 1) * 13 + 1000)])  # sparse, not in row order
    instances = ids[blobs].astype(np.int32)
    instances[5:90, 40:43] = 77  # spans every band of up to 85 rows
    classes = np.where(instances > 0, 2 + (instances % 3 == 0), 1).astype(np.uint8)
    return instances, classes


def _same_tables(a, b) -> None:
    assert list(a.columns()) == list(b.columns())
    for name, column in a.columns().items():
        if np.asarray(column).dtype.kind == "f":  # sums of the bands' parts, in another order
            np.testing.assert_allclose(column, b.columns()[name], rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(column, b.columns()[name], err_msg=name)


@pytest.mark.parametrize("band", [1, 3, 10, 40])
def test_bands_give_the_table_of_one_band(band):
    instances, classes = _many_objects()
    whole = measure_to_end(instances, classes, band=instances.shape[0])
    assert len(whole) > 50 and 77 in whole.ids
    bar = whole.ids.tolist().index(77)
    assert tuple(whole.bbox[bar]) == (5, 40, 90, 43) and whole.area[bar] == 85 * 3
    progress = []
    banded = drain(measure_objects(instances, classes, band=band), progress.append)
    _same_tables(banded, whole)
    steps = math.ceil(97 / band) + 1  # the bands, then the convex hulls
    assert progress == [MeasureProgress(k, steps) for k in range(1, steps + 1)]


def test_a_memory_map_a_zarr_and_a_dask_array_give_the_same_table(tmp_path):
    zarr = pytest.importorskip("zarr")
    da = pytest.importorskip("dask.array")
    instances, classes = _many_objects(1)
    whole = measure_to_end(instances, classes, band=instances.shape[0])
    mapped = np.lib.format.open_memmap(tmp_path / "ids.npy", mode="w+", dtype=np.int32, shape=instances.shape)
    mapped[:] = instances
    _same_tables(measure_to_end(mapped, classes, band=7), whole)
    stored = zarr.create_array(store=str(tmp_path / "ids.zarr"), shape=instances.shape, chunks=(16, 32),
                               dtype=np.int32)
    stored[:] = instances
    _same_tables(measure_to_end(stored, da.from_array(classes, chunks=(20, 20))), whole)  # default bands
    _same_tables(measure_to_end(da.from_array(instances, chunks=(30, 40)), classes, band=11), whole)


class _Recorded:
    """An array that records every read: the measurement must read bands, never the whole map."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, key):
        part = self.data[key]
        self.reads.append(part.shape)
        return part


def test_only_bands_are_read():
    instances, classes = _many_objects(2)
    ids, cls = _Recorded(instances), _Recorded(classes)
    _same_tables(measure_to_end(ids, cls, band=8), measure_to_end(instances, classes))
    assert ids.reads and max(rows for rows, _ in ids.reads) <= 8 and max(rows for rows, _ in cls.reads) <= 8
    assert sum(rows for rows, _ in ids.reads) == instances.shape[0]  # each row read once


def test_a_stop_ends_between_bands():
    instances, classes = _many_objects()
    stop = threading.Event()
    run = measure_objects(instances, classes, band=10, stop=stop)
    next(run)
    stop.set()
    with pytest.raises(StopIteration) as ended:
        next(run)
    table = ended.value.value
    assert not table.complete and 0 < len(table) and table.bbox[:, 0].max() < 10  # the first band's objects
    assert np.isnan(table.solidity).all()  # a hull needs all of an object's rows: none is guessed
    assert measure_to_end(instances, classes, stop=True).complete is False


@pytest.mark.parametrize("density", [0.4, 0.55, 0.7])
def test_convex_areas_are_regionprops_on_ragged_objects(density):
    """Random blobs, from specks to one sprawling object, some ids shared by pieces far apart (one
    hull over both, as regionprops makes it): the convex area pixel for pixel."""
    from scipy import ndimage
    from skimage.measure import regionprops

    rng = np.random.default_rng(int(density * 10))
    blobs, _ = ndimage.label(rng.random((160, 140)) < density)
    instances = (blobs % 53).astype(np.int32)  # ids reused across the map
    table = measure_to_end(instances, band=13)
    props = regionprops(instances)
    np.testing.assert_array_equal(table.convex_area, [p.area_convex for p in props])
    assert (table.solidity <= 1).all() and table.solidity.min() < 0.5  # pieces far apart: a hull mostly empty


def test_a_stop_during_the_convex_hulls(monkeypatch):
    """The hulls are made for objects grouped by height, the shortest first, in batches, with a
    look at the stop between batches: the batches done keep their solidity, the others have
    none (NaN). Small batches give the same areas."""
    import napari_selfreg.core.measurements as measurements

    instances, classes = _many_objects()
    whole = measure_to_end(instances, classes, band=10)
    monkeypatch.setattr(measurements, "HULL_CELLS", 20)  # a few objects a batch
    np.testing.assert_array_equal(measure_to_end(instances, classes, band=10).convex_area, whole.convex_area)
    monkeypatch.setattr(measurements, "HULL_CELLS", 10**9)
    looks = []

    def stop() -> bool:  # asked once per band (10 bands), then once per group of heights
        looks.append(1)
        return len(looks) > 10 + 1

    table = measure_to_end(instances, classes, band=10, stop=stop)
    assert not table.complete
    heights = table.bbox[:, 2] - table.bbox[:, 0]
    first = np.ceil(np.log2(2 * heights + 1)) == np.ceil(np.log2(2 * heights.min() + 1))
    assert 0 < first.sum() < len(table)
    np.testing.assert_array_equal(table.solidity[first], whole.solidity[first])
    assert np.isnan(table.solidity[~first]).all()


def test_maps_that_are_not_objects_are_refused():
    instances, classes = _hand_built()
    with pytest.raises(InputError, match="differ in shape"):
        measure_to_end(instances, classes[:5])
    with pytest.raises(InputError, match="must be integers"):
        measure_to_end(instances.astype(np.float32), classes)
    with pytest.raises(InputError, match="negative"):
        measure_to_end(-instances, classes)
    with pytest.raises(InputError, match="one 2-D map"):
        measure_to_end(np.zeros((2, 4, 4), np.int32))
    ids = np.arange(1, 601, dtype=np.int32).reshape(20, 30)
    with pytest.raises(InputError, match="not object ids"):
        measure_to_end(ids, ids)  # object ids given as the class map


def test_write_csv_writes_one_row_per_object(tmp_path):
    instances, classes = _hand_built()
    table = measure_to_end(instances, classes, spacing=(0.5, 0.5))
    path = write_csv(table, tmp_path / "objects.csv")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(table.columns())
    shape = [format(v[0], ".10g") for v in (table.perimeter, table.perimeter / 2, *table.ellipse_axes(),
                                             *table.ellipse_axes(scaled=True), table.eccentricity, table.circularity,
                                             table.solidity)]
    assert rows[1] == ["3", "2", "7", "1.75", format(math.sqrt(28 / math.pi), ".10g"),
                       format(math.sqrt(7 / math.pi), ".10g"), *shape[:2], shape[2], shape[4], shape[3], shape[5],
                       *shape[6:], "5", format(40 / 7, ".10g"), "4", "5", "7", "8", "False"]
    assert [r[0] for r in rows[1:]] == ["3", "7", "40", "1000"] and rows[2][-1] == "True"
    assert [p.name for p in tmp_path.iterdir()] == ["objects.csv"]  # no partial file left
    with pytest.raises(OSError):
        write_csv(table, tmp_path / "no such folder" / "objects.csv")


@pytest.mark.data
def test_agrees_with_regionprops_on_a_real_mask(monuseg_pair):
    from skimage.measure import regionprops

    from napari_selfreg.core.instances import separate_instances

    _, mask = monuseg_pair
    classes = mask.astype(np.uint8) + 1
    instances = separate_instances(classes)
    table = measure_to_end(instances, classes, band=37)  # objects cut by bands of 37 rows
    props = regionprops(instances)
    assert len(table) == len(props) > 300
    np.testing.assert_array_equal(table.ids, [p.label for p in props])
    np.testing.assert_array_equal(table.area, [p.area for p in props])
    np.testing.assert_array_equal(table.bbox, [p.bbox for p in props])
    np.testing.assert_allclose(table.centroid, [p.centroid for p in props], rtol=0, atol=1e-9)
    np.testing.assert_allclose(table.equivalent_diameter, [p.equivalent_diameter_area for p in props])
    np.testing.assert_allclose(table.perimeter, [p.perimeter_crofton for p in props], rtol=1e-12)
    major, minor = table.ellipse_axes()
    np.testing.assert_allclose(major, [p.axis_major_length for p in props], rtol=1e-9)
    np.testing.assert_allclose(minor, [p.axis_minor_length for p in props], rtol=1e-9)
    np.testing.assert_allclose(table.eccentricity, [p.eccentricity for p in props], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(table.convex_area, [p.area_convex for p in props])
    np.testing.assert_allclose(table.solidity, [p.solidity for p in props], rtol=1e-12)
    # nuclei are roundish: most between 0.6 and 1
    assert 0.6 < np.median(table.circularity) < 1 and 0.3 < np.median(table.eccentricity) < 0.9
    assert set(table.class_ids.tolist()) == {2}
    edge = {int(v) for v in np.concatenate([instances[0], instances[-1], instances[:, 0], instances[:, -1]])} - {0}
    assert set(table.ids[table.touches_edge].tolist()) == edge and 0 < len(edge) < len(table)


@pytest.mark.data
def test_intensities_agree_with_regionprops_and_the_stains_with_rgb2hed(monuseg_pair):
    """With the H&E image: each nucleus's mean red, green and blue (regionprops' intensity_mean)
    and its mean hematoxylin and eosin optical density (skimage's rgb2hed of its pixels), and
    their standard deviations (intensity_std)."""
    from skimage.color import rgb2hed
    from skimage.measure import regionprops

    from napari_selfreg.core.instances import separate_instances

    image, mask = monuseg_pair
    classes = mask.astype(np.uint8) + 1
    instances = separate_instances(classes)
    table = measure_to_end(instances, classes, band=37, image=image)
    assert table.intensity_names == ("mean_red", "mean_green", "mean_blue", "hematoxylin_od", "eosin_od")
    props = regionprops(instances, intensity_image=image)
    np.testing.assert_allclose(table.intensity[:, :3], [p.intensity_mean for p in props], rtol=1e-9)
    hed = rgb2hed(image)
    stains = regionprops(instances, intensity_image=hed)
    np.testing.assert_allclose(table.intensity[:, 3:], [p.intensity_mean[:2] for p in stains], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(table.intensity_std[:, :3], [p.intensity_std for p in props], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(table.intensity_std[:, 3:], [p.intensity_std[:2] for p in stains], rtol=1e-5,
                               atol=1e-9)
    assert (table.intensity_std > 0).all()  # no nucleus is one flat colour
    # nuclei take up haematoxylin: denser in it than the background around them
    assert table.intensity[:, 3].mean() > hed[..., 0][instances == 0].mean()
    assert list(table.columns())[-10:] == [*table.intensity_names, "std_red", "std_green", "std_blue",
                                            "hematoxylin_od_std", "eosin_od_std"]
    # RGBA: the alpha is left out; the same table
    rgba = np.concatenate([image, np.full((*image.shape[:2], 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(measure_to_end(instances, classes, image=rgba).intensity, table.intensity)


def test_intensities_of_gray_and_float_images_and_the_wrong_picture():
    instances, classes = _hand_built()
    gray = np.arange(120, dtype=np.uint16).reshape(10, 12)
    table = measure_to_end(instances, classes, image=gray, band=3)
    assert table.intensity_names == ("mean_intensity",)
    expected = [gray[instances == i].mean() for i in (3, 7, 40, 1000)]
    np.testing.assert_allclose(table.intensity[:, 0], expected)
    np.testing.assert_allclose(table.columns()["std_intensity"], [gray[instances == i].std() for i in (3, 7, 40, 1000)],
                               atol=1e-9)
    assert table.columns()["std_intensity"][2] == 0  # one pixel
    floats = np.stack([gray, 2 * gray, 3 * gray], axis=2).astype(np.float32)  # no stains: not 8/16-bit RGB
    table = measure_to_end(instances, classes, image=floats)
    assert table.intensity_names == ("mean_red", "mean_green", "mean_blue")
    np.testing.assert_allclose(table.intensity, np.outer(expected, [1, 2, 3]), rtol=1e-6)
    with pytest.raises(InputError, match="not the picture of the objects"):
        measure_to_end(instances, classes, image=gray.T)
    assert measure_to_end(instances, classes).intensity is None


# ------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def real_model(tmp_path_factory, monuseg_pair):
    """A 256 x 256 crop of a MoNuSeg image, and a model trained on it just long enough to find nuclei."""
    from test_cli import _strokes

    from napari_selfreg.core.checkpoint import save_model
    from napari_selfreg.core.config import ModelConfig, TrainConfig
    from napari_selfreg.core.train import train_to_end

    folder = tmp_path_factory.mktemp("measure")
    image, mask = monuseg_pair
    image, mask = image[:256, :256], mask[:256, :256]
    tifffile.imwrite(folder / "crop.tif", image)
    settings = TrainConfig(steps=25, patch_size=48, batch_size=4, device="cpu", seed=0, learning_rate=1e-2,
                           validation_every=1000)
    model = train_to_end([image], [_strokes(mask)], settings, ModelConfig(base_channels=8, depth=2)).model
    save_model(model, folder / "model.safetensors")
    return folder


@pytest.mark.data
def test_predict_writes_measurements_that_match_its_instances(real_model, tmp_path, capsys, monkeypatch):
    from napari_selfreg.cli import main
    from napari_selfreg.io import write_image

    image = tifffile.imread(real_model / "crop.tif")
    write_image(tmp_path / "placed.tif", image, geometry=((0.25, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    predict = ["predict", "--model", str(real_model / "model.safetensors"), "--device", "cpu",
               "--precision", "float32", "--tile-size", "256"]
    assert main([*predict, "--image", str(real_model / "crop.tif"), str(tmp_path / "placed.tif"),
                 "--out", str(tmp_path / "{stem}_labels.tif"), "--instances", str(tmp_path / "{stem}_inst.tif"),
                 "--measurements", str(tmp_path / "{stem}.csv")]) == 0
    summaries = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    for stem, summary in zip(("crop", "placed"), summaries, strict=True):
        instances = tifffile.imread(tmp_path / f"{stem}_inst.tif")
        labels = tifffile.imread(tmp_path / f"{stem}_labels.tif")
        with open(tmp_path / f"{stem}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        ids = np.unique(instances[instances > 0])
        counts = np.bincount(instances.ravel())
        assert len(rows) == len(ids) == summary["instances"] > 5
        assert [int(r["id"]) for r in rows] == ids.tolist()
        assert [int(r["area_px"]) for r in rows] == counts[ids].tolist()
        assert {r["class_id"] for r in rows} == {"2"}
        measured = summary["measurements"]
        assert measured["file"] == str(tmp_path / f"{stem}.csv") and measured["objects"] == len(ids)
        assert measured["per_label"]["2"]["count"] == len(ids) == summary["instances_per_label"]["2"]
        assert measured["per_label"]["2"]["mean_area_px"] == pytest.approx(counts[ids].mean(), abs=0.01)
        assert measured["per_label"]["2"]["area_fraction"] == pytest.approx(counts[ids].sum() / labels.size, abs=1e-6)
        for shape in ("circularity", "solidity"):  # the typical nucleus's roundness and convexity
            values = [float(r[shape]) for r in rows]
            assert measured["per_label"]["2"][f"median_{shape}"] == pytest.approx(np.median(values), abs=1e-4)
            assert 0.3 < measured["per_label"]["2"][f"median_{shape}"] <= 1
        # each object's mean colour, from the image it was segmented from
        for row in rows[:: max(1, len(rows) // 5)]:
            inside = image[instances == int(row["id"])]
            assert [float(row[f"mean_{c}"]) for c in ("red", "green", "blue")] == pytest.approx(inside.mean(axis=0))
        assert all(float(r["hematoxylin_od"]) > 0 for r in rows)
    # the file's pixel size (0.25 along x, 0.5 along y) gives areas in its units; the plain TIFF has none
    assert "pixel_size" not in summaries[0]["measurements"] and summaries[1]["measurements"]["pixel_size"] == [0.5,
                                                                                                                0.25]
    with open(tmp_path / "placed.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["area_scaled"]) for r in rows] == [int(r["area_px"]) * 0.125 for r in rows]
    with open(tmp_path / "crop.csv", newline="") as handle:
        assert "area_scaled" not in next(csv.DictReader(handle))

    # a slide opened lazily: measured from the instances' memory map, into the same table
    import napari_selfreg.core.measurements as measurements
    import napari_selfreg.io as io

    read_from = []
    real = measurements.measure_objects

    def recorded(instances, *args, **kwargs):
        read_from.append(type(instances))
        return real(instances, *args, **kwargs)

    monkeypatch.setattr(measurements, "measure_objects", recorded)
    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)
    assert main([*predict, "--image", str(real_model / "crop.tif"), "--out", str(tmp_path / "lazy.tif"),
                 "--instances", str(tmp_path / "lazy_inst.tif"), "--measurements", str(tmp_path / "lazy.csv")]) == 0
    assert read_from == [np.memmap]
    assert (tmp_path / "lazy.csv").read_text() == (tmp_path / "crop.csv").read_text()

    # --pixel-size: micrometres, over the file's own size, and named so in the table
    capsys.readouterr()
    assert main([*predict, "--image", str(tmp_path / "placed.tif"), "--out", str(tmp_path / "um.tif"),
                 "--instances", str(tmp_path / "um_inst.tif"), "--measurements", str(tmp_path / "um.csv"),
                 "--pixel-size", "0.25"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["measurements"]["pixel_size"] == [0.25, 0.25] and summary["measurements"]["unit"] == "um"
    with open(tmp_path / "um.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["area_um2"]) for r in rows] == [int(r["area_px"]) * 0.0625 for r in rows]
    np.testing.assert_allclose([float(r["equivalent_diameter_um"]) for r in rows],
                               [float(r["equivalent_diameter_px"]) * 0.25 for r in rows], rtol=1e-9)
    assert "area_scaled" not in rows[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--measurements", "{tmp}/o.csv"],
         "--measurements measures the objects of --instances; add --instances INSTANCES.tif"),
        (["--instances", "{tmp}/i.tif", "--measurements", "{tmp}/o.txt"],
         "--measurements o.txt: cannot write this format; use one of .csv"),
        (["--instances", "{tmp}/i.tif", "--measurements", "{tmp}/i.tif"],
         "--measurements and --instances name the same file"),
        (["--instances", "{tmp}/i.tif", "--pixel-size", "0.25"],
         "--pixel-size sizes the objects of --measurements; add --measurements OBJECTS.csv"),
        (["--instances", "{tmp}/i.tif", "--measurements", "{tmp}/o.csv", "--pixel-size", "0"],
         "--pixel-size must be the side of a pixel in micrometres (e.g. 0.25), not 0.0"),
    ],
    ids=["without-instances", "not-csv", "same-as-instances", "pixel-size-alone", "pixel-size-0"],
)
def test_measurement_options_that_cannot_work_exit_2_in_one_line(tmp_path, capsys, extra, message):
    from napari_selfreg.cli import main

    tifffile.imwrite(tmp_path / "img.tif", np.zeros((32, 32, 3), np.uint8))
    argv = ["predict", "--model", str(tmp_path / "m.safetensors"), "--image", str(tmp_path / "img.tif"),
            "--out", str(tmp_path / "labels.tif"), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"napari-selfreg predict: error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif"]


# ------------------------------------------------------------------------------ measure


def test_measure_tables_instance_files_as_predict_does(real_model, tmp_path, capsys):
    """`measure` on predict's files gives predict's table, character for character; on an
    objects file corrected afterwards, the corrected objects; several files with {stem}."""
    from napari_selfreg.cli import main
    from napari_selfreg.io import write_image

    image = tifffile.imread(real_model / "crop.tif")
    write_image(tmp_path / "placed.tif", image, geometry=((0.25, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    assert main(["predict", "--model", str(real_model / "model.safetensors"), "--device", "cpu", "--precision",
                 "float32", "--image", str(real_model / "crop.tif"), str(tmp_path / "placed.tif"),
                 "--out", str(tmp_path / "{stem}_labels.tif"), "--instances", str(tmp_path / "{stem}_inst.tif"),
                 "--measurements", str(tmp_path / "{stem}.csv")]) == 0
    capsys.readouterr()
    assert main(["measure", "--instances", str(tmp_path / "crop_inst.tif"), "--labels",
                 str(tmp_path / "crop_labels.tif"), "--image", str(real_model / "crop.tif"),
                 "--out", str(tmp_path / "again.csv")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "crop.csv").read_text()
    assert summary["instances"] == str(tmp_path / "crop_inst.tif") and summary["measurements"]["objects"] > 5
    # the objects file carries the placed image's pixel size (0.5 x 0.25): areas in its units
    assert main(["measure", "--instances", str(tmp_path / "placed_inst.tif"), "--labels",
                 str(tmp_path / "placed_labels.tif"), "--image", str(tmp_path / "placed.tif"),
                 "--out", str(tmp_path / "placed_again.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["measurements"]["pixel_size"] == [0.5, 0.25]
    assert (tmp_path / "placed_again.csv").read_text() == (tmp_path / "placed.csv").read_text()
    # a slide's files are read lazily, band by band, into the same table
    import napari_selfreg.core.measurements as measurements
    import napari_selfreg.io as io

    read_from = []
    real = measurements.measure_objects

    def recorded(instances, classes, *args, **kwargs):
        read_from.append((type(instances).__name__, type(classes).__name__, type(kwargs["image"]).__name__))
        return real(instances, classes, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measurements, "measure_objects", recorded)
        patch.setattr(io, "LAZY_PIXELS", 1000)
        assert main(["measure", "--instances", str(tmp_path / "crop_inst.tif"), "--labels",
                     str(tmp_path / "crop_labels.tif"), "--image", str(real_model / "crop.tif"),
                     "--out", str(tmp_path / "lazy.csv")]) == 0
    capsys.readouterr()
    assert read_from == [("Array", "Array", "Array")]  # dask arrays over the files' strips
    assert (tmp_path / "lazy.csv").read_text() == (tmp_path / "crop.csv").read_text()

    # corrected in napari: two objects merged, one erased; without --labels and --image, sizes and shapes only
    instances = tifffile.imread(tmp_path / "crop_inst.tif")
    ids = np.unique(instances[instances > 0])
    corrected = instances.copy()
    corrected[corrected == ids[1]] = ids[0]
    corrected[corrected == ids[2]] = 0
    tifffile.imwrite(tmp_path / "corrected.tif", corrected)
    assert main(["measure", "--instances", str(tmp_path / "corrected.tif"), str(tmp_path / "crop_inst.tif"),
                 "--out", str(tmp_path / "{stem}_objects.csv"), "--pixel-size", "0.5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["measurements"]["objects"] for line in lines] == [len(ids) - 2, len(ids)]
    with open(tmp_path / "corrected_objects.csv", newline="") as handle:
        rows = {int(r["id"]): r for r in csv.DictReader(handle)}
    assert ids[1] not in rows and ids[2] not in rows
    assert int(rows[ids[0]]["area_px"]) == int(np.sum(instances == ids[0]) + np.sum(instances == ids[1]))
    assert float(rows[ids[0]]["area_um2"]) == int(rows[ids[0]]["area_px"]) * 0.25
    assert {r["class_id"] for r in rows.values()} == {"0"} and "mean_red" not in rows[ids[0]]
    assert (tmp_path / "crop_inst_objects.csv").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "{tmp}/a.tif", "{tmp}/a.tif"], "1 --instances files but 2 --labels files"),
        (["--out", "{tmp}/o.txt"], "--out o.txt: cannot write this format; use one of .csv"),
        (["--labels", "{tmp}/a.tif", "--out", "{tmp}/a.tif"], "--out and --labels name the same file"),
        (["--labels", "{tmp}/small.tif"], "--labels small.tif (8, 8) and --instances objects.tif (16, 16) differ"),
        (["--image", "{tmp}/small.tif"], "--image small.tif (8, 8) is not the picture of --instances objects.tif"),
        (["--labels", "{tmp}/missing.tif"], "--labels {tmp}/missing.tif does not exist"),
        (["--pixel-size", "-1"], "--pixel-size must be the side of a pixel in micrometres"),
    ],
    ids=["count", "not-csv", "overwrites-input", "labels-shape", "image-shape", "missing", "pixel-size"],
)
def test_measure_options_that_cannot_work_exit_2_in_one_line(tmp_path, capsys, extra, message):
    from napari_selfreg.cli import main

    objects = np.zeros((16, 16), np.uint16)
    objects[2:6, 2:6] = 4
    tifffile.imwrite(tmp_path / "objects.tif", objects)
    tifffile.imwrite(tmp_path / "small.tif", np.ones((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "a.tif", np.ones((16, 16), np.uint8))
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "o.csv")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["measure", "--instances", str(tmp_path / "objects.tif"), *out, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = message.replace("{tmp}", str(tmp_path))
    assert len(err) == 1 and err[0].startswith(f"napari-selfreg measure: error: {message}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_measure_of_several_files_skips_one_that_fails(tmp_path, capsys):
    """A float map among object files: said in one line, the others measured, exit code 2."""
    from napari_selfreg.cli import main

    objects = np.zeros((16, 16), np.uint16)
    objects[2:6, 2:6], objects[9:14, 8:15] = 4, 9
    tifffile.imwrite(tmp_path / "good.tif", objects)
    tifffile.imwrite(tmp_path / "float.tif", objects.astype(np.float32) + 0.5)
    assert main(["measure", "--instances", str(tmp_path / "float.tif"), str(tmp_path / "good.tif"),
                 "--out", str(tmp_path / "{stem}.csv")]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["measurements"]["objects"] == 2
    err = captured.err.strip().splitlines()
    assert err[0].startswith(f"napari-selfreg measure: error: {tmp_path / 'float.tif'}: ") and "integers" in err[0]
    assert err[-1] == "napari-selfreg measure: 1 of 2 files failed (see above)"
    assert (tmp_path / "good.csv").exists() and not (tmp_path / "float.csv").exists()
