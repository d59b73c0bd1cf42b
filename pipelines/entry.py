"""What every command shares: options read from config dataclasses, exit statuses, one-line errors.

Every command (``actr <command>`` and ``python pipelines/<x>.py``) builds its options from a
frozen config dataclass with `tyro <https://brentyi.github.io/tyro/>`_, which shows each field's
type, default and ``# comment`` in ``--help``. Flags are the field names with dashes
(``--batch-size``; ``--batch_size`` is accepted too); a boolean field ``x`` is ``--x/--no-x``.

Exit status, the same for every command:

- 0: success;
- 1: a check that failed (``make-shards --verify`` finding damage);
- 2: a user error (a bad path, a bad option, a device this machine does not have): one line on
  stderr naming the problem, no traceback (``--verbose`` or ``ACTR_DEBUG=1`` shows it).

Every command also takes ``--quiet`` (print errors only) and ``--verbose`` (debug logs, tracebacks).
"""

import contextlib
import dataclasses
import io
import logging
import os
import re
import sys
import traceback
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "EXIT_OK",
    "EXIT_CHECK_FAILED",
    "EXIT_USER_ERROR",
    "COMMON_OPTIONS",
    "UsageError",
    "parse_config",
    "check_device",
    "run",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USER_ERROR = 2
DEBUG_ENV = "ACTR_DEBUG"  # set (to anything but "" or "0") for tracebacks, as --verbose does
COMMON_OPTIONS = "Every command also takes --quiet (errors only) and --verbose (debug logs, tracebacks; or ACTR_DEBUG=1)."
_QUIET, _VERBOSE = "--quiet", "--verbose"
_SILENT = False  # set by run() for the duration of a --quiet command
_BOX = re.compile(r"[╭╮╰╯│─━┃┏┓┗┛]+")

T = TypeVar("T")


class UsageError(ValueError):
    """A user error found while reading the command line (exit status 2, one line on stderr)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user asked for something impossible" (the library's are ValueErrors)."""
    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def _yaml_mapping_rule(info: Any) -> Any:
    """tyro rule for ``Mapping[str, Any]`` / ``dict[str, Any]`` fields: one YAML mapping word."""
    import tyro
    import yaml

    if typing.get_origin(info.type) not in (Mapping, dict) or typing.get_args(info.type)[1:] != (Any,):
        return None

    def parse(words: list[str]) -> dict[str, Any]:
        value = yaml.safe_load(words[0])
        if not isinstance(value, Mapping):
            raise ValueError(f"expected a YAML mapping such as '{{depth: 2}}', got {words[0]!r}")
        return dict(value)

    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1,
        metavar="YAML",
        instance_from_str=parse,
        is_instance=lambda value: isinstance(value, Mapping),
        str_from_instance=lambda value: [yaml.safe_dump(dict(value), default_flow_style=True).strip()],
    )


def _first_problem(tyro_error: str) -> str:
    """The first paragraph of a tyro error box, in one line (the box's title is the kind of error)."""
    lines = [_BOX.sub(" ", line).strip() for line in tyro_error.splitlines()]
    lines = ["" if set(line) <= set("-=+| ") else line for line in lines]  # rules drawn in ASCII (no UTF-8 stderr)
    while lines and not lines[0]:
        lines.pop(0)
    paragraph: list[str] = []
    for line in lines[1:]:  # lines[0] is the box title ("Value error", "Unrecognized options", ...)
        if not line:  # a rule inside the box ends the paragraph
            if paragraph:
                break
            continue
        paragraph.append(line)
    return " ".join(paragraph) or (lines[0] if lines else "invalid command line")


def parse_config(
    cls: type[T],
    argv: Sequence[str],
    *,
    prog: str,
    description: str | None = None,
    default: T | None = None,
    omit_prefixes: bool = False,
    return_unknown_args: bool = False,
) -> Any:
    """``cls`` (a config dataclass) from the command line ``argv``, with tyro.

    ``default`` gives the values to show and start from (e.g. a YAML file's); ``omit_prefixes``
    makes a nested dataclass's fields plain ``--field`` flags. A bad command line raises
    :class:`UsageError` with tyro's message in one line (its full text is logged at debug level).
    """
    import tyro

    registry = tyro.constructors.ConstructorRegistry()
    registry.primitive_rule(_yaml_mapping_rule)
    text = "\n\n".join(part for part in (description, COMMON_OPTIONS) if part)
    errors = io.StringIO()
    wide = {} if {"-h", "--help"} & set(argv) else {"COLUMNS": "100000"}  # an error's words unwrapped (paths intact)
    try:
        with contextlib.redirect_stderr(errors), _environment(wide):
            parsed = tyro.cli(
                cls,
                args=list(argv),
                prog=prog,
                description=text,
                default=tyro.MISSING_NONPROP if default is None else default,
                config=(tyro.conf.OmitArgPrefixes,) if omit_prefixes else None,
                registry=registry,
                return_unknown_args=return_unknown_args,
            )
    except SystemExit as done:
        if not done.code:
            raise  # --help
        logging.getLogger(__name__).debug("%s", errors.getvalue())
        raise UsageError(_first_problem(errors.getvalue())) from None
    if _SILENT and dataclasses.is_dataclass(parsed) and not isinstance(parsed, type) and hasattr(parsed, "progress"):
        parsed = dataclasses.replace(parsed, progress=False)  # --quiet: no progress bars either
    return parsed


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Any:
    """Environment variables set for the duration of a ``with`` block, then restored."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_device(name: str) -> str:
    """``name`` if it is a torch device this machine has; else :class:`UsageError` naming it."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {name!r} is not a device name ({error})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise UsageError(f"--device {name!r} is not available: {count} CUDA device(s) visible to this process")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name!r} is not available on this machine")
    return name


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: {error.strerror or error}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run(command: Callable[[list[str], str], int | None], argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``command(argv, prog)`` with the exit-status policy above; returns the status.

    ``--quiet`` and ``--verbose`` are taken out of ``argv`` here (anywhere before a ``--``).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0])
    cut = words.index("--") if "--" in words else len(words)
    verbose = _VERBOSE in words[:cut] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    quiet = _QUIET in words[:cut]
    words = [w for w in words[:cut] if w not in (_QUIET, _VERBOSE)] + words[cut:]
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    sink = open(os.devnull, "w") if quiet else None  # noqa: SIM115 - closed below
    global _SILENT
    _SILENT = quiet
    try:
        with contextlib.redirect_stdout(sink) if sink else contextlib.nullcontext():
            status = command(words, prog)
    except SystemExit as done:  # --help, or a library that exits by itself
        return done.code if isinstance(done.code, int) else EXIT_USER_ERROR if done.code else EXIT_OK
    except ModuleNotFoundError as error:  # an optional dependency (the core install has only the model stack)
        if verbose or not error.name or error.name.split(".")[0] in ("actr_core", "pipelines"):
            raise
        print(
            f"{prog}: error: needs the optional package {error.name!r}: pip install 'actr_core[all]'", file=sys.stderr, flush=True
        )
        return EXIT_USER_ERROR
    except _user_errors() as error:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {_message(error)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        _SILENT = False
        if sink:
            sink.close()
    return EXIT_OK if status is None else int(status)
