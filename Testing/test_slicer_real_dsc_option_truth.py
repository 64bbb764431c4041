"""DSCDeconvolution's peer options (issue 15 item 3) RUN through the module Logic on Slicer's REAL
Python layer of 5.10.0 and 5.12.3 (``Testing/slicer_api/real_layer.py``) and checked against known
truth, the same truths as the command-line tests of each option:

* ``leakage_max_k2_cv`` (``test_dsc_k2_cv``): the K2 CV map node with units, tumour CV and CBV, normal
  grey matter no worse than the ungated correction;
* ``aif_gamma_fit`` (``test_dsc_aif_fit``): the AIF curve of the result's plot table is the fitted first
  pass, without the recirculation bump the unfitted AIF has;
* ``motion_correction`` (``test_dsc_peer_features``): a moved series gives the CBF of the still series;
* ``aif_quadratic`` (``test_dsc_peer_features``): CBV / CBF of the quadratic-blood phantom read the truth;
* ``cbv_window`` / ``cbv_integration`` / ``refine_tmax`` (``test_dsc_cbv_window_tmax``): CBV equals the
  hand-computed integral ratio over the documented frames; Tmax leaves the frame grid and its error drops.

Each run also records its option in the nodes' ``PerfusionAI.Options`` attribute. Three options go
through the parameter node (``processWithParameterNode``: the panel's route), the others through
``process(peerOptions=...)``; one case runs as a background ``perfusionai dsc maps`` process, the rest
in-process (``test_slicer_real_dsc_options`` covers both routes). No widget behaviour is checked (the
Qt classes are placeholders).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from perfusionai.phantoms.dsc import LABELS

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling test modules, in any import mode
from test_slicer_real_dsc_options import _run, _values, dual_echo_scene, layer  # noqa: E402,F401  (the fixture over both versions)

LEAKY, GREY = LABELS["tumour"], LABELS["grey_matter"]


def _recorded(nodes, field, value):
    """Every result node records the run's job with ``field`` = ``value`` (``PerfusionAI.Options``, JSON)."""
    for node in list(nodes["maps"].values()) + [nodes["table"], nodes["chart"]]:
        recorded = json.loads(node.GetAttribute("PerfusionAI.Options"))
        assert recorded["job"]["options"][field] == value, (node.GetName(), field, recorded["job"]["options"])


def _panel(mod, scene_nodes, **fields):
    """A parameter node set like the panel: the series, the drawn arteries, the brain mask, ``fields``."""
    p = mod.DSCDeconvolutionLogic().getParameterNode()
    p.inputSeries, p.aifMode, p.aifRegion = scene_nodes["series"], "Region", scene_nodes["aifMask"]
    p.brainMask = scene_nodes["brainMask"]
    for name, value in fields.items():
        setattr(p, name, value)
    return p


def _by_panel(mod, p):
    logic = mod.DSCDeconvolutionLogic()
    return logic.processWithParameterNode(p, waitForCompletion=True)


# ------------------------------------------------------------------------------ K2 CV gating (leakage)

@pytest.mark.parametrize("background", [True], ids=["background"])
def test_k2_cv_limit_gates_the_leakage_correction(layer, background):
    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(2, 28, 28), n_frames=60, tr=1.0, snr=100, seed=21, leakage=True,
                               leakage_k2=0.01, tissue_kappa=10, aif_peak=35, discretisation="fine", show=False)
    p = built["phantom"]
    common = dict(te=p.te, aifNode=built["aifMask"], maskNode=built["brainMask"], kh=p.analysis_kh,
                  leakageCorrection=True)
    gated = _run(mod.DSCDeconvolutionLogic(), built["series"], background,
                 peerOptions={"leakage_max_k2_cv": 0.5}, **common)
    ungated = _run(mod.DSCDeconvolutionLogic(), built["series"], False, **common)
    cv_node = gated["maps"]["k2_cv"]
    assert cv_node.GetAttribute("PerfusionAI.Units") == "1"
    tumour, gm = p.rois == LEAKY, p.rois == GREY
    assert np.median(_values(layer, cv_node)[tumour]) < 0.3
    truth = p.truth["cbv"]
    cbv_gated, cbv_all = _values(layer, gated["maps"]["cbv"]), _values(layer, ungated["maps"]["cbv"])
    assert abs(np.median(cbv_gated[tumour]) / np.median(truth[tumour]) - 1) < 0.15
    err_all = np.median(np.abs(cbv_all[gm] / truth[gm] - 1))
    err_gated = np.median(np.abs(cbv_gated[gm] / truth[gm] - 1))
    assert err_gated <= err_all + 0.005, (err_gated, err_all)
    # the gate changed the maps: the correction was not applied to every voxel
    assert not np.allclose(cbv_gated[gm], cbv_all[gm])
    _recorded(gated, "leakage_max_k2_cv", 0.5)


def test_k2_cv_limit_from_the_parameter_node(layer):
    """The panel's route: the limit is used only with leakage correction on (peerOptions)."""
    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(1, 28, 28), n_frames=60, tr=1.0, snr=100, seed=21, leakage=True,
                               leakage_k2=0.01, tissue_kappa=10, aif_peak=35, discretisation="fine", show=False)
    p = built["phantom"]
    # kh stays the panel's default: its range (0.1-2) excludes this phantom's calibration kh/kappa = 0.073,
    # and the K2 CV does not depend on kh
    panel = _panel(mod, built, echoTime=p.te, leakageCorrection=True, leakageMaxK2Cv=0.5)
    nodes = _by_panel(mod, panel)
    assert np.median(_values(layer, nodes["maps"]["k2_cv"])[p.rois == LEAKY]) < 0.3
    _recorded(nodes, "leakage_max_k2_cv", 0.5)
    panel.leakageMaxK2Cv = 0.0                                  # 0: not set, every voxel corrected
    everywhere = _by_panel(mod, panel)
    _recorded(everywhere, "leakage_max_k2_cv", None)
    gm = p.rois == GREY
    assert not np.allclose(_values(layer, nodes["maps"]["cbv"])[gm], _values(layer, everywhere["maps"]["cbv"])[gm])


# ------------------------------------------------------------------------------ gamma-variate AIF fit

def _table_column(table_node, name):
    table = table_node.GetTable()
    column = table.GetColumnByName(name)
    assert column is not None, name
    return np.array([column.GetValue(i) for i in range(column.GetNumberOfTuples())], dtype=float)


def test_aif_gamma_fit_returns_the_first_pass_without_recirculation(layer):
    from perfusionai.phantoms.dsc import arterial_input

    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(2, 12, 12), n_frames=50, tr=1.0, snr=200, seed=3, recirculation=True,
                               lesion=False, tumour=False, tissue_kappa=10, aif_peak=35, show=False)
    p = built["phantom"]
    common = dict(te=p.te, aifNode=built["aifMask"], maskNode=built["brainMask"], kh=p.analysis_kh)
    fitted = _run(mod.DSCDeconvolutionLogic(), built["series"], False, peerOptions={"aif_gamma_fit": True},
                  **common)
    plain = _run(mod.DSCDeconvolutionLogic(), built["series"], False, **common)
    times = _table_column(fitted["plot"]["table"], "time (s)")
    np.testing.assert_allclose(times, p.times, atol=1e-6)
    first_pass = arterial_input(times, 10.0, 35.0, 3.0, 1.5, recirculation=False)
    aif = _table_column(fitted["plot"]["table"], "AIF (1/s)")
    assert aif.max() == pytest.approx(35.0, rel=0.05)
    assert np.max(np.abs(aif - first_pass)) < 0.03 * 35.0
    # the measured AIF has the recirculation bump the fit removed
    measured = _table_column(plain["plot"]["table"], "AIF (1/s)")
    assert np.max(np.abs(measured - first_pass)) > 0.1 * 35.0
    _recorded(fitted, "aif_gamma_fit", True)


# ------------------------------------------------------------------------------ motion correction (ANTsPy)

def test_motion_correction_recovers_the_still_cbf(layer):
    pytest.importorskip("ants")
    from scipy import ndimage

    from perfusionai import mrml
    from perfusionai.phantoms.dsc import make_dsc_phantom

    mod = layer.load_module("DSCDeconvolution")
    p = make_dsc_phantom(shape=(6, 32, 32), n_frames=24, snr=50.0, seed=6, baseline_frames=8)
    moved = p.signal.copy()
    for frame, shift in {3: (0.0, 0.0, 1.5), 13: (0.0, 1.5, -1.0), 16: (0.0, -2.0, 1.0), 22: (0.0, 1.0, 2.0)}.items():
        moved[..., frame] = ndimage.shift(p.signal[..., frame], shift, order=3, mode="nearest")
    moved[..., 18] = ndimage.rotate(p.signal[..., 18], 4.0, axes=(1, 2), reshape=False, order=3, mode="nearest")
    still_node = mrml.sequence_node_from_series(p.signal, p.geometry, p.times, "still", browser=False)[0]
    moved_node = mrml.sequence_node_from_series(moved.astype(np.float32), p.geometry, p.times, "moved",
                                                browser=False)[0]
    aif = mrml.volume_node_from_array(p.aif_mask, p.geometry, "arteries", label=True)
    brain = mrml.volume_node_from_array(p.brain_mask, p.geometry, "brain", label=True)
    common = dict(te=p.te, aifNode=aif, maskNode=brain)
    corrected = _run(mod.DSCDeconvolutionLogic(), moved_node, False, peerOptions={"motion_correction": True},
                     **common)
    uncorrected = _run(mod.DSCDeconvolutionLogic(), moved_node, False, **common)
    still = _run(mod.DSCDeconvolutionLogic(), still_node, False, **common)
    gm = p.rois == GREY
    cbf = {name: float(np.median(_values(layer, nodes["maps"]["cbf"])[gm]))
           for name, nodes in (("corrected", corrected), ("uncorrected", uncorrected), ("still", still))}
    assert cbf["corrected"] == pytest.approx(cbf["still"], rel=0.10), cbf
    assert abs(cbf["uncorrected"] / cbf["still"] - 1) > 0.3, cbf        # the motion matters
    _recorded(corrected, "motion_correction", True)


# ------------------------------------------------------------------------------ quadratic blood delta R2*

def test_aif_quadratic_recovers_cbv_and_cbf(layer):
    from test_dsc_peer_features import A, B, _quadratic_phantom

    from perfusionai import mrml

    mod = layer.load_module("DSCDeconvolution")
    p, signal = _quadratic_phantom()
    series = mrml.sequence_node_from_series(signal.astype(np.float32), p.geometry, p.times, "quadratic",
                                            browser=False)[0]
    aif = mrml.volume_node_from_array(p.aif_mask, p.geometry, "arteries", label=True)
    brain = mrml.volume_node_from_array(p.brain_mask, p.geometry, "brain", label=True)
    common = dict(te=p.te, aifNode=aif, maskNode=brain, method="sSVD", threshold=0.001)
    quadratic = _run(mod.DSCDeconvolutionLogic(), series, False, peerOptions={"aif_quadratic": (A, B)}, **common)
    linear = _run(mod.DSCDeconvolutionLogic(), series, False, **common)
    gm, wm = p.rois == GREY, p.rois == LABELS["white_matter"]

    def ratios(nodes):
        return [float(np.median(_values(layer, nodes["maps"][m])[r] / p.truth[t][r]))
                for m, t in (("cbv", "cbv_discrete"), ("cbf", "cbf")) for r in (gm, wm)]

    assert np.allclose(ratios(quadratic), 1.0, atol=0.02), ratios(quadratic)
    assert max(ratios(linear)) < 0.9, ratios(linear)
    _recorded(quadratic, "aif_quadratic", [A, B])


# ------------------------------------------------------------------------------ CBV window / integration, Tmax

def test_cbv_integration_sum_gives_the_sum_ratio(layer):
    from test_dsc_cbv_window_tmax import _hand_cbv

    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(1, 12, 12), n_frames=30, snr=float("inf"), lesion=False, tumour=False,
                               show=False)
    p = built["phantom"]
    common = dict(te=p.te, aifNode=built["aifMask"], maskNode=built["brainMask"], kh=p.analysis_kh)
    summed = _run(mod.DSCDeconvolutionLogic(), built["series"], False, peerOptions={"cbv_integration": "sum"},
                  **common)
    trapezoid = _run(mod.DSCDeconvolutionLogic(), built["series"], False, **common)
    for label, curve in zip(p.labels, p.concentration):
        region = p.rois == label
        truth = float(np.median(p.truth["cbv_window"][region]))
        hand = _hand_cbv(p, curve)
        assert abs(truth / hand - 1) > 2e-3                       # the two rules differ on this series
        assert float(np.median(_values(layer, summed["maps"]["cbv"])[region])) == pytest.approx(truth, rel=5e-4)
        assert float(np.median(_values(layer, trapezoid["maps"]["cbv"])[region])) == pytest.approx(hand, rel=5e-4)
    _recorded(summed, "cbv_integration", "sum")


def test_cbv_window_first_pass_from_the_parameter_node(layer):
    from test_dsc_cbv_window_tmax import _first_pass_by_hand, _hand_cbv

    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(1, 12, 12), n_frames=90, tr=1.0, snr=float("inf"), lesion=False,
                               tumour=False, show=False)
    p = built["phantom"]
    first, stop = _first_pass_by_hand(p.aif)
    assert stop < len(p.times) - 10
    nodes = _by_panel(mod, _panel(mod, built, echoTime=p.te, kh=p.analysis_kh, cbvWindow="first_pass"))
    cbv = _values(layer, nodes["maps"]["cbv"])
    for label, curve in zip(p.labels, p.concentration):
        region = p.rois == label
        windowed, whole = _hand_cbv(p, curve, first, stop), _hand_cbv(p, curve)
        assert abs(windowed / whole - 1) > 2e-3
        assert float(np.median(cbv[region])) == pytest.approx(windowed, rel=1e-4), label
    _recorded(nodes, "cbv_window", "first_pass")


def test_refine_tmax_from_the_parameter_node(layer):
    from test_dsc_cbv_window_tmax import _regions_off_the_grid

    mod = layer.load_module("DSCDeconvolution")
    built = mod.loadDSCPhantom(shape=(1, 8, 8), tr=1.5, n_frames=60, snr=float("inf"),
                               delay_s=[0, 0.5, 1.0, 1.75, 2.25, 3.1, 3.7], cbf=60, cbv=4, lesion=False,
                               tumour=False, show=False)
    p = built["phantom"]
    fields = dict(echoTime=p.te, kh=p.analysis_kh, method="sSVD", svdThreshold=0.001)
    grid_nodes = _by_panel(mod, _panel(mod, built, **fields))
    refined_nodes = _by_panel(mod, _panel(mod, built, refineTmax=True, **fields))
    tissue = p.tissue_mask
    grid = _values(layer, grid_nodes["maps"]["tmax"])[tissue]
    refined = _values(layer, refined_nodes["maps"]["tmax"])[tissue]
    np.testing.assert_allclose(grid / p.tr, np.round(grid / p.tr), atol=1e-4)
    assert _regions_off_the_grid(p, _values(layer, refined_nodes["maps"]["tmax"])) >= 4   # of 6; measured 5
    truth = p.truth["tmax"][tissue]
    error_grid, error_refined = np.abs(grid - truth), np.abs(refined - truth)
    assert error_refined.max() < error_grid.max() - 0.2, (error_refined.max(), error_grid.max())
    assert error_refined.mean() < error_grid.mean() - 0.03, (error_refined.mean(), error_grid.mean())
    _recorded(refined_nodes, "refine_tmax", True)
    _recorded(grid_nodes, "refine_tmax", False)


# ------------------------------------------------------------------------------ dual echo through the panel

def test_panel_second_echo_removes_the_t1_bias(layer):
    """The panel's second-echo selector reaches the run (``processWithParameterNode``): with it the CBV reads
    the truth under a T1 effect; without it (the same panel, no second echo) it reads > 20 % low."""
    from perfusionai.dsc.maps import DEFAULT_KH

    mod = layer.load_module("DSCDeconvolution")
    # a first echo of 15 ms: its bolus dip is deep enough for the automatic baseline (the panel has no
    # baseline-frames field)
    first, echoes, arteries, brain = dual_echo_scene(0.015, 0.030)
    scene_nodes = {"series": echoes[0], "aifMask": arteries, "brainMask": brain}
    # the panel's kH spin box stops at 0.1: the maps are read at the default kH and rescaled (CBV is linear in kH)
    scale = first.analysis_kh / DEFAULT_KH
    gm = first.rois == GREY
    truth = float(np.median(first.truth["cbv_window"][gm]))
    dual = _by_panel(mod, _panel(mod, scene_nodes, method="oSVD", echoTime=0.015, secondEcho=echoes[1],
                                 echoTime2=0.03))
    assert scale * float(np.median(_values(layer, dual["maps"]["cbv"])[gm])) == pytest.approx(truth, rel=0.05)
    _recorded(dual, "te2", 0.03)
    assert _recorded_echo2(dual)
    # the same (scene-wide) parameter node with the second echo cleared
    single = _by_panel(mod, _panel(mod, dict(scene_nodes, series=echoes[1]), method="oSVD", echoTime=0.03,
                                   secondEcho=None, echoTime2=0.0))
    assert scale * float(np.median(_values(layer, single["maps"]["cbv"])[gm])) < 0.8 * truth


def _recorded_echo2(nodes) -> bool:
    """The run's job names a second-echo file."""
    recorded = json.loads(nodes["maps"]["cbv"].GetAttribute("PerfusionAI.Options"))
    return bool(recorded["job"]["options"].get("dsc_echo2"))
