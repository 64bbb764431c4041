"""The ``perfusionai`` command line: ``perfusionai <domain> <verb> [options]``.

Each domain registers its own verbs from ``perfusionai/<domain>/cli.py``
(function ``register(subparsers)``); this module only assembles them, runs the
chosen verb and turns user errors into one message without a traceback
(exit status 2). ``perfusionai demo --out DIR`` runs every domain on phantoms.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import __version__
from .cli_common import add_common_options
from .errors import Cancelled, ParameterError, PerfusionAIError

#: Domains in the order ``--help`` lists them; a domain whose package is absent is skipped.
DOMAINS = ("dsc", "prm", "lobes", "ctpm", "dr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfusionai",
        description="Quantitative functional maps from DSC-MRI, CT and diffusion MRI. "
                    "Every verb has --help.",
    )
    parser.add_argument("--version", action="version", version=f"perfusionai {__version__}")
    sub = parser.add_subparsers(dest="domain", metavar="<domain>")
    sub.required = True

    demo = sub.add_parser("demo", help="run every module on digital phantoms and write DIR/report.html")
    demo.add_argument("--out", required=True, help="output folder for report.html, maps and figures")
    demo.add_argument("--only", nargs="*", default=None, metavar="DOMAIN",
                      help="run only these domains (default: all available)")
    add_common_options(demo)
    demo.set_defaults(handler=_run_demo)

    for domain in DOMAINS:
        try:
            module = importlib.import_module(f"perfusionai.{domain}.cli")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(f"perfusionai.{domain}"):
                continue
            raise
        module.register(sub)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(args.out, only=args.only, progress_mode=args.progress)
    print(f"report written to {report}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
    except KeyboardInterrupt:
        print("perfusionai: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
