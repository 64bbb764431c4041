"""The ``perfusionai`` command line: ``perfusionai <domain> <verb> [options]``.

Each domain registers its own verbs from ``perfusionai/<domain>/cli.py``
(function ``register(subparsers)``); this module only assembles them, runs the
chosen verb and turns user errors into one message without a traceback
(exit status 2). ``perfusionai demo --out DIR`` runs every domain on phantoms.

Everything every verb shares is applied here, once:

* help: every option's help text shows its default (:class:`DefaultsHelpFormatter`
  on every parser), a domain or verb without a description gets its one-line help;
* errors: :class:`~perfusionai.errors.ParameterError` named by parameter becomes the
  verb's flag; a full disk is one line; SIGTERM cleans up like Ctrl-C (the handler
  raises, so :func:`perfusionai.io.atomic_output_dir` removes its stage);
* warnings about inputs (:class:`~perfusionai.errors.PerfusionAIWarning`) print as one
  ``perfusionai: warning: ...`` line;
* outputs are recorded under the verb's name (:func:`perfusionai.io.run_label`), and every
  existing path among the options is an input no output may overwrite (:func:`perfusionai.io.run_inputs`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from typing import Iterator, Optional, Sequence

from . import __version__, cli_batch
from .cli_common import add_common_options
from .ctpm import cli as ctpm_cli
from .dr import cli as dr_cli
from .dsc import cli as dsc_cli
from .errors import Cancelled, ParameterError, PerfusionAIError, PerfusionAIWarning
from .io import no_space_reason, run_inputs, run_label
from .lobes import cli as lobes_cli
from .prm import cli as prm_cli

#: Domains in the order ``--help`` lists them, each with its ``register(subparsers)``.
DOMAINS = {"dsc": dsc_cli.register, "prm": prm_cli.register, "lobes": lobes_cli.register,
           "ctpm": ctpm_cli.register, "dr": dr_cli.register}

#: Exit status of a run stopped by SIGTERM (128 + 15, the shell's convention).
EXIT_TERMINATED = 143


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Show every option's default in its help text (unless the text already speaks of it).

    Like :class:`argparse.ArgumentDefaultsHelpFormatter`, but a flag that is off unless
    given, a required option and a help text that already says ``default`` are left as
    written, and an unset default reads ``(default: not set)``. Mixed into each parser's own
    formatter class by :func:`build_parser`, so raw descriptions stay raw.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS
                or "default" in text.lower() or action.nargs == 0):
            return text
        if action.default is None:
            return f"{text} (default: not set)"
        if isinstance(action.default, (list, tuple)):
            shown = " ".join(str(v) for v in action.default) or "none"
            return f"{text} (default: {shown.replace('%', '%%')})"
        return f"{text} (default: %(default)s)"


def iter_parsers(parser: argparse.ArgumentParser, path: tuple = ()) -> Iterator[tuple]:
    """Every parser below ``parser`` (itself included) as ``(path, parser, help)``.

    ``path`` is the words that select it (``("dsc", "maps")``); ``help`` the one-line help
    it was registered with (None for the top level).
    """
    yield path, parser, None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:  # an alias of a verb already listed
                    continue
                seen.add(id(sub))
                for sub_path, sub_parser, sub_help in iter_parsers(sub, path + (name,)):
                    yield sub_path, sub_parser, (helps.get(name) if sub_parser is sub else sub_help)


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Apply the shared help conventions to every parser (defaults shown, descriptions present)."""
    for _path, sub, help_text in iter_parsers(parser):
        base = sub.formatter_class
        if not (isinstance(base, type) and issubclass(base, DefaultsHelpFormatter)):
            # first in the MRO: its _get_help_string wins over ArgumentDefaultsHelpFormatter's
            sub.formatter_class = type(f"PerfusionAI{base.__name__}", (DefaultsHelpFormatter, base), {})
        if not sub.description and help_text and help_text is not argparse.SUPPRESS:
            sub.description = help_text[:1].upper() + help_text[1:] + ("" if help_text.endswith(".") else ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfusionai",
        description="Quantitative functional maps from DSC-MRI, CT and diffusion MRI. "
                    "Every verb has --help.",
    )
    parser.add_argument("--version", action="version", version=f"perfusionai {__version__}")
    sub = parser.add_subparsers(dest="domain", metavar="<domain>")
    sub.required = True

    demo = sub.add_parser("demo", help="run every module on digital phantoms and write DIR/report.html",
                          description="Run every module on digital phantoms (known truth) and write "
                                      "DIR/report.html with the maps, figures and accuracy tables.")
    demo.add_argument("--out", required=True, help="output folder for report.html, maps and figures")
    demo.add_argument("--only", nargs="*", default=None, metavar="DOMAIN",
                      help="run only these domains (default: all available)")
    add_common_options(demo)
    demo.set_defaults(handler=_run_demo)

    for register in DOMAINS.values():
        register(sub)
    cli_batch.register(sub)  # after the domains: it drives their verbs
    _finish_help(parser)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo runs every domain; loaded only for this verb

    report = run_demo(args.out, only=args.only, progress_mode=args.progress)
    print(f"report written to {report}")
    return 0


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler of :func:`main`: a run stopped from outside cleans up like Ctrl-C."""


#: The process that installed the SIGTERM handler; worker processes forked from it inherit the handler.
_HANDLER_PID: Optional[int] = None


def _on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    if os.getpid() != _HANDLER_PID:
        # a forked worker (nnU-Net's preprocessing pool, ...) being stopped by its pool: die as usual,
        # never turn its SIGTERM into an exception that keeps it alive and hangs the pool
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def _show_warning(previous):
    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, PerfusionAIWarning):
            print(f"perfusionai: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


#: argparse destinations that name where a verb writes, never what it reads
_OUTPUT_DESTS = {"out", "out_dir", "output"}


def _input_paths(args: argparse.Namespace) -> list:
    """Every existing file or folder among the verb's option values except its output: its inputs,
    which :func:`perfusionai.io.atomic_output_dir` never overwrites or deletes."""
    found = []
    for dest, value in vars(args).items():
        if dest in _OUTPUT_DESTS or callable(value):
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, (str, os.PathLike)) and str(item) and os.path.exists(item):
                found.append(os.fspath(item))
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    global _HANDLER_PID
    _HANDLER_PID = os.getpid()
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    label = " ".join(str(w) for w in (getattr(args, "domain", None), getattr(args, "verb", None)) if w)
    try:
        with warnings.catch_warnings(), run_label(label or "perfusionai"), run_inputs(_input_paths(args)):
            warnings.simplefilter("default", PerfusionAIWarning)  # once per file and message
            warnings.showwarning = _show_warning(warnings.showwarning)
            return int(args.handler(args) or 0)
    except Cancelled as exc:
        print(f"perfusionai: {exc}", file=sys.stderr)
        return 130
    except ParameterError as exc:
        # the core names parameters; only here do they become the verb's flags
        job_cls = getattr(args, "job_class", None)
        name = job_cls.flag_of(exc.parameter) if job_cls is not None else "--" + exc.parameter.replace("_", "-")
        print(f"perfusionai: error: {exc.with_name(name)}", file=sys.stderr)
        return 2
    except PerfusionAIError as exc:
        print(f"perfusionai: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("perfusionai: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("perfusionai: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as exc:
        reason = no_space_reason(exc)
        if reason is None:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"perfusionai: error: cannot write{where}: {reason}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread and previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    sys.exit(main())
