"""DSCModel / DSCFit / DSCMapsJob: one computation behind the library, the job and the command line;
the method registry; parameter-named errors; the bad inputs of issue 13 (DSC items)."""

import json

import numpy as np
import pytest

from perfusionai import io
from perfusionai.cli import main
from perfusionai.dsc import DSCFit, DSCMapsJob, DSCMethod, DSCModel, register_method, resolve_method
from perfusionai.errors import ParameterError, PerfusionAIError
from perfusionai.phantoms.dsc import make_dsc_phantom


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    phantom = make_dsc_phantom(shape=(5, 24, 24), n_frames=40, tr=1.5, te=0.03, snr=50, seed=3)
    phantom.save(folder)
    return folder, phantom


def run(argv, capsys):
    code = main(argv + ["--progress", "none"])
    captured = capsys.readouterr()
    return code, captured.err


# ------------------------------------------------------------------ the job and the model


def test_job_round_trips_through_the_real_command_line_and_json(tmp_path):
    job = DSCMapsJob(dsc=str(tmp_path / "dsc.nii.gz"), out=str(tmp_path / "out"), te=0.025, tr=1.2,
                     aif_mask=str(tmp_path / "aif.nii.gz"), mask=str(tmp_path / "brain.nii.gz"), method="Tikhonov",
                     threshold=0.15, oi_threshold=0.05, tikhonov_lambda=0.07, tikhonov_criterion="lcurve",
                     discretisation="simpson", kh=0.8, rho=1.0, baseline_frames=7, leakage_correction=True,
                     model_path=str(tmp_path / "model"), cbv_integration="sum", cbv_window="first_pass",
                     refine_tmax=True, allow_unusual_tr=True, device="cpu")
    argv = job.to_argv()
    assert argv[:2] == ["dsc", "maps"] and "--lambda" in argv and "--oi" in argv and "--model" in argv
    assert DSCMapsJob.from_argv(argv) == job
    assert DSCMapsJob.from_json(json.loads(json.dumps(job.to_json()))) == job
    # every field of the job is an option of 'dsc maps' (dest names = field names)
    assert DSCMapsJob.from_argv(["--dsc", "x.nii.gz", "--out", "o"]) == DSCMapsJob(dsc="x.nii.gz", out="o")


def test_command_line_and_model_fit_give_identical_maps(phantom_dir, tmp_path, capsys):
    folder, phantom = phantom_dir
    out = tmp_path / "out"
    code, err = run(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03",
                     "--mask", str(folder / "brain_mask.nii.gz"), "--aif-mask", str(folder / "aif_mask.nii.gz"),
                     "--method", "tikhonov", "--lambda", "0.05", "--kh", "0.8", "--rho", "1.0",
                     "--cbv-window", "first_pass", "--refine-tmax", "--out", str(out)], capsys)
    assert code == 0, err
    fit = DSCModel(0.03, phantom.times, method="Tikhonov", tikhonov_lambda=0.05, kh=0.8, rho=1.0,
                   cbv_window="first_pass", refine_tmax=True).fit(phantom.signal, mask=phantom.brain_mask,
                                                                  aif_mask=phantom.aif_mask)
    assert isinstance(fit, DSCFit)
    for name in ("cbv", "cbf", "mtt", "tmax", "ttp"):
        written = io.read_volume(out / f"{name}.nii.gz").array
        np.testing.assert_array_equal(written, getattr(fit, name))
    summary = json.loads((out / "summary.json").read_text())
    # summary.json records the job; the job reproduces the run
    job = DSCMapsJob.from_json(summary["job"])
    assert job.method == "Tikhonov" and job.tikhonov_lambda == 0.05 and job.cbv_window == "first_pass"
    assert summary["medians_in_mask"] == pytest.approx(fit.summary()["medians_in_mask"], nan_ok=True)
    assert summary["options"]["tikhonov_criterion"] == "fixed"
    # the job run from Python writes the same and returns the fit
    result = job.replace(out=str(tmp_path / "again")).run()
    np.testing.assert_array_equal(result.fit.cbf, fit.cbf)
    assert (tmp_path / "again" / "aif.csv").is_file()


def test_fit_recovers_phantom_flow_and_exposes_every_map():
    p = make_dsc_phantom(shape=(4, 20, 20), n_frames=40, tr=1.5, snr=np.inf, seed=0, discretisation="inverse-crime")
    fit = DSCModel(p.te, tr=p.tr, method="sSVD", threshold=0.01).fit(p.signal, mask=p.brain_mask,
                                                                      aif_mask=p.aif_mask)
    gm = p.rois == 1
    assert np.median(fit.cbf[gm]) == pytest.approx(np.median(p.truth["cbf"][gm]), rel=0.02)
    assert set(fit.maps) == {"cbv", "cbf", "mtt", "tmax", "ttp"} and fit.k2 is None
    np.testing.assert_allclose(fit.mtt[gm], 60 * fit.cbv[gm] / fit.cbf[gm], rtol=1e-5)
    summary = fit.summary()
    assert summary["method"] == "sSVD" and summary["medians_in_mask"]["cbf"] == pytest.approx(
        float(np.median(fit.cbf[p.brain_mask])))
    # the AIF may also be given as a curve: the same maps as from the mask it came from
    again = DSCModel(p.te, tr=p.tr, method="sSVD", threshold=0.01,
                     baseline_frames=fit.baseline_frames).fit(p.signal, mask=p.brain_mask, aif=fit.aif)
    np.testing.assert_allclose(again.cbf[p.brain_mask], fit.cbf[p.brain_mask], rtol=1e-4)
    assert again.summary()["aif"]["source"] == "curve"


# ------------------------------------------------------------------ the registry


def test_registry_resolves_names_case_insensitively_and_refuses_unknown_ones():
    assert resolve_method("OSVD").name == "oSVD" and resolve_method("tikhonov").name == "Tikhonov"
    assert resolve_method("TMAX_NET").name == "tmax-net" and resolve_method("svd").name == "sSVD"
    assert resolve_method("sSVD").defaults["threshold"] == 0.2 and resolve_method("cSVD").defaults["threshold"] == 0.1
    assert resolve_method("oSVD").defaults["oi_threshold"] == 0.035
    assert resolve_method("phae").learned and not resolve_method("oSVD").learned
    assert resolve_method("phae").applies("oi_threshold")  # through its oSVD fallback
    assert not resolve_method("sSVD").applies("tikhonov_lambda")
    with pytest.raises(ParameterError, match="^method: unknown method 'fSVD'"):
        resolve_method("fSVD")


def test_adding_a_method_is_one_registry_entry():
    entry = register_method(DSCMethod("test-svd", "deconvolution", "sSVD under another name (test)",
                                      defaults={"threshold": 0.2}, options=("threshold",), solver="ssvd"))
    try:
        p = make_dsc_phantom(shape=(3, 16, 16), n_frames=30, snr=np.inf, seed=0)
        new = DSCModel(p.te, p.times, method="TEST-SVD").fit(p.signal, mask=p.brain_mask, aif_mask=p.aif_mask)
        old = DSCModel(p.te, p.times, method="sSVD").fit(p.signal, mask=p.brain_mask, aif_mask=p.aif_mask)
        np.testing.assert_array_equal(new.cbf, old.cbf)
        assert new.summary()["method"] == entry.name
    finally:
        from perfusionai.dsc import methods

        methods.METHODS.pop("test-svd")
        methods._LOOKUP.pop("test-svd")


# ------------------------------------------------------------------ errors in parameter terms


@pytest.mark.parametrize("options, parameter", [
    (dict(threshold=2.0), "threshold"), (dict(threshold=0.0), "threshold"), (dict(tikhonov_lambda=-1.0), "tikhonov_lambda"),
    (dict(tikhonov_criterion="elbow"), "tikhonov_criterion"), (dict(cbv_window="second_pass"), "cbv_window"),
    (dict(discretisation="spline"), "discretisation"), (dict(kh=0.0), "kh"), (dict(oi_threshold=0.0), "oi_threshold"),
])
def test_library_errors_name_parameters_not_flags(options, parameter):
    with pytest.raises(ParameterError) as info:
        DSCModel(0.03, tr=1.5, **options)
    assert info.value.parameter == parameter and "--" not in str(info.value)


@pytest.mark.parametrize("argv, flag", [
    (["--threshold", "2"], "--threshold"),          # issue 13 item 7: CBF 0 everywhere before
    (["--threshold", "0"], "--threshold"),
    (["--method", "tikhonov", "--lambda-criterion", "lcurve", "--baseline-frames", "45"], "--baseline-frames"),
])
def test_command_line_maps_parameters_to_flags(phantom_dir, tmp_path, capsys, argv, flag):
    folder, _ = phantom_dir
    code, err = run(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03", *argv,
                     "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith(f"perfusionai: error: {flag}: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ issue 13, DSC items


def test_tr_outside_plausible_range_refused_with_an_override(phantom_dir, tmp_path, capsys):
    folder, phantom = phantom_dir
    base = ["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03",
            "--aif-mask", str(folder / "aif_mask.nii.gz"), "--mask", str(folder / "brain_mask.nii.gz")]
    code, err = run(base + ["--tr", "1000", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "--tr: the frame interval 1000 s" in err and "0.1-10 s" in err and "--allow-unusual-tr" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    # the header says 1000 s (pixdim[4] 1000, unit seconds): refused naming the file
    slow = io.write_series(phantom.signal, phantom.geometry, tmp_path / "slow.nii.gz", tr=1000.0)
    assert io.read_series(slow).tr == pytest.approx(1000.0)
    code, err = run(["dsc", "maps", "--dsc", str(slow), "--te", "0.03", "--aif-mask", str(folder / "aif_mask.nii.gz"),
                     "--mask", str(folder / "brain_mask.nii.gz"), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "slow.nii.gz" in err and "1000 s" in err and not (tmp_path / "b").exists()
    # the explicit override accepts it (and the MTT scales with it)
    code, err = run(["dsc", "maps", "--dsc", str(slow), "--te", "0.03", "--aif-mask", str(folder / "aif_mask.nii.gz"),
                     "--mask", str(folder / "brain_mask.nii.gz"), "--allow-unusual-tr", "--out", str(tmp_path / "c")],
                    capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["inputs"]["frame_interval_s"] == pytest.approx(1000.0) and summary["options"]["allow_unusual_tr"]
    with pytest.raises(ParameterError, match="^tr: .*outside the plausible 0.1-10 s"):
        DSCModel(0.03, tr=0.05)


def test_series_whose_last_frames_are_zero_gives_one_line(phantom_dir, tmp_path, capsys):
    folder, phantom = phantom_dir
    cut = phantom.signal.copy()
    cut[..., -6:] = 0  # an interrupted acquisition: the last frames zero-filled
    path = io.write_series(cut, phantom.geometry, tmp_path / "cut.nii.gz", tr=1.5)
    for aif in (["--aif-mask", str(folder / "aif_mask.nii.gz")], ["--aif-auto"]):
        code, err = run(["dsc", "maps", "--dsc", str(path), "--te", "0.03", "--mask", str(folder / "brain_mask.nii.gz"),
                         *aif, "--out", str(tmp_path / "out")], capsys)
        assert code == 2, err
        assert "cut.nii.gz" in err and "6 frame(s) of 40" in err and "frame 35" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    # the bolus detector itself no longer ends in an IndexError when zero frames make the deepest point
    # late and the bolus falls into the reference frames (their spread hides the drop)
    from perfusionai.dsc.concentration import detect_bolus_arrival

    curve = np.r_[np.full(8, 100.0), np.full(3, 10.0), np.full(11, 100.0), np.zeros(3)][None, :]
    with pytest.raises(PerfusionAIError, match="^cut: no bolus passage found"):
        detect_bolus_arrival(curve, name="cut")


def test_aif_auto_without_a_mask_works_on_the_whole_image(tmp_path, capsys):
    assert run(["dsc", "phantom", "--out", str(tmp_path / "ph"), "--snr", "50"], capsys)[0] == 0
    code, err = run(["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03", "--aif-auto",
                     "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["aif"]["source"] == "automatic" and summary["aif"]["looks_arterial"] and not summary["warnings"]
    truth = json.loads((tmp_path / "ph" / "truth.json").read_text())
    arteries = io.read_volume(tmp_path / "ph" / "aif_mask.nii.gz").array > 0
    chosen = np.asarray(summary["aif"]["voxels_kji"])
    assert arteries[tuple(chosen.T)].all()  # every chosen voxel is arterial
    assert truth["acquisition"]["te_s"] == pytest.approx(0.03)


def test_messages_name_the_mask_files(phantom_dir, tmp_path, capsys):
    folder, phantom = phantom_dir
    tissue = io.write_volume((phantom.rois == 2).astype(np.uint8), phantom.geometry, tmp_path / "wm.nii.gz")
    code, err = run(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03", "--aif-mask", str(tissue),
                     "--mask", str(folder / "brain_mask.nii.gz"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{tissue}: " in err and "does not cover an artery" in err
    flat = phantom.signal.copy()
    flat[phantom.aif_mask] = flat[phantom.aif_mask][..., :1]
    flat_path = io.write_series(flat, phantom.geometry, tmp_path / "flat.nii.gz", tr=1.5)
    code, err = run(["dsc", "maps", "--dsc", str(flat_path), "--te", "0.03", "--aif-mask",
                     str(folder / "aif_mask.nii.gz"), "--mask", str(folder / "brain_mask.nii.gz"),
                     "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "aif_mask.nii.gz" in err and "AIF" in err, err


# ------------------------------------------------------------------ issue 15 item 4


def test_automatic_aif_without_arteries_in_the_search_region_warns(phantom_dir, tmp_path, capsys):
    folder, phantom = phantom_dir
    no_vessels = io.write_volume((phantom.brain_mask & ~phantom.aif_mask).astype(np.uint8), phantom.geometry,
                                 tmp_path / "no_vessels.nii.gz")
    code, err = run(["dsc", "maps", "--dsc", str(folder / "dsc.nii.gz"), "--te", "0.03", "--aif-auto",
                     "--mask", str(no_vessels), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "perfusionai: warning: " in err and "must contain arteries" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["aif"]["looks_arterial"] is False and any("arteries" in w for w in summary["warnings"])
    # the same series with the vessels in the search region: an arterial AIF, no warning
    fit = DSCModel(0.03, phantom.times).fit(phantom.signal, mask=phantom.brain_mask)
    assert fit.warnings == [] and fit.aif_info["looks_arterial"] is True
    # the tissue 'AIF' is what the warning is for: CBF many times too high
    gm = phantom.rois == 1
    bad = io.read_volume(tmp_path / "out" / "cbf.nii.gz").array
    assert np.median(bad[gm]) > 3 * np.median(fit.cbf[gm])


def test_out_folder_that_would_overwrite_an_input_is_refused(tmp_path, capsys):
    # a mask named like an output (cbf.nii.gz) inside --out: refused, the input untouched
    ph = make_dsc_phantom(shape=(3, 16, 16), n_frames=30, snr=np.inf, seed=0)
    ph.save(tmp_path)
    mask = io.write_volume(ph.brain_mask.astype(np.uint8), ph.geometry, tmp_path / "cbf.nii.gz")
    before = mask.read_bytes()
    code, err = run(["dsc", "maps", "--dsc", str(tmp_path / "dsc.nii.gz"), "--te", "0.03", "--mask", str(mask),
                     "--aif-mask", str(tmp_path / "aif_mask.nii.gz"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "cbf.nii.gz" in err and len(err.strip().splitlines()) == 1, err
    assert mask.read_bytes() == before


def test_every_dsc_maps_option_is_a_job_field_and_the_reverse():
    import argparse
    import dataclasses

    from perfusionai.cli import build_parser

    def verbs(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    maps = verbs(verbs(build_parser())["dsc"])["maps"]
    dests = {a.dest for a in maps._actions if a.option_strings and a.dest not in ("help", "progress")}
    assert dests == {f.name for f in dataclasses.fields(DSCMapsJob)}
    assert maps.get_default("job_class") is DSCMapsJob
