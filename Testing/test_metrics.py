"""Shared metrics against hand-computed values and reference implementations."""

import numpy as np
import pytest

from perfusionai import metrics


def test_dice_hand_computed():
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1], bool)
    # |A and B| = 2, |A| = 3, |B| = 3 -> 4/6
    assert metrics.dice(a, b) == pytest.approx(4 / 6)
    assert metrics.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert metrics.dice(a, ~a) == 0.0


def test_bland_altman_hand_computed():
    a = np.array([10.0, 12.0, 14.0])
    b = np.array([9.0, 12.0, 12.0])  # differences 1, 0, 2: mean 1, sample SD 1
    ba = metrics.bland_altman(a, b)
    assert ba.mean_difference == pytest.approx(1.0)
    assert ba.sd_difference == pytest.approx(1.0)
    assert ba.lower_limit == pytest.approx(1 - 1.96)
    assert ba.upper_limit == pytest.approx(1 + 1.96)


def test_auc_and_youden_hand_computed():
    # positives 3, 5, 6; negatives 1, 2, 4. Pairs (pos > neg): 3>1,3>2, 5>all, 6>all = 8 of 9.
    scores = np.array([1, 2, 3, 4, 5, 6], float)
    labels = np.array([0, 0, 1, 0, 1, 1])
    roc = metrics.roc_auc(scores, labels, n_bootstrap=200)
    assert roc.auc == pytest.approx(8 / 9)
    assert roc.ci_low <= roc.auc <= roc.ci_high
    y = metrics.youden(scores, labels)
    # cut-off 5: sens 2/3, spec 1 -> J 2/3; cut-off 3: sens 1, spec 2/3 -> J 2/3; first max is 3
    assert y.j == pytest.approx(2 / 3)
    assert y.cutoff == 3.0
    assert y.sensitivity == pytest.approx(1.0)
    assert y.specificity == pytest.approx(2 / 3)


def test_mann_whitney_matches_definition():
    a = [3, 5, 6]
    b = [1, 2, 4]
    u, p = metrics.mann_whitney(a, b)
    assert u == 8.0  # pairs with a > b
    assert 0 < p < 1


def test_ssim3d_matches_scikit_image_pinned_settings():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.random((24, 20, 22))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ours = metrics.ssim3d(a, b)
    ref = skimage_metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                                use_sample_covariance=False)
    assert ours == pytest.approx(ref, abs=1e-4)
    assert metrics.ssim3d(a, a) == pytest.approx(1.0)


def test_ssim3d_mask_crops_to_bounding_box_and_zeroes_outside():
    rng = np.random.default_rng(2)
    a = rng.random((30, 30, 30))
    b = rng.random((30, 30, 30))
    mask = np.zeros(a.shape, bool)
    mask[5:25, 6:26, 7:27] = True
    b_out = b.copy()
    b_out[~mask] = 5.0  # outside values must not matter
    assert metrics.ssim3d(a, b, mask) == pytest.approx(metrics.ssim3d(a, b_out, mask))
    inner = (slice(5, 25), slice(6, 26), slice(7, 27))
    assert metrics.ssim3d(a, b, mask) == pytest.approx(metrics.ssim3d(a[inner], b[inner]))
    # a sphere (not its own bounding box) with values above 1 inside: zeroing outside the sphere and
    # clipping to [0, 1] are part of the definition, checked against doing both by hand
    k, j, i = np.indices(a.shape)
    sphere = (k - 15) ** 2 + (j - 15) ** 2 + (i - 15) ** 2 <= 10 ** 2
    b_hot = b * 1.5
    by_hand = [np.where(sphere, np.clip(x, 0, 1), 0.0)[5:26, 5:26, 5:26] for x in (a, b_hot)]
    assert metrics.ssim3d(a, b_hot, sphere) == pytest.approx(metrics.ssim3d(*by_hand), rel=1e-12)
    assert metrics.ssim3d(a, b_hot, sphere) != pytest.approx(metrics.ssim3d(a[5:26, 5:26, 5:26],
                                                                          b_hot[5:26, 5:26, 5:26]), rel=1e-3)


def test_bias_dispersion_index():
    truth = np.ones(5)
    pred = np.array([0.9, 1.0, 1.1, 1.2, 1.3])  # errors -0.1, 0, 0.1, 0.2, 0.3
    bi, di = metrics.bias_dispersion_index(pred, truth)
    assert bi == pytest.approx(0.1)
    assert di == pytest.approx(0.2)


def test_pearson_spearman():
    x = np.arange(10.0)
    r, p = metrics.pearson(x, 2 * x + 1)
    assert r == pytest.approx(1.0) and p < 1e-6
    assert metrics.spearman(x, x ** 3) == pytest.approx(1.0)
