"""DL-CTPM preprocessing steps against hand-computed cases (Ren et al. 2021, Eqs. 1-2)."""

import numpy as np
import pytest

from perfusionai.ctpm import preprocessing as pp
from perfusionai.errors import PerfusionAIError
from perfusionai.io import Geometry


def test_equalise_histogram_hand_computed():
    hu = np.array([-1100, -1000, -900, -900, -500, -200, 300], float).reshape(1, 1, 7)
    mask = np.array([1, 1, 1, 1, 1, 1, 0], bool).reshape(1, 1, 7)
    # clipped lung values: -1000 -1000 -900 -900 -500 -300; chf(-1000)=2, chf(-300)=6
    # -900: chf 4 -> (4-2)/4 = 0.5; -500: chf 5 -> 0.75; -300: 1; outside the lung: 0
    out = pp.equalise_histogram(hu, mask)
    np.testing.assert_allclose(out.ravel(), [0, 0, 0.5, 0.5, 0.75, 1.0, 0.0])


def test_equalise_histogram_ignores_voxels_outside_the_lung():
    hu = np.array([-950, -800, -600, -1000, -1000, -1000], float).reshape(1, 2, 3)
    mask = np.array([[1, 1, 1], [0, 0, 0]], bool).reshape(1, 2, 3)
    # lung only: chf(-1000)=0, chf(-300)=3 -> ranks 1/3, 2/3, 3/3
    np.testing.assert_allclose(pp.equalise_histogram(hu, mask).ravel(), [1 / 3, 2 / 3, 1, 0, 0, 0], rtol=1e-6)


def test_masked_median_filter_hand_computed():
    values = (np.array([10, 50, 30, 200], float) / 255).reshape(1, 1, 4)
    full = np.ones(values.shape, bool)
    # window of 3 along i (the other axes have one voxel): {10,50} -> upper middle 50; {10,50,30} -> 30;
    # {50,30,200} -> 50; {30,200} -> 200
    np.testing.assert_allclose(pp.masked_median_filter(values, full, 3).ravel() * 255, [50, 30, 50, 200], atol=1e-4)
    mask = np.array([1, 1, 0, 1], bool).reshape(1, 1, 4)
    # voxel 2 excluded: {10,50} -> 50; {10,50} -> 50; outside -> 0; {200} -> 200
    np.testing.assert_allclose(pp.masked_median_filter(values, mask, 3).ravel() * 255, [50, 50, 0, 200], atol=1e-4)


def test_masked_median_filter_matches_brute_force_and_scipy_window():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, size=(12, 11, 10)) / 255.0
    mask = rng.random(values.shape) > 0.3
    size = 4  # even: offsets -2..+1, as scipy centres an even window
    out = pp.masked_median_filter(values, mask, size)
    expected = np.zeros_like(values)
    for k, j, i in zip(*np.nonzero(mask)):
        sl = tuple(slice(max(c - size // 2, 0), c - size // 2 + size) for c in (k, j, i))
        lung = np.sort(values[sl][mask[sl]])
        expected[k, j, i] = lung[lung.size // 2]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # With a full mask the interior equals scipy's median filter of the same size (10 as in the paper).
    big = rng.integers(0, 256, size=(24, 24, 24)) / 255.0
    ours = pp.masked_median_filter(big, np.ones(big.shape, bool), 10)
    ref = ndimage.median_filter(big, size=10)
    inner = (slice(5, -5),) * 3
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-6)


def test_masked_uniform_filter_hand_computed():
    values = np.array([1, 2, 3, 6], float).reshape(1, 1, 4)
    out = pp.masked_uniform_filter(values, np.ones(values.shape, bool), 3)
    np.testing.assert_allclose(out.ravel(), [1.5, 2, 11 / 3, 4.5], rtol=1e-6)
    mask = np.array([1, 0, 1, 1], bool).reshape(1, 1, 4)
    np.testing.assert_allclose(pp.masked_uniform_filter(values, mask, 3).ravel(), [1, 0, 4.5, 4.5], rtol=1e-6)


def test_enhance_ct_is_equalisation_then_median_then_uniform():
    rng = np.random.default_rng(3)
    hu = rng.uniform(-1050, -250, size=(16, 12, 12))
    mask = np.zeros(hu.shape, bool)
    mask[2:14, 2:10, 3:11] = True
    config = pp.PreprocessConfig(input_shape=(16, 12, 12), median_size=4, uniform_size=3)
    expected = pp.masked_uniform_filter(pp.masked_median_filter(pp.equalise_histogram(hu, mask), mask, 4), mask, 3)
    out = pp.enhance_ct(hu, mask, config)
    np.testing.assert_allclose(out, expected)
    assert out.min() >= 0 and out.max() <= 1 and np.all(out[~mask] == 0)


def test_normalise_spect_by_the_75th_percentile_in_the_lung():
    spect = np.array([1, 2, 3, 4, 5, 100], float).reshape(1, 2, 3)
    lung = np.array([1, 1, 1, 1, 1, 0], bool).reshape(1, 2, 3)
    # P75 of 1..5 (linear interpolation) = 4
    assert pp.spect_reference_level(spect, lung) == pytest.approx(4.0)
    np.testing.assert_allclose(pp.normalise_spect(spect, lung).ravel(), [0.25, 0.5, 0.75, 1, 1.25, 25])
    with pytest.raises(PerfusionAIError, match="percentile"):
        pp.normalise_spect(np.zeros((1, 2, 3)), lung)


def test_discretise_into_eleven_levels():
    x = np.array([-0.2, 0.04, 0.25, 0.349, 0.66, 0.75, 1.3])
    np.testing.assert_allclose(pp.discretise(x), [0, 0, 0.3, 0.3, 0.7, 0.8, 1.0])
    assert len(np.unique(pp.discretise(np.linspace(-1, 2, 1001)))) == 11


def test_split_lungs_label_conventions():
    geometry = Geometry((2, 2, 6))
    labels = np.zeros((2, 2, 6), np.uint8)
    labels[:, :, :2] = 1
    labels[:, :, 4:] = 2
    lungs = pp.split_lungs(labels, geometry)
    assert np.array_equal(lungs[1], labels == 1) and np.array_equal(lungs[2], labels == 2)
    lobes = np.zeros((2, 2, 6), np.uint8)
    lobes[:, :, 0], lobes[:, :, 1], lobes[:, :, 4], lobes[:, :, 5] = 2, 3, 5, 6
    lungs = pp.split_lungs(lobes, geometry)
    assert np.array_equal(lungs[1], np.isin(lobes, (1, 2, 3)))
    assert np.array_equal(lungs[2], np.isin(lobes, (4, 5, 6)))


def test_split_binary_mask_by_patient_side_whatever_the_storage_order():
    binary = np.zeros((2, 2, 6), np.uint8)
    binary[:, :, :2] = 1
    binary[:, :, 4:] = 1
    # identity direction: i grows towards the patient's left, so low i is the right lung
    lungs = pp.split_lungs(binary, Geometry((2, 2, 6)))
    assert lungs[1][:, :, :2].all() and not lungs[1][:, :, 4:].any()
    # i axis pointing to the patient's right: low i is now the left lung
    flipped = Geometry((2, 2, 6), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    lungs = pp.split_lungs(binary, flipped)
    assert lungs[2][:, :, :2].all() and lungs[1][:, :, 4:].all()


def test_split_binary_mask_stored_as_255_ignores_a_stray_blob():
    binary = np.zeros((4, 8, 20), np.uint8)
    binary[:, 1:7, 1:8] = 255   # right lung (low i, identity direction)
    binary[:, 1:7, 11:19] = 255  # left lung
    binary[0, 0, 19] = 255       # one stray voxel far to the left
    lungs = pp.split_lungs(binary, Geometry((4, 8, 20)))
    assert np.array_equal(lungs[1], binary.astype(bool) & (np.arange(20) < 9)[None, None, :])
    assert lungs[2][:, 1:7, 11:19].all() and lungs[2][0, 0, 19]


def test_split_lungs_refuses_missing_lungs():
    geometry = Geometry((2, 2, 4))
    with pytest.raises(PerfusionAIError, match="mask.nii.gz: contains no lung voxel"):
        pp.split_lungs(np.zeros((2, 2, 4)), geometry, "mask.nii.gz")
    right_lobes_only = np.zeros((2, 2, 4), np.uint8)
    right_lobes_only[:, :, :2] = 3
    with pytest.raises(PerfusionAIError, match="no left lung"):
        pp.split_lungs(right_lobes_only, geometry)


def test_lung_grid_hand_computed():
    ct = Geometry((30, 20, 12), spacing=(1.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))
    box = (slice(10, 20), slice(5, 13), slice(2, 10))
    grid = pp.lung_grid(box, ct, (5, 4, 4))
    # i: 8 voxels of 1 mm -> 4 of 2 mm, first centre at index 2 - 0.5 + 1 = 2.5 -> x 2.5
    # j: 8 voxels of 2 mm -> 4 of 4 mm, first centre at index 5.5 -> y 11
    # k: 10 voxels of 3 mm -> 5 of 6 mm, first centre at index 10.5 -> z 31.5
    np.testing.assert_allclose(grid.spacing, (2.0, 4.0, 6.0))
    np.testing.assert_allclose(grid.origin, (2.5, 11.0, 31.5))
    np.testing.assert_allclose(grid.direction, np.eye(3).ravel())
    assert grid.shape == (5, 4, 4)


def test_lung_grid_orders_axes_like_the_patient_for_any_storage_order():
    # A sagittal acquisition stored feet-first: i along -z, j along y, k along +x.
    direction = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]], float)
    ct = Geometry((40, 30, 50), spacing=(1.0, 1.5, 2.0), origin=(-40.0, -20.0, 60.0),
                  direction=tuple(direction.ravel()))
    box = (slice(4, 36), slice(2, 26), slice(8, 48))
    grid = pp.lung_grid(box, ct, (16, 8, 8))
    np.testing.assert_allclose(grid.direction, np.eye(3).ravel(), atol=1e-12)
    # k' (16 voxels) covers CT i (40 voxels of 1 mm along z); i' (8) covers CT k (32 voxels of 2 mm along x)
    np.testing.assert_allclose(grid.spacing, (32 * 2.0 / 8, 24 * 1.5 / 8, 40 * 1.0 / 16))


def test_crop_lung_samples_physical_positions_on_an_oblique_anisotropic_ct():
    from perfusionai.phantoms.ctpm import _lps_grid, _rotation

    direction = _rotation((12.0, -8.0, 20.0))
    ct = Geometry((40, 36, 44), spacing=(1.1, 1.7, 2.9), origin=(-20.0, -30.0, -50.0),
                  direction=tuple(direction.ravel()))
    x, y, z = _lps_grid(ct)
    linear = 2.0 * x - 1.0 * y + 0.5 * z  # linear interpolation reproduces it exactly
    mask = np.zeros(ct.shape, bool)
    mask[8:32, 6:30, 10:34] = True
    config = pp.PreprocessConfig(input_shape=(16, 8, 8))
    crop = pp.crop_lung(linear, ct, mask, 1, config)
    gx, gy, gz = _lps_grid(crop.grid)
    inner = (slice(1, -1),) * 3  # the outermost grid centres sit half a CT voxel from the box edge
    np.testing.assert_allclose(crop.ct_hu[inner], (2.0 * gx - gy + 0.5 * gz)[inner], atol=1e-3)
    assert crop.mask.mean() > 0.9


def test_resample_and_coverage_for_a_spect_off_the_ct():
    ct = Geometry((10, 10, 10), spacing=(2.0, 2.0, 2.0))
    spect = Geometry((5, 5, 5), spacing=(4.42,) * 3, origin=(1000.0, 0.0, 0.0))
    assert pp.coverage(spect, ct) == 0.0
    same = Geometry((5, 5, 5), spacing=(4.42,) * 3, origin=(0.0, 0.0, 0.0))
    assert pp.coverage(same, ct) == 1.0
