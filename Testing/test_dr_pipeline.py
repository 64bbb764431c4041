"""Array-level pipeline pieces the Slicer module relies on: header b-values/TEs, ROI statistics, prediction."""

import numpy as np
import pytest

from perfusionai.dr import learners, models, pipeline
from perfusionai.errors import PerfusionAIError
from perfusionai.phantoms.dr import make_dr_cohort


def test_bvalues_from_dwmri_nrrd_keys_follow_the_gradient_norm_convention():
    attrs = {"DWMRI_b-value": "1000", "DWMRI_gradient_0000": "0 0 0", "DWMRI_gradient_0001": "1 0 0",
             "DWMRI_gradient_0002": "0 0.7071067811865476 0.7071067811865476",
             "DWMRI_gradient_0003": "0.5 0 0", "EchoTime": "82"}
    bvals, tes = pipeline.protocol_from_attributes(attrs, 4)
    np.testing.assert_allclose(bvals, [0, 1000, 1000, 250], rtol=1e-12)
    np.testing.assert_array_equal(tes, [82, 82, 82, 82])


def test_explicit_attributes_win_and_bad_ones_are_refused():
    bvals, tes = pipeline.protocol_from_attributes({"PerfusionAI.bvals": "0, 50 100", "PerfusionAI.tes": "80 80 90",
                                                    "DWMRI_b-value": "3000"}, 3)
    assert bvals.tolist() == [0, 50, 100] and tes.tolist() == [80, 80, 90]
    assert pipeline.protocol_from_attributes({}, 3) == (None, None)
    with pytest.raises(PerfusionAIError, match="2 b-values for 3 volumes"):
        pipeline.protocol_from_attributes({"bvals": "0 50"}, 3, source="node")
    with pytest.raises(PerfusionAIError, match="not a list of numbers"):
        pipeline.protocol_from_attributes({"tes": "eighty"}, 3)


def test_roi_statistics_are_the_plain_statistics_of_the_roi_voxels():
    rng = np.random.default_rng(0)
    adc = rng.uniform(0.5, 2.0, (2, 5, 5))
    roi = np.zeros((2, 5, 5), bool)
    roi[1, 1:4, 1:4] = True
    rows = pipeline.roi_statistics({"adc": adc}, roi, "tumour")
    values = adc[roi]
    row = rows[0]
    assert row["roi"] == "tumour" and row["map"] == "adc" and row["units"] == "um2/ms" and row["voxels"] == 9
    assert row["mean"] == pytest.approx(values.mean()) and row["median"] == pytest.approx(np.median(values))
    assert row["p75"] - row["p25"] == pytest.approx(np.subtract(*np.percentile(values, [75, 25])))


def test_predict_series_on_a_clinical_series_matches_the_learner():
    cohort = make_dr_cohort(3, shape=(2, 20, 20), snr=60, seed=5)
    feats = [learners.patient_features(p.dwi, p.protocol, p.tumour, p.name) for p in cohort]
    model = learners.train(feats[1:], "lr", "maps-to-maps")
    target = cohort[0]
    clinical, protocol = target.clinical()
    maps, signals, info = pipeline.predict_series(clinical, protocol, model, target.tumour)
    direct = learners.predict(model, feats[0])
    assert signals is None and info["strategy"] == "maps-to-maps" and info["voxels"] == int(target.tumour.sum())
    for name in learners.M2M_OUTPUTS:
        np.testing.assert_allclose(maps[name][target.tumour], direct[name], rtol=1e-5)
        assert np.all(maps[name][~target.tumour] == 0)
    # the model's clinical b-values must be present
    with pytest.raises(PerfusionAIError, match="b = 900"):
        pipeline.predict_series(clinical[..., :4], models.Protocol(protocol.bvals[:4]), model)
