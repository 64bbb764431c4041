"""Job specifications: one serialisable description of a run per domain verb.

A job specification is a frozen dataclass that holds everything one run needs
(input files, options, output folder). The library, the command line and the
Slicer modules all describe a run with the same object, so they cannot drift:

* ``job.to_argv()`` gives the exact command line (``["dsc", "maps", "--dsc", ...]``)
  that ``perfusionai`` accepts; ``Job.from_argv(argv)`` parses it back with the
  real command-line parser, and ``Job.from_argv(job.to_argv()) == job``.
* ``job.to_json()`` / ``Job.from_json(d)`` give the JSON recorded in
  ``summary.json`` and on Slicer result nodes.
* ``job.run(progress=None)`` runs it and returns the domain's typed result.

Each field is declared with :func:`option`, which records the command-line flag
(default ``--`` + the field name with ``_`` as ``-``). Errors raised by the core
name *parameters* (:class:`perfusionai.errors.ParameterError`); the command
line maps them to flags through :meth:`Job.flag_of`, here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Type, TypeVar

J = TypeVar("J", bound="Job")

_FLAG = "perfusionai_flag"


def option(default: Any = None, *, flag: Optional[str] = None, help: str = "",
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A job field that is also a command-line option.

    Parameters
    ----------
    default
        The value used when the option is not given (``None``: not given).
    flag
        The command-line flag; default ``--<name-with-dashes>``.
    help
        One sentence for the documentation of the field (the CLI help text
        lives with the parser).
    """
    metadata = {_FLAG: flag, "help": help}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Job:
    """Base of every job specification; subclasses set ``DOMAIN`` and ``VERB``."""

    DOMAIN: ClassVar[str] = ""
    VERB: ClassVar[str] = ""

    # -- flags ---------------------------------------------------------------
    @classmethod
    def flag_of(cls, name: str) -> str:
        """The command-line flag of field ``name`` (``"tikhonov_lambda"`` -> ``"--lambda"``)."""
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f.metadata.get(_FLAG) or "--" + name.replace("_", "-")
        return "--" + name.replace("_", "-")

    # -- argv ----------------------------------------------------------------
    def to_argv(self, *, include_verb: bool = True) -> List[str]:
        """The command line that runs this job (without the program name).

        ``None`` fields are left out, ``True`` booleans become a bare flag,
        sequences become the flag followed by each value. Fields equal to their
        default are written too, so the command is explicit and reproducible.
        """
        argv: List[str] = [self.DOMAIN, self.VERB] if include_verb else []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = self.flag_of(f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                if value:
                    argv.append(flag)
                continue
            if isinstance(value, (list, tuple)):
                if not value:
                    continue
                argv.append(flag)
                argv.extend(_text(v) for v in value)
                continue
            argv.extend([flag, _text(value)])
        return argv

    @classmethod
    def from_argv(cls: Type[J], argv: Sequence[str]) -> J:
        """Parse ``argv`` (with or without the leading domain and verb) with the real CLI parser."""
        from .cli import build_parser  # the CLI layer sits above the jobs; imported only when parsing

        argv = list(argv)
        if argv[:2] != [cls.DOMAIN, cls.VERB]:
            argv = [cls.DOMAIN, cls.VERB] + argv
        namespace = build_parser().parse_args(argv)
        return cls.from_namespace(namespace)

    @classmethod
    def from_namespace(cls: Type[J], namespace: Any) -> J:
        """Build the job from an argparse namespace whose ``dest`` names are the field names."""
        values = {}
        for f in dataclasses.fields(cls):
            if hasattr(namespace, f.name):
                value = getattr(namespace, f.name)
                if isinstance(value, list):
                    value = tuple(value)
                values[f.name] = value
        return cls(**values)

    # -- JSON ----------------------------------------------------------------
    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict: ``{"domain", "verb", "options": {field: value}}``."""
        options = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            options[f.name] = list(value) if isinstance(value, tuple) else value
        return {"domain": self.DOMAIN, "verb": self.VERB, "options": options}

    @classmethod
    def from_json(cls: Type[J], data: Mapping[str, Any] | str) -> J:
        """Inverse of :meth:`to_json` (accepts the dict or its JSON text)."""
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("domain") != cls.DOMAIN or data.get("verb") != cls.VERB:
            raise ValueError(f"not a {cls.DOMAIN} {cls.VERB} job: {data.get('domain')} {data.get('verb')}")
        names = {f.name for f in dataclasses.fields(cls)}
        options = {k: (tuple(v) if isinstance(v, list) else v)
                   for k, v in dict(data.get("options", {})).items() if k in names}
        return cls(**options)

    def replace(self: J, **changes: Any) -> J:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__ and not getattr(cls.__dict__["run"], "_labelled", False):
            cls.run = _labelled(cls.__dict__["run"])

    # -- running -------------------------------------------------------------
    def run(self, progress=None):  # pragma: no cover - every subclass overrides it
        """Run the job and return the domain's typed result."""
        raise NotImplementedError


def _labelled(run):
    """Wrap a job's ``run`` so the outputs it writes are recorded as this verb's (``io.run_label``)."""

    @functools.wraps(run)
    def wrapper(self, *args, **kwargs):
        from .io import run_label  # io sits above the jobs' plain dataclasses; imported when a job runs

        with run_label(f"{self.DOMAIN} {self.VERB}"):
            return run(self, *args, **kwargs)

    wrapper._labelled = True  # type: ignore[attr-defined]
    return wrapper


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


#: Every job class registered by ``(domain, verb)``; filled by :func:`register_job`.
JOBS: Dict[tuple, Type[Job]] = {}


def register_job(cls: Type[J]) -> Type[J]:
    """Class decorator: make ``cls`` findable by :func:`job_class` (used by the CLI and batch runs)."""
    JOBS[(cls.DOMAIN, cls.VERB)] = cls
    return cls


def job_class(domain: str, verb: str) -> Optional[Type[Job]]:
    """The job class of ``perfusionai <domain> <verb>``, or None when that verb has none."""
    return JOBS.get((domain, verb))
