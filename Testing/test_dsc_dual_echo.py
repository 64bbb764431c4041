"""Dual-echo delta R2* with TE = 0 extrapolation (perfusionai.dsc.dual_echo): exact on a simulated
two-echo series with T1 leakage, and OSIPI's real dual-echo curves (LCB_BNI_USA notebook data)."""

from __future__ import annotations

import numpy as np
import pytest

from perfusionai.dsc.dual_echo import dual_echo_delta_r2star
from perfusionai.errors import ParameterError, PerfusionAIError
from perfusionai.phantoms.dsc import arterial_input



def test_exact_on_two_echoes_with_t1_leakage():
    t = np.arange(80) * 1.5
    delta = arterial_input(t, 15.0, 20.0, 3.0, 1.5)                     # true delta R2* (1/s)
    leak = 1.0 + 0.3 * np.clip((t - 20.0) / 40.0, 0, 1)                  # T1 shortening raises S(TE=0) by 30 %
    te1, te2, r2_0 = 0.002, 0.030, 25.0
    s1 = 5000.0 * leak * np.exp(-te1 * (r2_0 + delta))
    s2 = 5000.0 * leak * np.exp(-te2 * (r2_0 + delta))
    result = dual_echo_delta_r2star(s1[None], s2[None], te1, te2, baseline_frames=8)
    np.testing.assert_allclose(result.delta_r2star[0], delta, atol=1e-3)
    np.testing.assert_allclose(result.s_te0_ratio[0], leak, rtol=1e-5)
    assert result.r2star_baseline[0] == pytest.approx(r2_0, rel=1e-9)
    single = -np.log(s2 / s2[:8].mean()) / te2                           # what one echo would read
    assert single[-1] < delta[-1] - 5.0                                  # leakage drives it below the truth


def test_osipi_dual_echo_curves_remove_t1_leakage(shared_external):
    from scipy.io import loadmat

    path = shared_external / "dsc" / "osipi_lcb_dual_echo" / "data.mat"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    data = loadmat(path)
    te1, te2 = float(data["TE1"][0, 0]), float(data["TE2"][0, 0])
    curves = {name: data[f"{name}_SIt"].astype(np.float64) for name in ("tumor", "NAWM", "AIF")}
    res = {name: dual_echo_delta_r2star(c[0][None], c[1][None], te1, te2, baseline_frames=40)
           for name, c in curves.items()}
    tumour_single = -np.log(curves["tumor"][1] / curves["tumor"][1][:40].mean()) / te2
    # the enhancing tumour's TE2 signal overshoots its baseline: single echo reads a negative tail ...
    assert tumour_single[-30:].mean() < -4.0
    # ... the dual-echo curve stays positive, and the TE = 0 signal shows the T1 leakage
    assert res["tumor"].delta_r2star[0, -30:].mean() > 4.0
    assert res["tumor"].s_te0_ratio[0, -30:].mean() > 1.3
    for name in ("NAWM", "AIF"):                                          # no leakage: both ways agree
        assert abs(res[name].s_te0_ratio[0, -30:].mean() - 1.0) < 0.02
        single = -np.log(curves[name][1] / curves[name][1][:40].mean()) / te2
        assert np.max(res[name].delta_r2star[0]) == pytest.approx(np.max(single), rel=0.1)
    assert np.argmax(res["AIF"].delta_r2star[0]) <= np.argmax(res["NAWM"].delta_r2star[0])  # artery first


def test_errors():
    s = np.ones((2, 20))
    with pytest.raises(ParameterError, match="te2"):
        dual_echo_delta_r2star(s, s, 0.03, 0.02, 5)
    with pytest.raises(PerfusionAIError, match="second echo"):
        dual_echo_delta_r2star(s, np.ones((2, 21)), 0.002, 0.03, 5)
    with pytest.raises(ParameterError, match="baseline_frames"):
        dual_echo_delta_r2star(s, s, 0.002, 0.03, 25)


def test_dsc_maps_with_a_second_echo(tmp_path):
    """``dsc maps --dsc-echo2 E2 --te2 S``: a T1 effect that raises both echoes' signal in the tissue
    (as leakage does) biases single-echo CBV low; the dual-echo maps read the truth."""
    from perfusionai import io
    from perfusionai.cli import main
    from perfusionai.phantoms.dsc import make_dsc_phantom

    kw = dict(shape=(2, 20, 20), n_frames=50, tr=1.0, snr=np.inf, lesion=False, tumour=False, tissue_kappa=10,
              aif_peak=35, discretisation="fine")
    first = make_dsc_phantom(te=0.005, **kw)
    second = make_dsc_phantom(te=0.030, **kw)
    ramp = 1.0 + 0.25 * np.clip((first.times - 12.0) / 20.0, 0, 1)       # T1 effect, tissue only
    tissue = first.tissue_mask[..., None]
    first.save(tmp_path / "e1")
    second.save(tmp_path / "e2")
    for folder, ph in (("e1", first), ("e2", second)):
        io.write_series(np.where(tissue, ph.signal * ramp, ph.signal).astype(np.float32), ph.geometry,
                        tmp_path / folder / "dsc.nii.gz", tr=ph.tr)
    common = ["--aif-mask", str(tmp_path / "e1" / "aif_mask.nii.gz"), "--mask", str(tmp_path / "e1" / "brain_mask.nii.gz"),
              "--kh", str(first.analysis_kh), "--baseline-frames", "8", "--progress", "none"]
    assert main(["dsc", "maps", "--dsc", str(tmp_path / "e2" / "dsc.nii.gz"), "--te", "0.03", *common,
                 "--out", str(tmp_path / "single")]) == 0
    assert main(["dsc", "maps", "--dsc", str(tmp_path / "e1" / "dsc.nii.gz"), "--te", "0.005",
                 "--dsc-echo2", str(tmp_path / "e2" / "dsc.nii.gz"), "--te2", "0.03", *common,
                 "--out", str(tmp_path / "dual")]) == 0
    gm = first.rois == 1
    truth = float(np.median(first.truth["cbv_window"][gm]))
    single = float(np.median(io.read_volume(tmp_path / "single" / "cbv.nii.gz").array[gm]))
    dual = float(np.median(io.read_volume(tmp_path / "dual" / "cbv.nii.gz").array[gm]))
    assert dual == pytest.approx(truth, rel=0.02)
    assert single < 0.8 * truth
    # a second echo of the same shape on another grid (shifted 5 mm) is refused in one line naming it,
    # and nothing is written
    from perfusionai.io import Geometry

    g = second.geometry
    shifted = Geometry(g.shape, g.spacing, tuple(o + 5.0 for o in g.origin), g.direction)
    io.write_series(second.signal.astype(np.float32), shifted, tmp_path / "shifted.nii.gz", tr=second.tr)
    assert main(["dsc", "maps", "--dsc", str(tmp_path / "e1" / "dsc.nii.gz"), "--te", "0.005",
                 "--dsc-echo2", str(tmp_path / "shifted.nii.gz"), "--te2", "0.03", *common,
                 "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
