"""Instances: touching objects of a class map split by a distance-transform watershed."""

from __future__ import annotations

import numpy as np

from napari_selfreg.sample_data import he_arrays


def test_separate_instances_splits_touching_nuclei():
    from napari_selfreg.core.instances import separate_instances

    yy, xx = np.mgrid[:60, :80]
    labels = np.ones((60, 80), np.uint8)
    labels[(yy - 30) ** 2 + (xx - 25) ** 2 <= 100] = 2  # two discs that touch
    labels[(yy - 30) ** 2 + (xx - 43) ** 2 <= 100] = 2
    labels[0, :] = 2  # a one-pixel sliver along the edge is no nucleus
    instances = separate_instances(labels)
    assert instances.max() == 2
    assert instances[30, 25] != instances[30, 43] and instances[0].max() == 0
    truth = he_arrays()["ground_truth"]
    assert separate_instances(truth).max() == 55  # the sample's nuclei, touching ones included


def test_elongated_objects_stay_whole():
    # a ridge of equal distance along a rod or a spindle-shaped nucleus is one maximum, not many
    from napari_selfreg.core.instances import separate_instances

    rod = np.ones((40, 260), np.uint8)
    rod[15:25, 30:230] = 2
    yy, xx = np.mgrid[:120, :120] - 60
    spindle = np.ones((120, 120), np.uint8)
    spindle[(yy / 5) ** 2 + (xx / 25) ** 2 <= 1] = 2
    block = np.ones((400, 500), np.uint8)
    block[100:250, 100:400] = 2
    yy, xx = np.mgrid[:300, :300] - 150
    along, across = xx * np.cos(np.pi / 6) + yy * np.sin(np.pi / 6), yy * np.cos(np.pi / 6) - xx * np.sin(np.pi / 6)
    tilted = np.ones((300, 300), np.uint8)
    tilted[(np.abs(along) < 100) & (np.abs(across) < 5)] = 2  # its ridge repeats its top pixel every few pixels
    assert [separate_instances(m).max() for m in (rod, spindle, block, tilted)] == [1, 1, 1, 1]


def test_real_glands_are_not_cut_at_the_bays_of_their_outline(shared_data):
    from PIL import Image

    from napari_selfreg.core.instances import separate_instances
    from napari_selfreg.core.metrics import object_scores

    with Image.open(shared_data / "glas" / "test" / "masks" / "testA_20_anno.png") as m:
        truth = np.array(m)  # 5 glands, instance ids
    split = separate_instances(np.where(truth > 0, 2, 1).astype(np.uint8))
    scores = object_scores(split, truth)
    assert scores.predicted == scores.true == 5  # 12 pieces with seeds of one absolute height
    assert scores.panoptic_quality > 0.95


def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """The same pixels make the same objects, whatever their ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    objects = a > 0
    pairs = np.unique(np.stack([a[objects], b[objects]]), axis=1)
    return pairs.shape[1] == len(np.unique(a[objects])) == len(np.unique(b[objects]))


def _noisy_map(seed: int) -> np.ndarray:
    """Blobs of two structure classes with ragged, touching outlines, as a poor model predicts them."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((300, 420)), 3)
    labels = np.where(noise > np.quantile(noise, 0.55), 2, 1).astype(np.uint8)
    labels[noise > np.quantile(noise, 0.9)] = 3
    return labels


def test_the_split_in_windows_finds_the_objects_of_the_whole_map():
    from napari_selfreg.core.instances import separate_instances, split_instances
    from napari_selfreg.core.progress import drain

    he = he_arrays()["ground_truth"]  # 1 = background, 2 = nuclei
    rod = np.ones((100, 300), np.uint8)
    rod[40:52, 5:295] = 2  # longer than any window but the widest: split again in wider ones
    for labels, tile, margin in ((he, 48, 8), (he, 100, 30), (_noisy_map(0), 64, 16), (rod, 40, 8)):
        whole = separate_instances(labels)
        steps = []
        split = drain(split_instances(labels, tile=tile, margin=margin), steps.append)
        assert split.complete and split.truncated == 0 and split.count == whole.max()
        assert _same_objects(split.instances, whole)
        ids, first = np.unique(whole.ravel(), return_index=True)
        classes, counts = np.unique(labels.ravel()[first[ids > 0]], return_counts=True)
        assert split.per_class == dict(zip(classes.tolist(), counts.tolist(), strict=True))  # objects per class
        windows = -(-labels.shape[0] // tile) * -(-labels.shape[1] // tile)
        assert [s.done for s in steps] == list(range(1, windows + 1)) and steps[-1].total == windows
    # threads that split windows ahead change nothing: the same ids, not only the same objects
    labels = _noisy_map(2)
    alone = drain(split_instances(labels, tile=64, margin=16, workers=1))
    for workers in (2, 5):
        together = drain(split_instances(labels, tile=64, margin=16, workers=workers))
        np.testing.assert_array_equal(together.instances, alone.instances)
        assert together.per_class == alone.per_class
    # a map that fits one window keeps the whole-map ids (what `predict --instances` wrote before)
    np.testing.assert_array_equal(drain(split_instances(he)).instances, separate_instances(he))


def test_a_group_cut_by_its_window_is_split_again_in_a_window_fitted_to_it(monkeypatch):
    """Not in ever wider windows around the core: on a dense map of touching nuclei each of
    those was a whole split, and most of a slide's time went there."""
    from napari_selfreg.core import instances
    from napari_selfreg.core.progress import drain

    labels = np.ones((400, 400), np.uint8)
    labels[40:52, 5:395] = 2  # a rod from the first core's window across the map
    labels[300:340, 300:340] = 2
    whole = instances.separate_instances(labels)
    regions = []
    split_window = instances.separate_instances
    monkeypatch.setattr(instances, "separate_instances", lambda r, **o: regions.append(r.shape) or split_window(r, **o))
    split = drain(instances.split_instances(labels, tile=64, margin=8, workers=1))  # windows in order
    assert split.count == whole.max() and _same_objects(split.instances, whole)
    # the first core's windows: its own (72 x 72), then the rod's box with REACH to spare
    assert regions[:2] == [(72, 72), (12 + 2 * instances.REACH, 400)]
    assert max(h * w for h, w in regions) == 44 * 400


def test_the_split_in_windows_on_real_masks(shared_data):
    from PIL import Image

    from napari_selfreg.core.instances import separate_instances, split_instances
    from napari_selfreg.core.progress import drain

    for path in (shared_data / "monuseg" / "test" / "masks").iterdir():
        truth = np.array(Image.open(path))
        break
    with Image.open(shared_data / "glas" / "test" / "masks" / "testA_20_anno.png") as m:
        glands = np.array(m)  # glands hundreds of pixels across: wider windows are needed
    for mask, tile in ((truth, 128), (glands, 96)):
        labels = np.where(mask > 0, 2, 1).astype(np.uint8)
        whole = separate_instances(labels)
        split = drain(split_instances(labels, tile=tile, margin=16))
        assert split.count == whole.max() > 4 and _same_objects(split.instances, whole)


def test_a_group_wider_than_the_widest_window_is_split_near_its_start_and_covered_beyond():
    from napari_selfreg.core.instances import separate_instances, split_instances
    from napari_selfreg.core.progress import drain

    labels = np.ones((300, 400), np.uint8)
    labels[20:280, 20:380] = 2
    whole = separate_instances(labels)
    split = drain(split_instances(labels, tile=64, margin=8, max_window=150 * 150))
    assert split.truncated >= 1 and split.complete
    # no object pixel is left without an id, and no id is given twice
    assert np.array_equal(split.instances > 0, whole > 0)
    assert split.count == len(np.unique(split.instances)) - 1 > whole.max()
    assert split.per_class == {2: split.count}


def test_stopping_the_split_keeps_whole_objects_of_the_windows_done(tmp_path):
    import zarr

    from napari_selfreg.core.instances import separate_instances, split_instances
    from napari_selfreg.core.progress import drain

    labels = _noisy_map(1)
    whole = separate_instances(labels)
    out = zarr.open_array(str(tmp_path / "instances.zarr"), mode="w", shape=labels.shape, chunks=(64, 64),
                          dtype="int32", fill_value=0)
    windows = []
    split = drain(split_instances(labels, out, tile=100, margin=16, stop=lambda: len(windows) >= 3),
                  windows.append)
    assert not split.complete and len(windows) == 3 and split.instances is out
    written = np.asarray(out[:])
    assert 0 < split.count < whole.max() and written.max() == split.count
    # each object written is one object of the whole-map split, all of its pixels
    for index in np.unique(written[written > 0]):
        ids = np.unique(whole[written == index])
        assert len(ids) == 1 and np.array_equal(whole == ids[0], written == index)


def test_the_ids_are_counted_a_band_at_a_time_from_a_lazy_map():
    import dask.array as da

    from napari_selfreg.core.instances import IdCounts, id_counts

    labels = np.ones((300, 200), np.int32)
    labels[290, 7] = 65  # in the last band only
    labels[:10] = 0
    lazy = da.from_array(labels, chunks=(50, 50))
    assert id_counts(lazy, band=64) == IdCounts(65, 2000, 57999) == id_counts(labels)
    assert id_counts(np.ones((0, 5), np.uint8)) == IdCounts(0, 0, 0)
    assert not id_counts(labels).zero_background  # a class map: background 1 covers most
    glands = np.zeros((50, 50), np.uint8)  # a GlaS annotation: 0 around, glands 1, 2, 3
    glands[5:15, 5:15], glands[20:30, 20:30], glands[35:45, 5:15] = 1, 2, 3
    assert id_counts(glands).zero_background
    painted = np.zeros((50, 50), np.uint8)  # nuclei painted as 2 on an unpainted layer: no 1
    painted[5:15, 5:15] = 2
    assert not id_counts(painted).zero_background


def test_the_second_pass_of_a_too_wide_group_shows_progress_and_stops():
    """The fill pass ran without progress or Stop: a slide of percolating glands took minutes
    there with the Stop button dead."""
    from napari_selfreg.core.instances import split_instances
    from napari_selfreg.core.progress import drain

    labels = np.ones((300, 400), np.uint8)
    labels[20:280, 20:380] = 2
    seen = []
    split = drain(split_instances(labels, tile=64, margin=8, max_window=150 * 150), seen.append)
    cores = seen[0].total
    assert split.complete and split.truncated >= 1
    assert [(p.done, p.total) for p in seen] == [(i, cores) for i in range(1, cores + 1)] * 2  # both passes
    asked = []
    stopped = drain(split_instances(labels, tile=64, margin=8, max_window=150 * 150,
                                    stop=lambda: len(asked) >= cores + 2), asked.append)
    assert not stopped.complete and len(asked) == cores + 2
    # the cores filled before the stop have ids; later ones keep their unfilled pixels at 0
    assert 0 < np.count_nonzero(stopped.instances) < np.count_nonzero(split.instances)


def test_a_boolean_mask_is_one_structure_class_and_other_inputs_are_checked():
    """A True/False mask gave no objects (True read as background id 1); a stack failed deep in scipy."""
    import pytest

    from napari_selfreg.core.data import InputError
    from napari_selfreg.core.instances import separate_instances, split_instances
    from napari_selfreg.core.progress import drain

    truth = he_arrays()["ground_truth"]
    as_classes = separate_instances(truth)
    assert as_classes.max() == 55
    assert _same_objects(separate_instances(truth == 2), as_classes)
    assert _same_objects(drain(split_instances(truth == 2, tile=64, margin=32)).instances, as_classes)
    assert _same_objects(drain(split_instances(truth.tolist())).instances, as_classes)
    with pytest.raises(InputError, match=r"one 2-D class map .*split a stack slice by slice"):
        separate_instances(np.stack([truth, truth]))
    with pytest.raises(InputError, match="one 2-D class map"):
        drain(split_instances(truth[None]))


def test_an_out_array_is_checked_and_reused_cleanly():
    """Split twice into one array: the second run found every object 'already written' (0
    objects, the old ids kept); a uint8 array wrapped ids past 255."""
    import pytest

    from napari_selfreg.core.instances import split_instances
    from napari_selfreg.core.progress import drain

    truth = he_arrays()["ground_truth"]
    out = np.zeros(truth.shape, np.int32)
    first = drain(split_instances(truth, out=out, tile=64, margin=32))
    kept = out.copy()
    other = np.where(np.arange(truth.shape[1]) < truth.shape[1] // 2, truth, 1).astype(truth.dtype)
    second = drain(split_instances(other, out=out, tile=64, margin=32))
    assert first.count == 55 and 0 < second.count < 55
    assert not np.any(out[:, truth.shape[1] // 2 + 16:])  # no stale objects from the first map
    third = drain(split_instances(truth, out=out, tile=64, margin=32))
    assert third.count == 55 and np.array_equal(out, kept)
    with pytest.raises(ValueError, match=r"32-bit object ids \(int32\), not uint8"):
        drain(split_instances(truth, out=np.zeros(truth.shape, np.uint8)))
