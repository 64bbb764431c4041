"""The README's command blocks, as written.

Every ```bash block of README.md is read when the test runs (nothing is copied here), except the
install commands of "## Two commands" and the Slicer build/launch blocks (cmake, git clone, Slicer).

* Every ``perfusionai`` command of those blocks (continuation lines joined, ``a && b`` split) must
  be accepted by the real command-line parser as written: the verb exists, every option is known,
  every required option is there, no ``...`` or ``[optional]`` part is left.
* Then every block is executed with bash (``set -e``), in README order, in one temporary folder, so a
  block can use what an earlier one wrote; the ``perfusionai`` on the PATH is this interpreter's.
  This is part of the default run: about 4 minutes on 2 cores with the quick settings, 10 minutes at
  most per block.

Small settings: a command may end with a comment ``# quick: <options>`` (the text after ``quick:``
starts with ``-``); the test appends those options to the command (argparse keeps the last value).
``# quick: perfusionai ...`` replaces the command. Any other ``# quick: ...`` text is a note for the
reader and is ignored.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
#: Blocks containing one of these are not commands a user runs against the package (install, build, Slicer).
SKIP_BLOCK_WORDS = ("pip install", "cmake", "git clone", "Slicer ")
#: Per-block limit (s).
BLOCK_TIMEOUT_S = 600


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
        return shlex.split(quick_line(self.text, self.quick))[1:]

    @property
    def id(self) -> str:
        return f"L{self.line}:" + " ".join(self.argv[:2])


def quick_line(command: str, quick: str) -> str:
    """The command the test runs: ``command`` with the ``# quick:`` options, or the quick command."""
    if quick.startswith("perfusionai"):
        return quick
    if quick.startswith("-"):
        return f"{command} {quick}"
    return command


@dataclass(frozen=True)
class Block:
    section: str
    line: int
    lines: tuple[tuple[int, str], ...]

    def script(self) -> str:
        """The block for bash, each command carrying its quick options (comments dropped)."""
        out = []
        for number, line in self.lines:
            match = re.search(r"#\s*quick:\s*(.*)$", line)
            if match and line.strip().startswith("perfusionai"):
                line = quick_line(_strip_comment(line.rstrip().rstrip("\\")), match.group(1).strip()) + (
                    " \\" if line.rstrip().endswith("\\") else "")
            out.append(line)
        return "\n".join(out) + "\n"

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.section}"


def readme_blocks() -> list[Block]:
    """The README's bash blocks a user runs against the package, in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, section, block, start = [], "", None, 0
    for number, line in enumerate(lines, start=1):
        if block is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip().startswith("```"):
            if block is None and line.strip() == "```bash":
                block, start = [], number
            elif block is not None:
                body = "\n".join(text for _, text in block)
                if not any(word in body for word in SKIP_BLOCK_WORDS):
                    blocks.append(Block(section, start, tuple(block)))
                block = None
            continue
        if block is not None:
            block.append((number, line))
    return blocks


def readme_commands() -> list[Command]:
    """Every ``perfusionai ...`` command of the README's bash blocks, in order."""
    return [command for block in readme_blocks() for command in _commands_of(list(block.lines), block.section)]


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
        for command in re.split(r"\s(?:&&|;)\s", _strip_comment(text, keep_operators=True)):
            if command.strip().startswith("perfusionai"):
                out.append(Command(section, number, command.strip(), quick))
    return out


def _strip_comment(text: str, keep_operators: bool = False) -> str:
    """The command without its trailing ``# ...`` comment (a ``#`` inside quotes stays); with
    ``keep_operators`` the shell's ``&&`` and ``;`` stay unquoted so the line can be split on them."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    if keep_operators:
        return " ".join(t if t in ("&&", ";") else shlex.quote(t) for t in tokens)
    return shlex.join(tokens)


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
    # a shell loop variable ($n in "for n in 1 2 3") stands for one of its values
    argv = [re.sub(r"\$\{?\w+\}?", "1", word) for word in command.argv]
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README line {command.line}: '{command.text}' is refused by the parser (exit {exc.code})")


def _run_block(block: Block, cwd: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    script = "set -e -o pipefail\n" + block.script()
    # its own process group, so a block that runs past the limit is stopped with every child it started
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        pytest.fail(f"README block at line {block.line} ({block.section}) ran past {BLOCK_TIMEOUT_S} s")
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-4:]
        pytest.fail(f"README block at line {block.line} ({block.section}) exited {proc.returncode}: "
                    + " | ".join(tail))


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme_chain")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_every_block_runs_as_written_in_order(block, chain_dir):
    _run_block(block, chain_dir)
