"""DSC numerical core against hand-computed cases, brute-force references and exact phantoms.

* convolution matrices and 3-sample deconvolutions worked out by hand;
* noise-free "inverse-crime" curves C_t = CBF * dt * toeplitz(C_a) @ R built here: every
  method with vanishing regularisation recovers CBF, the discrete CBV and integer delays;
* the vectorised oSVD threshold scan and Tikhonov GCV / L-curve choices against plain
  per-voxel loops written from the definitions;
* signal -> concentration, baseline detection, maps units, pipeline errors and progress.
"""

from __future__ import annotations

import numpy as np
import pytest

from perfusionai.dsc import concentration as conc_mod
from perfusionai.dsc import deconvolution as dec
from perfusionai.dsc import maps as maps_mod
from perfusionai.dsc.pipeline import DSCOptions, compute_dsc_maps
from perfusionai.errors import Cancelled, PerfusionAIError

# --------------------------------------------------------------------------------------
# hand-computed cases


def test_rectangle_matrices_by_hand():
    toeplitz = dec.convolution_matrix(np.array([1.0, 2.0, 3.0]), 0.5)
    np.testing.assert_array_equal(toeplitz, 0.5 * np.array([[1, 0, 0], [2, 1, 0], [3, 2, 1]]))
    circulant = dec.convolution_matrix(np.array([1.0, 2.0, 3.0]), 1.0, circulant=True)
    assert circulant.shape == (6, 6)
    np.testing.assert_array_equal(circulant[:, 0], [1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(circulant[0], [1, 0, 0, 0, 3, 2])  # wraps around
    np.testing.assert_array_equal(circulant[5], [0, 0, 0, 3, 2, 1])


def test_simpson_matrices_by_hand():
    aif = np.array([0.0, 6.0, 0.0, 6.0])
    # interior (a[k-1] + 4 a[k] + a[k+1]) / 6: k=1 -> 4, k=2 -> 2; the ends unchanged
    np.testing.assert_allclose(dec.convolution_matrix(aif, 1.0, "simpson")[:, 0], [0, 4, 2, 6])
    # circulant: last sample (a[2] + 4 a[3]) / 6 = 4, first padded sample a[3] / 6 = 1
    np.testing.assert_allclose(dec.convolution_matrix(aif, 2.0, "simpson", circulant=True)[:, 0],
                               2.0 * np.array([0, 4, 2, 4, 1, 0, 0, 0]))


# Toeplitz case: AIF [1, 2, 3], dt = 1, k = CBF * R = [2, 1, 0.5]:
#   C0 = 1*2 = 2;  C1 = 2*2 + 1*1 = 5;  C2 = 3*2 + 2*1 + 1*0.5 = 8.5
HAND_AIF = np.array([1.0, 2.0, 3.0])
HAND_TISSUE = np.array([[2.0, 5.0, 8.5]])
HAND_RESIDUE = np.array([2.0, 1.0, 0.5])
# Circulant case: the zero-padded circulant model is exact only when the full linear
# convolution ends inside the window. AIF [0, 1, 2, 0], k = [2, 1, 0, 0]:
#   C = [0, 1*2, 2*2 + 1*1, 2*1] = [0, 2, 5, 2]; the linear convolution is 0 beyond.
HAND_AIF_C = np.array([0.0, 1.0, 2.0, 0.0])
HAND_TISSUE_C = np.array([[0.0, 2.0, 5.0, 2.0]])
HAND_RESIDUE_C = np.array([2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("method,options,circulant", [
    ("sSVD", {"threshold": 0.0}, False),
    ("cSVD", {"threshold": 0.0}, True),
    ("oSVD", {"osvd_thresholds": (0.0,)}, True),
    ("Tikhonov", {"tikhonov_lambda": 0.0}, False),
    ("Tikhonov", {"tikhonov_lambda": 0.0, "circulant": True}, True),
])
def test_small_deconvolution_by_hand(method, options, circulant):
    if circulant:
        tissue, aif, expected = HAND_TISSUE_C, HAND_AIF_C, HAND_RESIDUE_C
    else:
        tissue, aif, expected = HAND_TISSUE, HAND_AIF, HAND_RESIDUE
    result = dec.deconvolve(tissue, aif, 1.0, method, **options)
    np.testing.assert_allclose(result.residue[0], expected, atol=1e-12)
    assert result.cbf[0] == pytest.approx(2.0)
    assert result.tmax_seconds()[0] == 0.0


def test_tikhonov_small_lambda_converges_to_the_exact_solution():
    coarse = dec.deconvolve(HAND_TISSUE, HAND_AIF, 1.0, "Tikhonov", tikhonov_lambda=1e-2).residue[0]
    fine = dec.deconvolve(HAND_TISSUE, HAND_AIF, 1.0, "Tikhonov", tikhonov_lambda=1e-5).residue[0]
    assert np.abs(fine - HAND_RESIDUE).max() < 1e-6 < np.abs(coarse - HAND_RESIDUE).max()


def test_oscillation_index_by_hand():
    # second differences of [1, 0, 1, 0]: 1-0+1 = 2 and 0-2+0 = -2 -> sum 4; L = 4, max 1
    assert dec.oscillation_index(np.array([[1.0, 0.0, 1.0, 0.0]]))[0] == pytest.approx(1.0)
    # a straight line has no curvature
    assert dec.oscillation_index(np.array([[3.0, 2.0, 1.0, 0.0]]))[0] == 0.0


def test_truncation_keeps_singular_values_at_or_above_threshold():
    aif = np.array([0.0, 1.0, 4.0, 2.0, 1.0, 0.5])
    s = np.linalg.svd(dec.convolution_matrix(aif, 1.0), compute_uv=False)
    for threshold, kept in ((s[2] / s[0] * (1 - 1e-9), 3), (s[2] / s[0] * (1 + 1e-9), 2)):
        result = dec.deconvolve(np.ones((1, 6)), aif, 1.0, "sSVD", threshold=threshold)
        assert result.info["kept_singular_values"] == kept


def test_tmax_negative_and_refined():
    residue = np.zeros((2, 8))
    residue[0, 6] = 1.0            # circulant index 6 of L = 8 (t = 4 frames) -> -2 frames
    residue[1, 2:5] = [3.0, 4.0, 3.0]
    np.testing.assert_array_equal(dec.tmax_seconds(residue, 0.5, 4), [-1.0, 1.5])
    parabola = -(np.arange(8) - 3.3) ** 2
    assert dec.tmax_seconds(parabola[None], 1.0, 8, refine=True)[0] == pytest.approx(3.3)
    assert dec.tmax_seconds(parabola[None], 1.0, 8)[0] == 3.0


# --------------------------------------------------------------------------------------
# noise-free inverse-crime curves


DT = 1.0
N_FRAMES = 90
TIMES = np.arange(N_FRAMES) * DT


def _gamma_aif():
    shifted = np.clip(TIMES - 8.0, 0.0, None)
    aif = shifted ** 3 * np.exp(-shifted / 1.5)
    return 40.0 * aif / aif.max()


def _inverse_crime(cbf_values, mtt_values, delays):
    """Curves (n, t) built with the solver's own rectangle discretisation; truth arrays."""
    cbf, mtt, delay = (np.array(x, dtype=float) for x in np.meshgrid(cbf_values, mtt_values, delays, indexing="ij"))
    cbf, mtt, delay = cbf.ravel() / 6000.0, mtt.ravel(), delay.ravel()
    lag = TIMES[None, :] - delay[:, None] * DT
    residue = np.where(lag >= 0, np.exp(-np.clip(lag, 0, None) / mtt[:, None]), 0.0)
    aif = _gamma_aif()
    toeplitz = DT * np.tril(aif[np.subtract.outer(np.arange(N_FRAMES), np.arange(N_FRAMES)) % N_FRAMES])
    tissue = (cbf[:, None] * residue) @ toeplitz.T
    return tissue, aif, cbf, mtt, delay, residue


VANISHING = [
    ("sSVD", {"threshold": 1e-8}),
    ("cSVD", {"threshold": 1e-8}),
    # the first candidate is accepted only if its residue passes the OI rule (it does:
    # an exact exponential residue oscillates little)
    ("oSVD", {"osvd_thresholds": (1e-8, 0.05, 0.1)}),
    ("Tikhonov", {"tikhonov_lambda": 1e-8}),
]


@pytest.mark.parametrize("method,options", VANISHING, ids=[m for m, _ in VANISHING])
def test_inverse_crime_exact_recovery(method, options):
    tissue, aif, cbf, mtt, delay, residue = _inverse_crime([10, 30, 60, 90], [2.0, 4.0, 8.0], [0, 2, 5])
    result = dec.deconvolve(tissue, aif, DT, method, **options)
    np.testing.assert_allclose(result.cbf, cbf, rtol=0.01)
    np.testing.assert_array_equal(result.tmax_seconds(), delay * DT)
    if method == "oSVD":
        np.testing.assert_array_equal(result.regularisation, 1e-8)
    maps = maps_mod.perfusion_maps(tissue, aif, TIMES, result, kh=1.0, rho=1.0)
    discrete_cbv = 100.0 * cbf * DT * residue.sum(axis=1)   # sum C_t / sum C_a
    np.testing.assert_allclose(maps["cbv"], discrete_cbv, rtol=0.005)
    np.testing.assert_allclose(maps["cbf"], 6000.0 * cbf, rtol=0.01)
    np.testing.assert_allclose(maps["mtt"], 60.0 * maps["cbv"] / maps["cbf"], rtol=1e-12)


def test_inverse_crime_cbv_offset():
    """Sum ratio = CBV + CBF*dt/2 (research/dsc.md), within 0.5 % for MTT >= 4 s at dt = 1 s."""
    tissue, aif, cbf, mtt, _, _ = _inverse_crime([10, 40, 80], [4.0, 8.0], [0, 3])
    cbv = maps_mod.cbv_map(tissue, aif, DT, kh=1.0, rho=1.0)
    np.testing.assert_allclose(cbv, 100.0 * (cbf * mtt + cbf * DT / 2.0), rtol=0.005)
    assert np.all(cbv > 100.0 * cbf * mtt * 1.01)  # the offset is there


def test_default_regularisation_biases_in_the_known_direction():
    tissue, aif, cbf, _, _, _ = _inverse_crime([20, 60], [2.0, 6.0], [0])
    for method in ("sSVD", "cSVD", "oSVD"):
        result = dec.deconvolve(tissue, aif, DT, method)
        assert np.all(result.cbf < cbf), method        # truncation flattens the peak
        assert np.all(result.cbf > 0.4 * cbf), method


# --------------------------------------------------------------------------------------
# vectorised selections against per-voxel loops written from the definitions


def _noisy_cases(seed=3, n=12):
    tissue, aif, cbf, _, _, _ = _inverse_crime([15, 45, 75], [3.0, 6.0], [0, 4])
    rng = np.random.default_rng(seed)
    return tissue + rng.normal(0, 0.02 * tissue.max(), tissue.shape), aif


def test_osvd_scan_matches_a_per_voxel_loop():
    tissue, aif = _noisy_cases()
    result = dec.deconvolve(tissue, aif, DT, "oSVD")
    matrix = dec.convolution_matrix(aif, DT, circulant=True)
    u, s, vt = np.linalg.svd(matrix)
    chosen_any_later = False
    for voxel, curve in enumerate(tissue):
        padded = np.concatenate([curve, np.zeros(N_FRAMES)])
        for threshold in dec.OSVD_CANDIDATE_THRESHOLDS:
            keep = s >= threshold * s[0]
            k = vt[keep].T @ ((u[:, keep].T @ padded) / s[keep])
            oi = np.abs(np.diff(k, 2)).sum() / (k.size * k.max())
            if oi < 0.035:
                break
        assert result.regularisation[voxel] == threshold
        chosen_any_later |= threshold > 0.05
        np.testing.assert_allclose(result.residue[voxel], k, rtol=1e-9, atol=1e-12)
        assert result.oscillation_index[voxel] == pytest.approx(oi)
    assert chosen_any_later  # the scan went beyond the first candidate somewhere


@pytest.mark.parametrize("criterion", ["gcv", "lcurve"])
def test_tikhonov_choice_matches_direct_solves(criterion):
    tissue, aif = _noisy_cases(seed=5)
    tissue = tissue[::3]  # 6 voxels: the direct solves are slow
    grid = np.logspace(-3, 0, 13)
    result = dec.deconvolve(tissue, aif, DT, "Tikhonov", tikhonov_criterion=criterion, tikhonov_lambda_grid=grid)
    matrix = dec.convolution_matrix(aif, DT)
    s_max = np.linalg.svd(matrix, compute_uv=False)[0]
    for voxel, curve in enumerate(tissue):
        residual_norm, solution_norm, gcv = [], [], []
        for rel in grid:
            lam = rel * s_max
            normal = matrix.T @ matrix + lam ** 2 * np.eye(N_FRAMES)
            x = np.linalg.solve(normal, matrix.T @ curve)
            influence = matrix @ np.linalg.solve(normal, matrix.T)
            residual_norm.append(np.linalg.norm(matrix @ x - curve))
            solution_norm.append(np.linalg.norm(x))
            gcv.append(residual_norm[-1] ** 2 / np.trace(np.eye(N_FRAMES) - influence) ** 2)
        if criterion == "gcv":
            best = int(np.argmin(gcv))
        else:
            rho, eta, axis = np.log(residual_norm), np.log(solution_norm), np.log(grid)
            d_rho, d_eta = np.gradient(rho, axis), np.gradient(eta, axis)
            curvature = (d_rho * np.gradient(d_eta, axis) - np.gradient(d_rho, axis) * d_eta) / (
                d_rho ** 2 + d_eta ** 2) ** 1.5
            best = 1 + int(np.argmax(curvature[1:-1]))
        assert result.regularisation[voxel] == pytest.approx(grid[best]), voxel
        lam = grid[best] * s_max
        x = np.linalg.solve(matrix.T @ matrix + lam ** 2 * np.eye(N_FRAMES), matrix.T @ curve)
        np.testing.assert_allclose(result.residue[voxel], x, rtol=1e-6, atol=1e-9 * np.abs(x).max())


def test_chunking_does_not_change_results():
    tissue, aif = _noisy_cases()
    for method in ("sSVD", "oSVD", "Tikhonov"):
        whole = dec.deconvolve(tissue, aif, DT, method)
        pieces = dec.deconvolve(tissue, aif, DT, method, chunk_voxels=5)
        np.testing.assert_array_equal(whole.regularisation, pieces.regularisation)
        np.testing.assert_allclose(whole.residue, pieces.residue, rtol=1e-12, atol=1e-15)


def test_frame_interval_rules():
    assert dec.frame_interval(np.arange(20) * 1.5) == pytest.approx(1.5)
    assert dec.frame_interval(np.arange(20) * 1.5 + np.r_[0, np.full(19, 0.01)]) == pytest.approx(1.5)
    irregular = np.arange(20) * 1.5
    irregular[10:] += 0.3
    with pytest.raises(PerfusionAIError, match="irregular"):
        dec.frame_interval(irregular)


def test_bad_deconvolution_inputs():
    with pytest.raises(PerfusionAIError, match="AIF curve is zero"):
        dec.deconvolve(HAND_TISSUE, np.zeros(3), 1.0, "sSVD")
    with pytest.raises(PerfusionAIError, match="unknown"):
        dec.deconvolve(HAND_TISSUE, HAND_AIF, 1.0, "fft")
    with pytest.raises(PerfusionAIError, match="samples"):
        dec.deconvolve(HAND_TISSUE, np.ones(4), 1.0, "sSVD")


# --------------------------------------------------------------------------------------
# signal -> concentration


def _signal_series(arrival=7, n_frames=40, te=0.03, seed=0):
    """Signals S0 * exp(-TE * C) for a small 3D block; returns (signal [k,j,i,t], C, S0)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames, dtype=float)
    shifted = np.clip(t - arrival, 0, None)
    bolus = shifted ** 2 * np.exp(-shifted / 2.0)
    bolus = 20.0 * bolus / bolus.max()            # delta R2* peak 20 1/s
    scale = rng.uniform(0.5, 1.5, (2, 3, 4))
    concentration = scale[..., None] * bolus
    s0 = rng.uniform(200, 400, (2, 3, 4))
    return s0[..., None] * np.exp(-te * concentration), concentration, s0


def test_concentration_exact_with_detected_baseline():
    signal, truth, s0 = _signal_series(arrival=7)
    original = signal.copy()
    bolus = conc_mod.detect_bolus_arrival(signal)
    # first frame with a signal drop: frame 8 (the gamma shape is 0 at frame 7);
    # the baseline leaves the frame before the drop out.
    assert bolus.arrival_index == 8
    assert bolus.baseline_frames == 7
    result = conc_mod.signal_to_concentration(signal, 0.03)
    np.testing.assert_allclose(result.s0, s0, rtol=1e-12)
    np.testing.assert_allclose(result.concentration, truth, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(signal, original)  # input untouched


def test_baseline_detection_in_noise_and_explicit_override():
    signal, _, _ = _signal_series(arrival=12, n_frames=50)
    rng = np.random.default_rng(1)
    noisy = signal * (1 + rng.normal(0, 0.01, signal.shape))
    bolus = conc_mod.detect_bolus_arrival(noisy)
    assert 12 <= bolus.arrival_index <= 14
    assert 2 <= bolus.baseline_frames < bolus.arrival_index
    explicit = conc_mod.signal_to_concentration(noisy, 0.03, baseline_frames=5)
    assert explicit.baseline_frames == 5
    np.testing.assert_allclose(explicit.s0, noisy[..., :5].mean(axis=-1))


def test_no_bolus_is_reported():
    flat = np.full((2, 2, 2, 20), 100.0)
    with pytest.raises(PerfusionAIError, match="no bolus"):
        conc_mod.detect_bolus_arrival(flat)


def test_concentration_handles_bad_samples_safely():
    signal, _, _ = _signal_series()
    signal[0, 0, 0, 15] = 0.0          # non-positive sample -> clipped, finite
    signal[0, 0, 1, 16] = np.nan       # isolated NaN -> 0
    signal[1, 2, 3, :] = 0.0           # dead voxel: S0 = 0 -> concentration 0
    result = conc_mod.signal_to_concentration(signal, 0.03, baseline_frames=6)
    c = result.concentration
    assert np.all(np.isfinite(c))
    assert c[0, 0, 0, 15] == pytest.approx(-np.log(conc_mod.MIN_SIGNAL_RATIO) / 0.03, rel=1e-5)
    assert c[0, 0, 1, 16] == 0.0
    assert np.all(c[1, 2, 3] == 0.0)
    assert result.invalid_voxels == 1 and result.clipped_samples == 1


@pytest.mark.parametrize("te", [None, 0.0, -0.03, float("nan"), "abc"])
def test_te_validation_names_the_option(te):
    # the core names the parameter ("te"); only the command line turns it into "--te"
    signal, _, _ = _signal_series()
    with pytest.raises(PerfusionAIError, match="^te: "):
        conc_mod.signal_to_concentration(signal, te)


def test_nan_frames_are_rejected_by_index():
    signal, _, _ = _signal_series()
    signal[..., 3] = np.nan
    with pytest.raises(PerfusionAIError, match="frame index 3"):
        conc_mod.signal_to_concentration(signal, 0.03)


# --------------------------------------------------------------------------------------
# maps


def test_map_units_by_hand():
    aif = np.array([0.0, 2.0, 4.0, 2.0, 0.0])
    tissue = np.array([[0.0, 0.1, 0.2, 0.1, 0.0], [0.0, 0.0, 0.0, 0.5, 0.0]])
    # trapezoid areas (dt 2): aif 16, tissue 0.8 -> ratio 0.05 -> CBV 5 mL/100 g (kh = rho = 1)
    np.testing.assert_allclose(maps_mod.cbv_map(tissue, aif, 2.0, 1.0, 1.0), [5.0, 6.25])
    np.testing.assert_allclose(maps_mod.cbv_map(tissue, aif, 2.0), np.array([5.0, 6.25]) * 0.73 / 1.04)
    # max residue 0.01 /s -> 60 mL/100 g/min
    np.testing.assert_allclose(maps_mod.cbf_map(np.array([0.01, 0.0]), 1.0, 1.0), [60.0, 0.0])
    mtt = maps_mod.mtt_map(np.array([5.0, 6.25]), np.array([60.0, 0.0]))
    assert mtt[0] == pytest.approx(5.0) and np.isnan(mtt[1])
    np.testing.assert_allclose(maps_mod.ttp_map(tissue, 10.0 + 2.0 * np.arange(5)), [4.0, 6.0])
    # window restricts both integrals
    assert maps_mod.cbv_map(tissue, aif, 2.0, 1.0, 1.0, window=(1, 4))[0] == pytest.approx(100 * 0.4 / 8.0 * 1.0)


def test_first_pass_window_brackets_the_bolus():
    aif = _gamma_aif()
    first, stop = maps_mod.first_pass_window(aif)
    assert first < int(np.argmax(aif)) < stop <= aif.size
    assert aif[first] < 0.1 * aif.max()


# --------------------------------------------------------------------------------------
# pipeline


def _pipeline_phantom(n_frames=60, te=0.03):
    """4x5x6 brain, one arterial voxel, tissue = inverse-crime curves, noise-free signal."""
    times = np.arange(n_frames) * DT
    shifted = np.clip(times - 8.0, 0.0, None)
    aif = shifted ** 3 * np.exp(-shifted / 1.5)
    aif = 40.0 * aif / aif.max()
    shape = (4, 5, 6)
    rng = np.random.default_rng(2)
    cbf = rng.uniform(20, 70, shape) / 6000.0
    mtt = rng.uniform(3, 8, shape)
    toeplitz = DT * np.tril(aif[np.subtract.outer(np.arange(n_frames), np.arange(n_frames)) % n_frames])
    residue = np.exp(-times[None, :] / mtt.reshape(-1, 1))
    tissue = ((cbf.reshape(-1, 1) * residue) @ toeplitz.T).reshape(shape + (n_frames,))
    tissue[0, 0, 0] = aif
    signal = 500.0 * np.exp(-te * tissue)
    brain = np.ones(shape, bool)
    brain[0, 0, 0] = False
    arterial = np.zeros(shape, bool)
    arterial[0, 0, 0] = True
    return signal, times, brain, arterial, cbf, mtt, residue.reshape(shape + (n_frames,)), aif


def test_pipeline_recovers_truth_and_reports():
    signal, times, brain, arterial, cbf, mtt, residue, aif = _pipeline_phantom()
    calls = []
    options = DSCOptions(te=0.03, method="csvd", threshold=1e-8, kh=1.0, rho=1.0)
    result = compute_dsc_maps(signal, times, options, mask=brain, aif_mask=arterial,
                              progress=lambda f, m: calls.append(f))
    assert set(result.maps) == {"cbv", "cbf", "mtt", "tmax", "ttp"}
    assert all(m.dtype == np.float32 and m.shape == brain.shape for m in result.maps.values())
    np.testing.assert_allclose(result.aif, aif, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.maps["cbf"][brain], 6000 * cbf[brain], rtol=0.01)
    discrete_cbv = 100.0 * cbf * DT * residue.sum(axis=-1)
    np.testing.assert_allclose(result.maps["cbv"][brain], discrete_cbv[brain], rtol=0.005)
    np.testing.assert_array_equal(result.maps["tmax"][brain], 0.0)
    assert result.maps["cbf"][0, 0, 0] == 0.0  # outside the mask
    # frames 0..8 are pre-bolus (the AIF starts after t = 8 s): the baseline must stay in them
    assert 2 <= result.baseline_frames <= 9 and 9.0 <= result.bolus_arrival_s <= 12.0
    assert result.summary["medians_in_mask"]["cbf"] == pytest.approx(np.median(result.maps["cbf"][brain]))
    assert result.summary["aif"]["source"] == "mask"
    assert calls[-1] == 1.0 and calls == sorted(calls)


def test_pipeline_default_kh_rho_scale_the_maps():
    signal, times, brain, arterial, *_ = _pipeline_phantom()
    plain = compute_dsc_maps(signal, times, DSCOptions(te=0.03, method="sSVD", kh=1.0, rho=1.0), brain, arterial)
    scaled = compute_dsc_maps(signal, times, DSCOptions(te=0.03, method="sSVD"), brain, arterial)
    for key in ("cbv", "cbf"):
        np.testing.assert_allclose(scaled.maps[key][brain], plain.maps[key][brain] * 0.73 / 1.04, rtol=1e-5)
    np.testing.assert_allclose(scaled.maps["mtt"][brain], plain.maps["mtt"][brain], rtol=1e-5)


def test_pipeline_cancellation():
    signal, times, brain, arterial, *_ = _pipeline_phantom()

    def cancel(fraction, message):
        if fraction > 0.25:
            raise Cancelled()

    with pytest.raises(Cancelled):
        compute_dsc_maps(signal, times, DSCOptions(te=0.03), brain, arterial, progress=cancel)


@pytest.mark.parametrize("change,message", [
    ("few_frames", "at least 10"),
    ("nan_frame", "NaN"),
    ("te_zero", "^te: "),
    ("te_missing", "^te: "),
    ("zero_aif", "AIF.*(zero|flat)"),
    ("empty_mask", "empty"),
    ("mask_shape", "same grid"),
    ("both_aif", "not both"),
    ("method", "unknown method"),
    ("irregular", "irregular"),
    ("three_d", "4D"),
])
def test_pipeline_errors(change, message):
    signal, times, brain, arterial, *_ = _pipeline_phantom()
    options = DSCOptions(te=0.03)
    kwargs = dict(mask=brain, aif_mask=arterial)
    if change == "few_frames":
        signal, times = signal[..., :9], times[:9]
    elif change == "nan_frame":
        signal = signal.copy()
        signal[..., 20] = np.nan
    elif change == "te_zero":
        options = DSCOptions(te=0.0)
    elif change == "te_missing":
        options = DSCOptions()
    elif change == "zero_aif":
        signal = signal.copy()
        signal[0, 0, 0] = 500.0
    elif change == "empty_mask":
        kwargs["mask"] = np.zeros_like(brain)
    elif change == "mask_shape":
        kwargs["mask"] = np.ones((4, 5, 7), bool)
    elif change == "both_aif":
        kwargs["aif_auto"] = True
    elif change == "method":
        options = DSCOptions(te=0.03, method="fft")
    elif change == "irregular":
        times = times.copy()
        times[30:] += 0.5
    elif change == "three_d":
        signal = signal[0]
    with pytest.raises(PerfusionAIError, match=message):
        compute_dsc_maps(signal, times, options, **kwargs)


def test_pipeline_leakage_correction_adds_k2_and_restores_tumour_cbv():
    from perfusionai.phantoms import make_dsc_phantom
    from perfusionai.phantoms.dsc import LABELS

    k2 = 0.004
    p = make_dsc_phantom(shape=(6, 24, 24), leakage=True, leakage_k2=k2, snr=np.inf, seed=1)
    tumour = p.rois == LABELS["tumour"]
    options = dict(te=p.te, method="cSVD", kh=p.kh, rho=p.rho, baseline_frames=10)
    plain = compute_dsc_maps(p.signal, p.times, DSCOptions(**options), p.brain_mask, p.aif_mask)
    fixed = compute_dsc_maps(p.signal, p.times, DSCOptions(leakage_correction=True, **options),
                             p.brain_mask, p.aif_mask)
    assert "k2" in fixed.maps and "k2" not in plain.maps
    assert np.median(fixed.maps["k2"][tumour]) == pytest.approx(k2, rel=0.25)
    truth = np.median(p.truth["cbv_window"][tumour])
    before = abs(np.median(plain.maps["cbv"][tumour]) / truth - 1)
    after = abs(np.median(fixed.maps["cbv"][tumour]) / truth - 1)
    assert after < 0.5 * before, (before, after)


def test_learned_method_unavailable_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # torch cannot be imported now
    signal, times, brain, arterial, *_ = _pipeline_phantom()
    with pytest.raises(PerfusionAIError, match="PHAE method needs torch.*perfusionai\\[learned\\]"):
        compute_dsc_maps(signal, times, DSCOptions(te=0.03, method="phae"), brain, arterial)


def test_learned_method_dispatch_keeps_its_maps_and_fills_the_rest(monkeypatch):
    from perfusionai.dsc import learned

    seen = {}

    def compute_learned_maps(method, concentration, aif, times, mask, options, progress):
        seen.update(method=method, shape=concentration.shape, aif=aif.shape, mask=mask.sum())
        progress(1.0, "learned")
        return learned.LearnedMaps(maps={"tmax": np.where(mask, 7.0, 0.0)},
                                   label="dsc.tmaxnet.conv2 (trained on phantoms)",
                                   notes=["CBV, CBF, MTT and TTP from oSVD"], model_card={"trained_on_phantoms": True})

    monkeypatch.setattr(learned, "compute_learned_maps", compute_learned_maps)
    signal, times, brain, arterial, cbf, *_ = _pipeline_phantom()
    result = compute_dsc_maps(signal, times, DSCOptions(te=0.03, method="TMAX-NET", kh=1.0, rho=1.0),
                              brain, arterial)
    assert seen == {"method": "tmax-net", "shape": signal.shape, "aif": (signal.shape[-1],), "mask": brain.sum()}
    np.testing.assert_array_equal(result.maps["tmax"][brain], 7.0)       # the learned map
    assert np.all(result.maps["cbf"][brain] > 0)                        # filled by oSVD
    assert result.residue_threshold["fallback_for"] == ["cbf", "mtt"]
    assert result.summary["learned_method"]["trained_on_phantoms"] is True
    assert "trained on phantoms" in result.summary["learned_method"]["label"]
