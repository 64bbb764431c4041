"""Baseline detection must end before the *earliest* bolus arrival (arteries), not the brain mean's."""

import numpy as np
import pytest

from perfusionai.dsc import concentration
from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps
from perfusionai.phantoms.dsc import make_dsc_phantom


@pytest.fixture(scope="module")
def delayed_brain():
    # three quarters of the tissue is reached 4-8 s after the arteries (a large delayed territory)
    return make_dsc_phantom(shape=(4, 24, 24), cbf=[60.0], delay_s=[0.0, 4.0, 6.0, 8.0], n_frames=60,
                            snr=np.inf, baseline_frames=10)


def test_mean_curve_alone_would_swallow_arterial_bolus_frames(delayed_brain):
    p = delayed_brain
    assert concentration.detect_bolus_arrival(p.signal, p.brain_mask).baseline_frames > 10
    assert concentration.earliest_bolus_arrival(p.signal, p.brain_mask).baseline_frames <= 10
    with_aif = concentration.earliest_bolus_arrival(p.signal, p.brain_mask, p.aif_mask)
    assert with_aif.baseline_frames <= 10


def test_delayed_territory_keeps_cbf_exact(delayed_brain):
    p = delayed_brain
    result = compute_dsc_maps(p.signal, p.times, DSCOptions(te=p.te, method="sSVD", threshold=1e-3),
                              mask=p.brain_mask, aif_mask=p.aif_mask)
    assert result.baseline_frames <= 10
    for label in (10, 11, 12, 13):
        assert np.median(result.maps["cbf"][p.rois == label]) == pytest.approx(60.0, rel=0.01)


def test_delayed_territory_with_automatic_aif():
    # Mouridsen's roughness criterion needs noise to tell arteries from tissue, so this runs at SNR 100
    p = make_dsc_phantom(shape=(4, 24, 24), cbf=[60.0], delay_s=[0.0, 4.0, 6.0, 8.0], n_frames=60,
                         snr=100.0, baseline_frames=10, artery_radius=2.0, seed=3)
    result = compute_dsc_maps(p.signal, p.times, DSCOptions(te=p.te, method="cSVD"), mask=p.brain_mask,
                              aif_auto=True)
    assert result.baseline_frames <= 10
    assert all(p.aif_mask[tuple(v)] for v in result.aif_voxels)
    medians = [np.median(result.maps["cbf"][p.rois == label]) for label in (10, 11, 12, 13)]
    # block-circulant SVD is delay-insensitive: every delayed block gets the zero-delay block's CBF
    np.testing.assert_allclose(medians, medians[0], rtol=0.03)
