"""``perfusionai dsc maps`` options ``--cbv-integration``, ``--cbv-window`` and ``--refine-tmax``
against known truth (issue 15 item 3: the library-only options on the CLI).

Every truth is computed here from the phantom's noise-free curves (``phantom.concentration`` per
label ``phantom.labels``, ``phantom.aif``) with the formulas written out in this file, not through
the library: CBV = 100 kH/rho * int C_t / int C_a over the chosen frames (trapezoid or rectangle
rule), the first-pass window by the rule of ``perfusionai.dsc.maps.first_pass_window``'s docstring.
"""

from __future__ import annotations

import numpy as np
import pytest

from perfusionai import io
from perfusionai.cli import main
from perfusionai.phantoms.dsc import make_dsc_phantom


def _maps(phantom, folder, extra, name):
    """Run ``dsc maps`` on the phantom saved in ``folder / "ph"``; the written maps as arrays [k, j, i]."""
    ph = folder / "ph"
    argv = ["dsc", "maps", "--dsc", str(ph / "dsc.nii.gz"), "--te", str(phantom.te),
            "--aif-mask", str(ph / "aif_mask.nii.gz"), "--mask", str(ph / "brain_mask.nii.gz"),
            "--kh", str(phantom.analysis_kh), "--progress", "none", "--out", str(folder / name)] + extra
    assert main(argv) == 0
    return {m: io.read_volume(folder / name / f"{m}.nii.gz").array for m in ("cbv", "tmax")}


def _trapezoid(curve, dt):
    c = np.asarray(curve, dtype=np.float64)
    return dt * 0.5 * float((c[1:] + c[:-1]).sum())


def _hand_cbv(phantom, curve, first=0, stop=None):
    """100 kH/rho * trapz(tissue) / trapz(AIF) over frames first .. stop-1 (mL/100 g)."""
    sl = slice(first, stop)
    return 100.0 * (phantom.kh / phantom.rho) * _trapezoid(curve[sl], phantom.tr) / _trapezoid(phantom.aif[sl],
                                                                                              phantom.tr)


def _median(values, mask):
    return float(np.median(values[mask]))


def test_cbv_integration_sum_and_trapezoid_match_their_ratios(tmp_path):
    # short series: the curves do not return to zero at the end, so the two rules differ (~0.2-0.5 %)
    p = make_dsc_phantom(shape=(2, 12, 12), n_frames=30, snr=np.inf, lesion=False, tumour=False)
    p.save(tmp_path / "ph")
    summed = _maps(p, tmp_path, ["--cbv-integration", "sum"], "sum")["cbv"]
    trapezoid = _maps(p, tmp_path, [], "trapezoid")["cbv"]
    for label, curve in zip(p.labels, p.concentration):
        region = p.rois == label
        window_truth = _median(p.truth["cbv_window"], region)       # the phantom's sum ratio
        hand = _hand_cbv(p, curve)
        assert _median(summed, region) == pytest.approx(window_truth, rel=5e-4), label
        assert _median(trapezoid, region) == pytest.approx(hand, rel=5e-4), label
        assert abs(window_truth / hand - 1) > 2e-3, "the two rules must differ on this series for the test to tell"
        assert np.ptp(summed[region]) < 1e-3 * window_truth          # every voxel of a region reads the same


def _first_pass_by_hand(aif):
    """The documented first-pass rule, written independently: (first, stop), stop exclusive."""
    a = [float(x) for x in aif]
    peak = max(range(len(a)), key=a.__getitem__)
    level = 0.1 * a[peak]
    rise = 0
    while a[rise] <= level:
        rise += 1
    first = max(rise - 1, 0)                      # the last frame before the AIF first exceeds 10 %
    end = peak
    while end < len(a) and a[end] >= level:       # after its peak, the first frame below 10 %
        end += 1
    return first, min(len(a), end + (end - first))   # extended by the bolus width, clipped


def test_cbv_window_first_pass_integrates_the_documented_frames(tmp_path):
    p = make_dsc_phantom(shape=(2, 12, 12), n_frames=90, tr=1.0, snr=np.inf, lesion=False, tumour=False)
    p.save(tmp_path / "ph")
    first, stop = _first_pass_by_hand(p.aif)
    assert 0 < first and stop < len(p.times) - 10, (first, stop)   # the window truncates the long series
    first_pass = _maps(p, tmp_path, ["--cbv-window", "first_pass"], "first_pass")["cbv"]
    full = _maps(p, tmp_path, [], "full")["cbv"]
    for label, curve in zip(p.labels, p.concentration):
        region = p.rois == label
        windowed, whole = _hand_cbv(p, curve, first, stop), _hand_cbv(p, curve)
        assert _median(first_pass, region) == pytest.approx(windowed, rel=1e-4), label
        assert _median(full, region) == pytest.approx(whole, rel=1e-4), label
        assert abs(windowed / whole - 1) > 2e-3   # the window is not the full series by another name


def test_first_pass_window_limits_the_overestimate_of_a_gamma_fitted_aif(tmp_path):
    """With recirculation, ``--aif-gamma-fit`` removes the AIF's second pass but the tissue keeps its own:
    over the full series CBV reads high; the first-pass window brings it closer to the truth."""
    p = make_dsc_phantom(shape=(1, 12, 12), n_frames=50, tr=1.0, snr=np.inf, recirculation=True, lesion=False,
                         tumour=False)
    p.save(tmp_path / "ph")
    full = _maps(p, tmp_path, ["--aif-gamma-fit"], "full")["cbv"]
    first_pass = _maps(p, tmp_path, ["--aif-gamma-fit", "--cbv-window", "first_pass"], "first_pass")["cbv"]
    for label in p.labels:
        region = p.rois == label
        truth = _median(p.truth["cbv_window"], region)
        error_full = _median(full, region) / truth - 1
        error_first_pass = _median(first_pass, region) / truth - 1
        assert error_full > 0.1, (label, error_full)           # measured +20 % (GM), +20 % (WM)
        assert 0 <= error_first_pass < error_full - 0.03, (label, error_first_pass, error_full)  # +13 %, +10 %


def _regions_off_the_grid(phantom, tmax):
    """How many regions with a delay have a median Tmax more than 0.05 s away from every multiple of TR."""
    count = 0
    for label in phantom.labels:
        region = phantom.rois == label
        if np.median(phantom.truth["delay"][region]) > 0:
            value = float(np.median(tmax[region]))
            count += abs(value - phantom.tr * round(value / phantom.tr)) > 0.05
    return count


def test_refine_tmax_leaves_the_frame_grid_and_reduces_the_error(tmp_path):
    p = make_dsc_phantom(shape=(1, 8, 8), tr=1.5, n_frames=60, snr=np.inf, delay_s=[0, 0.5, 1.0, 1.75, 2.25, 3.1, 3.7],
                         cbf=60, cbv=4, lesion=False, tumour=False)
    p.save(tmp_path / "ph")
    svd = ["--method", "sSVD", "--threshold", "0.001"]
    grid = _maps(p, tmp_path, svd, "grid")["tmax"]
    refined = _maps(p, tmp_path, svd + ["--refine-tmax"], "refined")["tmax"]
    tissue = p.tissue_mask
    steps = grid[tissue] / p.tr
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)          # without it: multiples of TR
    assert _regions_off_the_grid(p, refined) >= 4      # of the 6 delayed regions; measured 5 (2.25 s reads 2.98)
    assert np.abs(refined[tissue] - grid[tissue]).max() <= 0.5 * p.tr + 1e-4   # a parabola's vertex moves < TR/2
    truth = p.truth["tmax"][tissue]
    error_grid, error_refined = np.abs(grid[tissue] - truth), np.abs(refined[tissue] - truth)
    assert error_refined.max() < error_grid.max() - 0.2, (error_refined.max(), error_grid.max())  # 0.89 vs 1.25 s
    assert error_refined.mean() < error_grid.mean() - 0.03, (error_refined.mean(), error_grid.mean())  # 0.56/0.63
