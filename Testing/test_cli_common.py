"""What every verb shares (issue 16): help text and defaults, progress on a terminal and in a log,
SIGTERM cleaning up like Ctrl-C, warnings as one line."""

from __future__ import annotations

import argparse
import io as _io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perfusionai import cli
from perfusionai.progress import step_progress, terminal_progress

REPO = Path(__file__).resolve().parents[1]


def _missing_help(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for path, sub, help_text in cli.iter_parsers(parser):
        where = " ".join(("perfusionai",) + path)
        if path and not (sub.description or "").strip():
            missing.append(f"{where}: no description")
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help is argparse.SUPPRESS:  # hidden aliases kept for one release
                continue
            if not action.option_strings:
                if not (action.help or "").strip():
                    missing.append(f"{where} {action.dest}: no help")
                continue
            if not (action.help or "").strip():
                missing.append(f"{where} {'/'.join(action.option_strings)}: no help")
    return missing


def test_every_option_of_every_verb_has_help_and_every_domain_a_description():
    missing = _missing_help(cli.build_parser())
    assert not missing, f"{len(missing)} without help:\n" + "\n".join(missing)


def test_help_walker_sees_a_missing_help():
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="domain")
    dom = sub.add_parser("dom")  # no help, no description
    dom.add_argument("--seed", type=int, default=0)
    dom.add_argument("--hidden", help=argparse.SUPPRESS)
    assert _missing_help(parser) == ["perfusionai dom: no description", "perfusionai dom --seed: no help"]


def test_defaults_shown_in_help():
    verbs = {path: sub for path, sub, _help in cli.iter_parsers(cli.build_parser())}
    flat = " ".join(verbs[("dsc", "maps")].format_help().split())
    assert "default: 0.73" in flat and "default: 1.04" in flat  # --kh, --rho
    assert "(default: not set)" in flat  # an option without a default says so


def test_formatter_keeps_written_defaults_and_flags():
    parser = argparse.ArgumentParser(prog="x", formatter_class=cli.DefaultsHelpFormatter)
    parser.add_argument("--a", type=float, default=1.5, help="a number")
    parser.add_argument("--b", default=None, help="a file")
    parser.add_argument("--c", action="store_true", help="a switch")
    parser.add_argument("--d", default=3, help="three (default: from the header)")
    parser.add_argument("--e", nargs="+", type=int, default=[1, 2], help="sizes")
    flat = " ".join(parser.format_help().split())
    assert "a number (default: 1.5)" in flat and "a file (default: not set)" in flat
    assert "a switch (default" not in flat and "three (default: from the header)" in flat
    assert "sizes (default: 1 2)" in flat


def test_step_lines_when_not_a_terminal():
    clock = iter([0.0, 1.0, 2.0, 6.0, 7.0, 8.0, 20.0, 21.0])
    out = _io.StringIO()
    update = step_progress(out, min_interval=5.0, clock=lambda: next(clock), stamp=lambda: "12:00:00")
    update(0.0, "reading")          # first: printed
    update(0.01, "reading")         # 1 s later: rate-limited
    update(0.5, "fitting")          # 2 s later: rate-limited
    update(0.52, "fitting")         # 6 s later: printed (new message since the last line)
    update(0.53, "fitting")         # 7 s: too soon
    update(0.54, "fitting")         # 8 s: too soon
    update(0.545, "fitting")        # 20 s: same message, fraction grew < 5 points: skipped
    update(1.0, "done")             # the end is always printed
    assert out.getvalue().splitlines() == ["12:00:00   0% reading", "12:00:00  52% fitting", "12:00:00 100% done"]


def test_terminal_progress_chooses_by_isatty():
    class Tty(_io.StringIO):
        def isatty(self):
            return True

    lines = terminal_progress("x", stream=_io.StringIO())
    lines(0.42, "step")
    bar = terminal_progress("x", stream=Tty())
    assert getattr(lines, "__name__", "") == "update" and bar is not lines
    if hasattr(bar, "close"):
        bar.close()


def test_cli_progress_in_a_log(tmp_path):
    # `perfusionai ... > log 2>&1`: timestamped lines, not a silent run and not a bar's carriage returns
    from perfusionai.phantoms.dsc import make_dsc_phantom

    make_dsc_phantom(shape=(2, 8, 8), n_frames=30, tr=1.5, te=0.03, seed=0).save(tmp_path / "ph")
    proc = subprocess.run([sys.executable, "-m", "perfusionai", "dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"),
                           "--te", "0.03", "--aif-mask", str(tmp_path / "ph" / "aif_mask.nii.gz"),
                           "--method", "sSVD", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    stamped = [ln for ln in lines if len(ln) > 9 and ln[2] == ":" and ln[5] == ":" and "%" in ln]
    assert stamped and "\r" not in proc.stderr, proc.stderr
    assert stamped[-1].split()[1] == "100%", proc.stderr


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from perfusionai import cli, io

        def handler(args):
            with io.atomic_output_dir({str(tmp_path / 'out')!r}) as stage:
                (stage / "cbf.nii.gz").write_text("half")
                print("staged", flush=True)
                time.sleep(60)

        parser = cli.build_parser
        def build():
            p = parser()
            for path, sub, _help in cli.iter_parsers(p):
                if path == ("demo",):
                    sub.set_defaults(handler=handler)
            return p
        cli.build_parser = build
        sys.exit(cli.main(["demo", "--out", "unused"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    assert proc.stdout.readline().strip() == "staged"
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_TERMINATED, err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no stage, no output folder


def test_warning_printed_as_one_line(tmp_path, capsys, monkeypatch):
    import warnings

    from perfusionai.errors import PerfusionAIWarning

    def handler(args):
        warnings.warn("x.nii.gz: the qform and the sform disagree", PerfusionAIWarning)
        return 0

    original = cli.build_parser

    def build():
        parser = original()
        for path, sub, _help in cli.iter_parsers(parser):
            if path == ("demo",):  # the verb's own default wins over the top level's
                sub.set_defaults(handler=handler)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err.strip() == "perfusionai: warning: x.nii.gz: the qform and the sform disagree"


def test_disk_full_through_the_cli_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import SimpleITK as sitk

    from perfusionai.phantoms.dsc import make_dsc_phantom

    make_dsc_phantom(shape=(2, 8, 8), n_frames=30, tr=1.5, te=0.03, seed=0).save(tmp_path / "ph")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sitk, "WriteImage", full)
    code = cli.main(["dsc", "maps", "--dsc", str(tmp_path / "ph" / "dsc.nii.gz"), "--te", "0.03",
                     "--aif-mask", str(tmp_path / "ph" / "aif_mask.nii.gz"), "--method", "sSVD",
                     "--out", str(tmp_path / "out"), "--progress", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_every_help_page_renders():
    pages = 0
    for path, sub, _help in cli.iter_parsers(cli.build_parser()):
        text = sub.format_help()
        assert text.startswith("usage: perfusionai"), path
        pages += 1
    assert pages > 30


def test_sigterm_handler_lets_forked_workers_die():
    """A worker forked during a run (nnU-Net's preprocessing pool) inherits the SIGTERM handler; when its
    pool terminates it, it must die, not raise Terminated and hang the pool."""
    import multiprocessing
    import os
    import signal
    import time

    from perfusionai import cli

    previous = signal.signal(signal.SIGTERM, cli._on_sigterm)
    saved_pid, cli._HANDLER_PID = cli._HANDLER_PID, os.getpid()
    try:
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.3)
        worker.terminate()
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        cli._HANDLER_PID = saved_pid


# ---------------------------------------------------------------- one name per idea (issue 16)

#: Option names that mean one idea; at most one of each group may be visible anywhere in the CLI, the
#: others are hidden aliases kept for one release.
SYNONYMS = (
    ("--learning-rate", "--lr"),
    ("--architecture", "--arch"),
    ("--subjects", "--patients", "--n", "--cases"),
    ("--ref", "--reference"),
    ("--median-size", "--median"),
    ("--shape", "--input-shape"),
    ("--trained-on-phantoms", "--phantom-data"),
    ("--progress", "--no-progress"),
)
#: The first name of each group is the one every verb shows.
CANONICAL = {group[0] for group in SYNONYMS}


def _visible_verbs():
    """``(path, parser, {visible option: action}, {hidden option: action})`` of every listed verb."""
    for path, sub, help_text in cli.iter_parsers(cli.build_parser()):
        if path and help_text is None:  # an old verb name, not listed in its domain's help
            continue
        visible, hidden = {}, {}
        for action in sub._actions:
            for flag in action.option_strings:
                (hidden if action.help is argparse.SUPPRESS else visible)[flag] = action
        yield path, sub, visible, hidden


def test_one_visible_name_per_idea_and_old_names_are_aliases():
    shown: dict = {}
    for path, _sub, visible, hidden in _visible_verbs():
        for group in SYNONYMS:
            for flag in set(group) & set(visible):
                shown.setdefault(group, set()).add(flag)
            for old in set(group) & set(hidden):  # an old name sets what the shown name sets
                assert any(visible[f].dest == hidden[old].dest for f in set(group) & set(visible)), (path, old)
    mixed = {group: names for group, names in shown.items() if len(names) > 1 or not names <= CANONICAL}
    assert not mixed, f"one idea shown under several names, or not under its canonical one: {mixed}"
    verbs = [path for path, *_ in _visible_verbs()]
    plural = [p for p in verbs if p and p[-1].endswith("s") and p[:-1] + (p[-1][:-1],) in verbs]
    assert not plural, f"a verb listed under its singular and plural names: {plural}"


@pytest.mark.parametrize("old, new", [
    (["dsc", "train-tmax", "--dsc", "a.nii.gz", "--out", "m", "--arch", "conv1", "--lr", "0.01"],
     ["dsc", "train-tmax", "--dsc", "a.nii.gz", "--out", "m", "--architecture", "conv1", "--learning-rate", "0.01"]),
    (["dsc", "train-phae", "--dsc", "a.nii.gz", "--mask", "b.nii.gz", "--out", "m", "--lr", "0.01"],
     ["dsc", "train-phae", "--dsc", "a.nii.gz", "--mask", "b.nii.gz", "--out", "m", "--learning-rate", "0.01"]),
    (["ctpm", "phantoms", "--out", "c", "--n", "3"], ["ctpm", "phantom", "--out", "c", "--subjects", "3"]),
    (["dr", "phantom", "--out", "c", "--patients", "3"], ["dr", "phantom", "--out", "c", "--subjects", "3"]),
    (["prm", "ct", "--insp", "i", "--exp", "e", "--out", "o", "--median", "5"],
     ["prm", "ct", "--insp", "i", "--exp", "e", "--out", "o", "--median-size", "5"]),
    (["prm", "predict", "--vibe", "v", "--model", "m", "--out", "o", "--reference", "r"],
     ["prm", "predict", "--vibe", "v", "--model", "m", "--out", "o", "--ref", "r"]),
    (["batch", "--cohort", "c.csv", "--out", "o", "--no-progress", "--", "dsc", "maps"],
     ["batch", "--cohort", "c.csv", "--out", "o", "--progress", "none", "--", "dsc", "maps"]),
])
def test_old_option_names_parse_to_the_same_values(old, new):
    parser = cli.build_parser()
    parsed_old, parsed_new = vars(parser.parse_args(old)), vars(parser.parse_args(new))
    for key in ("handler", "verb"):  # the old verb name selects the same handler under its own name
        parsed_old.pop(key, None), parsed_new.pop(key, None)
    assert parsed_old == parsed_new
