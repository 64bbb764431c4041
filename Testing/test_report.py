"""The report's building blocks: numbers to 3 significant figures, one colour window per quantity,
captions that are sentences (not file names), and figures that render."""

import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")


@pytest.mark.parametrize("value, text", [(0.001456, "0.00146"), (0.0002399, "0.000240"), (37.42, "37.4"),
                                         (1234.5, "1230"), (-0.0349, "-0.0349"), (2.5e-5, "2.50e-05"), (0.0, "0"),
                                         (3, "3"), (float("nan"), "n/a"), (90.0, "90.0")])
def test_numbers_to_three_significant_figures(value, text):
    from perfusionai.report.html import fmt

    assert fmt(value) == text


def test_table_cells_use_three_significant_figures():
    from perfusionai.report.html import table_html

    html = table_html(["a", "b"], [[0.001456, np.float32(12.3456)], ["x", 7]])
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells == ["0.00146", "12.3", "x", "7"]


def _maps():
    rng = np.random.default_rng(0)
    truth = np.full((4, 8, 8), 60.0)
    truth[:, :4] = 20.0
    estimate = 0.6 * truth + rng.normal(0, 1, truth.shape)
    outlier = estimate.copy()
    outlier[0, 0, :3] = 5000.0  # three wild voxels of one estimate
    return truth, estimate, outlier


def test_truth_and_estimates_share_one_window_and_differences_are_symmetric():
    from perfusionai.report.figures import comparison_window, scale_windows

    truth, estimate, outlier = _maps()
    window = comparison_window(truth, [estimate, outlier])
    assert window[0] == 0.0 and 60.0 <= window[1] < 100.0     # three outliers do not set the window
    rows = {"truth": truth, "est": estimate, "out": outlier, "diff": estimate - truth}
    scale_of, groups, windows, cmaps = scale_windows(
        rows, scales={"truth": "CBF", "est": "CBF", "out": "CBF", "diff": "CBF error"}, differences=("diff",),
        ranges={"CBF": window})
    assert groups == {"CBF": ["truth", "est", "out"], "CBF error": ["diff"]}
    assert windows["CBF"] == window
    lo, hi = windows["CBF error"]
    assert lo == -hi and 23.0 <= hi <= 27.0                   # |estimate - truth| is 8 or 24 (+ noise) here
    assert cmaps["CBF error"] == "RdBu_r"


def test_montage_writes_one_colour_bar_per_scale(tmp_path, monkeypatch):
    import matplotlib.figure

    from perfusionai.report import figures

    truth, estimate, _ = _maps()
    labels = []
    real = matplotlib.figure.Figure.colorbar

    def spy(self, *args, **kwargs):
        bar = real(self, *args, **kwargs)
        labels.append(bar)
        return bar

    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", spy)
    path = figures.montage_png({"truth": truth, "est": estimate, "diff": estimate - truth}, tmp_path / "m.png",
                               slices=[1, 2], labels={"truth": "CBF truth", "est": "CBF estimate",
                                                      "diff": "estimate minus truth"},
                               scales={"truth": "CBF", "est": "CBF", "diff": "CBF error"}, differences=("diff",),
                               units={"CBF": "mL/100 g/min", "CBF error": "mL/100 g/min"}, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [bar.ax.get_ylabel() for bar in labels] == ["CBF [mL/100 g/min]", "CBF error [mL/100 g/min]"]


def test_report_shows_captions_not_file_names(tmp_path):
    from perfusionai.report import figures
    from perfusionai.report.html import Figure, ReportSection, write_report

    png = figures.bar_png({"a": 1.0, "b": 2.0}, tmp_path / "some_file_name.png", ylabel="s")
    caption = "Bar b is twice bar a: look at their heights."
    path = write_report([ReportSection("S", "<p>x</p>", [Figure(png, caption)])], tmp_path)
    text = path.read_text()
    assert f"<figcaption>{caption}</figcaption>" in text
    assert "<figcaption>some_file_name</figcaption>" not in text
