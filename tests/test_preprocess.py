"""Preprocessing: centring, crop/pad, binning, masks, background, scaling; raw untouched."""

from __future__ import annotations

import numpy as np
import pytest

from ptyinr import store
from ptyinr.errors import InputError, StoreError
from ptyinr.geometry import object_pixel_size_m
from ptyinr.preprocess import (
    PreprocessOptions,
    centre_of_mass,
    detect_bad_pixels,
    frame_statistics,
    preprocess,
    write_preprocessed,
)

GEOM = {"wavelength_m": 1e-10, "detector_distance_m": 1.0, "detector_pixel_size_m": 50e-6}


def _store(tmp_path, frames, mask=None, name="s.zarr"):
    n = len(frames)
    pos = np.stack([np.arange(n) * 1e-7, np.zeros(n)], axis=1)
    return store.create_scan_store(
        tmp_path / name,
        frames,
        pos,
        attrs={**GEOM, "positions_unit": "m", "scan_id": "s"},
        mask=mask,
        frames_per_shard=3,
    )


def _blob(n=5, shape=(20, 24), centre=(8, 13), seed=0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    peak = 200 * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 6.0)
    rng = np.random.default_rng(seed)
    return rng.poisson(np.broadcast_to(peak, (n, *shape))).astype(np.uint16)


def test_centre_crop_puts_peak_at_frame_centre(tmp_path):
    frames = _blob()
    ds = store.open_scan_store(_store(tmp_path, frames))
    data, mask = preprocess(ds, PreprocessOptions(frame_size=(10, 10)))
    assert data.attrs["centre_used"] == [8, 13]
    out = data.values
    assert out.dtype == np.float32 and out.shape == (5, 10, 10)
    mean = out.mean(axis=0)
    assert np.unravel_index(mean.argmax(), mean.shape) == (5, 5)
    # the crop is a window of the raw frames, unchanged
    np.testing.assert_array_equal(out, frames[:, 3:13, 8:18].astype(np.float32))
    assert not mask.values.any()


def test_pad_marks_unmeasured_pixels(tmp_path):
    frames = _blob(shape=(8, 8), centre=(4, 4))
    ds = store.open_scan_store(_store(tmp_path, frames))
    data, mask = preprocess(ds, PreprocessOptions(frame_size=(12, 12), centre="none"))
    m = mask.values
    assert m[:2].all() and m[:, :2].all() and m[-2:].all() and not m[2:10, 2:10].any()
    np.testing.assert_array_equal(data.values[:, 2:10, 2:10], frames.astype(np.float32))
    assert data.values[:, :2].sum() == 0


def test_binning_conserves_counts_and_pixel_size(tmp_path):
    frames = _blob()
    path = _store(tmp_path, frames)
    ds = write_preprocessed(path, PreprocessOptions(frame_size=(12, 12), binning=3))
    pre = ds["preprocessed"].values
    assert pre.shape == (5, 4, 4)
    crop = frames[:, 8 - 6 : 8 + 6, 13 - 6 : 13 + 6].astype(np.float64)
    np.testing.assert_allclose(pre.sum(axis=(1, 2)), crop.sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(pre[:, 0, 0], crop[:, :3, :3].sum(axis=(1, 2)))
    # object pixel: binning keeps N * p; the crop from 20 x 24 to 12 x 12 enlarges it
    expect = object_pixel_size_m(1e-10, 1.0, 50e-6, (12, 12))
    assert store.object_pixel_size(ds, (4, 4)) == pytest.approx(expect)
    np.testing.assert_allclose(
        store.positions_px(ds, (4, 4)), ds["positions"].values / np.asarray(expect)
    )


def test_raw_untouched_and_load_frames_reads_preprocessed(tmp_path):
    frames = _blob()
    path = _store(tmp_path, frames)
    ds = write_preprocessed(path, PreprocessOptions(scale=0.5, centre="none"))
    np.testing.assert_array_equal(ds["intensities"].values, frames)
    np.testing.assert_allclose(store.load_frames(ds), frames * 0.5)
    np.testing.assert_array_equal(store.load_frames(ds, "intensities"), frames)
    with pytest.raises(StoreError, match="exists"):
        write_preprocessed(path, PreprocessOptions())
    ds = write_preprocessed(path, PreprocessOptions(centre="none"), overwrite=True)
    np.testing.assert_allclose(store.load_frames(ds), frames)
    # no scratch left beside the store (the consolidation's lock file is meant to stay)
    lock = store.consolidate_lock_path(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p != lock]


def test_given_and_detected_bad_pixels(tmp_path):
    frames = _blob(n=6)
    frames[:, 1, 1] = 5000  # hot in every frame
    frames[:, 8, 12] = 0  # dead next to the peak
    frames[2, 15, 20] = np.iinfo(np.uint16).max  # saturated / gap marker
    given = np.zeros(frames.shape[1:], bool)
    given[0, 23] = True
    ds = store.open_scan_store(_store(tmp_path, frames, mask=given))
    stats = frame_statistics(ds["intensities"].data)
    found = detect_bad_pixels(stats, 6, np.dtype(np.uint16))
    # the saturated marker also makes its pixel's mean hot
    assert np.argwhere(found["hot"]).tolist() == [[1, 1], [15, 20]]
    assert np.argwhere(found["dead"]).tolist() == [[8, 12]]
    assert np.argwhere(found["saturated"]).tolist() == [[15, 20]]
    data, mask = preprocess(ds, PreprocessOptions(detect_bad_pixels=True, centre="none"))
    assert data.attrs["bad_pixels"] == {"given": 1, "dead": 1, "hot": 2, "saturated": 1}
    assert sorted(map(tuple, np.argwhere(mask.values))) == [(0, 23), (1, 1), (8, 12), (15, 20)]
    assert data.values[:, 1, 1].max() == 0 and data.values[2, 15, 20] == 0
    # without detection, the hot pixel pulls the centre of mass off the peak
    off = centre_of_mass(stats["sum"])
    on = centre_of_mass(stats["sum"], mask.values)
    assert abs(on[0] - 8) < 0.2 and abs(on[1] - 13) < 0.2 and abs(off[0] - 8) > 1


def test_background_threshold_and_lazy(tmp_path):
    frames = np.full((4, 6, 6), 10, np.uint16)
    frames[:, 3, 3] = 40
    ds = store.open_scan_store(_store(tmp_path, frames))
    data, _ = preprocess(ds, PreprocessOptions(background=8, threshold=5, centre="none"))
    assert hasattr(data.data, "dask")  # on the fly: nothing computed yet
    out = data.values
    assert out[0, 3, 3] == 32 and out[0, 0, 0] == 0  # 10 - 8 = 2 < threshold -> 0


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (PreprocessOptions(frame_size=(10, 10), binning=3), "not divisible"),
        (PreprocessOptions(binning=0), "binning"),
        (PreprocessOptions(centre="middle"), "centre"),
        (PreprocessOptions(background=-1), "background"),
        (PreprocessOptions(scale=0), "scale"),
    ],
)
def test_bad_options(tmp_path, opts, match):
    ds = store.open_scan_store(_store(tmp_path, _blob()))
    with pytest.raises(InputError, match=match):
        preprocess(ds, opts)
