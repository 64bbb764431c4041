"""``perfusionai demo`` end to end (slow: about 3 minutes of CPU time; ``pytest -m slow``).

What a new user sees: every section present and none failed, every figure with a caption that is a
sentence (not its file name), table numbers with at most 3 significant figures, the learned models
labelled as trained on phantoms, the DSC bias against the truth shown beside the parametric method,
and a run-time table.
"""

import html
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from perfusionai.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    path = run_demo(out, progress_mode="none")
    return path, path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_every_section_and_figure_is_there_with_a_caption(report):
    path, text = report
    titles = [html.unescape(t) for t in re.findall(r"<h2 id='s\d+'>(.*?)</h2>", text)]
    assert not any("FAILED" in t for t in titles), titles
    for expected in ("DSC perfusion", "Learned DSC", "Parametric response mapping", "CT-to-perfusion",
                     "Diffusion-relaxation", "Run time"):
        assert any(t.startswith(expected) for t in titles), (expected, titles)
    figures = re.findall(r"<figure><img src='(.*?)' alt='.*?'>(.*?)</figure>", text)
    assert len(figures) >= 15
    for src, caption in figures:
        assert (path.parent / src).is_file(), src
        cap = html.unescape(re.sub(r"</?figcaption>", "", caption))
        assert len(cap.split()) >= 8 and Path(src).stem not in cap, (src, cap)


@pytest.mark.slow
def test_numbers_have_three_significant_figures_at_most(report):
    _, text = report
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", text)]
    numbers = [c for c in cells if re.fullmatch(r"-?\d+\.\d+", c)]
    assert numbers
    too_long = [c for c in numbers if len(c.lstrip("-").replace(".", "").lstrip("0")) > 3]
    assert not too_long, too_long[:10]


@pytest.mark.slow
def test_learned_models_say_trained_on_phantoms_and_dsc_bias_is_explained(report):
    _, text = report
    assert text.count("trained on phantoms") >= 6
    assert "Known bias of SVD-type deconvolution" in text and "Which method for what" in text
    assert "cap " not in text and "reached:" not in text and "1 epochs" not in text
