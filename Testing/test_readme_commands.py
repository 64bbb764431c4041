"""The README's command blocks, as written.

Every ```bash block of README.md is read when the test runs (nothing is copied here), except the
install commands of "## Two commands" and the Slicer build/launch blocks (cmake, git clone, Slicer).
Each line that starts with ``perfusionai`` (continuation lines joined) is one command.

* Default run (seconds): every command must be accepted by the real command-line parser as written:
  the verb exists, every option is known, every required option is there (nothing is executed).
  Commands in the "DSC perfusion maps" block are also executed, in order, in a temporary folder.
* ``pytest -m slow Testing/test_readme_commands.py``: every command is executed, in README order, in
  one temporary folder, so each block can use what an earlier one wrote. Budget: about 15 minutes on
  2 cores with the quick settings below.

Small settings: a command may end with a comment ``# quick: <options>``; the test appends those
options (argparse keeps the last value), or, when the text starts with ``perfusionai``, runs that
command instead. Everything after ``# quick:`` is the test's; the rest of the comment is the
reader's. Commands of the demo (``perfusionai demo``) are run with ``--only dsc`` in the slow run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: Blocks containing one of these are not commands a user runs against the package (install, build, Slicer).
SKIP_BLOCK_WORDS = ("pip install", "cmake", "git clone", "Slicer ")
#: Sections whose commands the default run executes (fast: a phantom and a few maps).
EXECUTED_BY_DEFAULT = ("DSC perfusion maps",)
#: Per-command limit of the slow run (s).
COMMAND_TIMEOUT_S = 600


@dataclass(frozen=True)
class Command:
    section: str
    line: int
    text: str      # as written, without the comment
    quick: str     # the ``# quick:`` text or ""

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)[1:]

    def test_argv(self) -> list[str]:
        if self.quick.startswith("perfusionai"):
            return shlex.split(self.quick)[1:]
        return self.argv + shlex.split(self.quick)

    @property
    def id(self) -> str:
        return f"L{self.line}:" + " ".join(self.argv[:2])


def readme_commands() -> list[Command]:
    """Every ``perfusionai ...`` command of the README's bash blocks, in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    commands, section, block, start = [], "", None, 0
    for number, line in enumerate(lines, start=1):
        if block is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip().startswith("```"):
            if block is None and line.strip() == "```bash":
                block, start = [], number
            elif block is not None:
                body = "\n".join(text for _, text in block)
                if not any(word in body for word in SKIP_BLOCK_WORDS):
                    commands.extend(_commands_of(block, section))
                block = None
            continue
        if block is not None:
            block.append((number, line))
    return commands


def _commands_of(block: list[tuple[int, str]], section: str) -> list[Command]:
    joined, out = [], []
    for number, line in block:  # join backslash continuations
        if joined and joined[-1][1].rstrip().endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1].rstrip()[:-1] + " " + line.strip())
        else:
            joined.append((number, line))
    for number, line in joined:
        text = line.strip()
        if not text.startswith("perfusionai"):
            continue
        quick = ""
        match = re.search(r"#\s*quick:\s*(.*)$", text)
        if match:
            quick = match.group(1).strip()
        command = _strip_comment(text)
        out.append(Command(section, number, command, quick))
    return out


def _strip_comment(text: str) -> str:
    """The command without its trailing ``# ...`` comment (a ``#`` inside quotes stays)."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return shlex.join(list(lexer))


COMMANDS = readme_commands()


def test_readme_has_commands_for_every_domain():
    verbs = {c.argv[0] for c in COMMANDS if c.argv}
    assert {"dsc", "prm", "ctpm", "dr", "lobes"} <= verbs, verbs


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_command_is_accepted_by_the_parser_as_written(command):
    """The verb exists and every option is known and well-formed (argparse exits 2 otherwise)."""
    from perfusionai.cli import build_parser

    assert "..." not in command.text, f"README line {command.line}: a placeholder '...' cannot run as written"
    assert not re.search(r"(^|\s)\[", command.text), \
        f"README line {command.line}: optional parts in [brackets] cannot run as written"
    parser = build_parser()
    try:
        parser.parse_args(command.argv)
    except SystemExit as exc:
        pytest.fail(f"README line {command.line}: '{command.text}' is refused by the parser (exit {exc.code})")


def _run(command: Command, cwd: Path) -> None:
    argv = command.test_argv()
    if argv[:1] == ["demo"] and "--only" not in argv:
        argv += ["--only", "dsc"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", "perfusionai", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        pytest.fail(f"README line {command.line}: '{shlex.join(['perfusionai', *argv])}' exited "
                    f"{done.returncode}: {' | '.join(tail)}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


DEFAULT = [c for c in COMMANDS if c.section in EXECUTED_BY_DEFAULT]


@pytest.mark.parametrize("command", DEFAULT, ids=[c.id for c in DEFAULT])
def test_dsc_commands_run_as_written(command, workdir):
    _run(command, workdir)


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme_chain")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_every_command_runs_as_written_in_order(command, chain_dir):
    _run(command, chain_dir)
