"""Command line for :func:`pae.train.run`: one flag per :class:`TrainConfig` field, and the error
handling every pae script shares (:func:`run_script`).

    python experiments/train.py --model resnet20 --dataset cifar10 --epochs 200 --schedule step \
        --milestones 100 150 --learning-rate 0.1

Each flag's help, default and choices come from the :class:`TrainConfig` field (its ``metadata``),
so they are written once. A user error (a bad flag or config value, an unknown model, a refused
resume, a damaged checkpoint, a data set that is not prepared, a batch larger than its split, a
diverged run) prints one ``error: ...`` line on stderr and exits with status 2; so does a run directory
that cannot be written (disk full, read-only, no permission, a file in the way). ``--traceback``
shows the whole trace instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import typing
from typing import Any, Callable, Mapping, Sequence

from pae.train.loop import TrainConfig, run
from pae.train.metrics import atomic_write

#: The exit status of a user error.
EXIT_USER_ERROR = 2

#: errno values that mean "this path cannot be written here": reported in one line naming the path.
_FREE = "free some space or choose another directory"
_WRITABLE = "choose a directory you can write to"
_PATH = "a file is in the way; choose another path"
WRITE_ERRNOS = {errno.ENOSPC: _FREE, errno.EDQUOT: _FREE, errno.EACCES: _WRITABLE,
                errno.EPERM: _WRITABLE, errno.EROFS: _WRITABLE, errno.ENOTDIR: _PATH,
                errno.EEXIST: _PATH, errno.EISDIR: "a directory is in the way; choose another path"}

_MAX_LINE = 2000


class UsageError(ValueError):
    """A command-line flag that does not parse (raised instead of argparse's usage-and-exit)."""


def _usage_error(message: str):
    raise UsageError(f"{message} (see --help)")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` raise :class:`UsageError` for a bad flag (one line through
    :func:`run_script`) instead of printing its usage, and list ``--traceback`` in its help."""
    parser.error = _usage_error
    if "--traceback" not in parser._option_string_actions:
        parser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                            help="on an error, show the whole Python trace instead of one line "
                                 "(default: off)")
    return parser


def _user_errors() -> tuple[type, ...]:
    from pae.train import engine

    diverged = getattr(engine, "TrainingDiverged", None)
    return (ValueError, FileNotFoundError) + ((diverged,) if isinstance(diverged, type) else ())


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _MAX_LINE:
        text = text[:_MAX_LINE] + " ... (--traceback shows all of it)"
    return text


def describe_error(err: BaseException) -> str | None:
    """The one ``error: ...`` line for a user or disk error, or ``None`` for anything else (a bug:
    its trace is shown)."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            path = e.filename if e.filename is not None else "the run directory"
            return f"error: cannot write {path}: {e.strerror or e}; {WRITE_ERRNOS[e.errno]}"
    for e in _chain(err):   # wrapped by a library (orbax, tensorstore) without an errno
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return f"error: disk full: {_one_line(str(e))}; {_FREE}"
    if isinstance(err, _user_errors()):
        return f"error: {_one_line(str(err)) or type(err).__name__}"
    return None


def fill_unset(args: argparse.Namespace, *layers: Mapping[str, Any]) -> argparse.Namespace:
    """A copy of ``args`` whose flags left unset (``None``) take their value from ``layers``, a later
    layer overriding an earlier one: ``fill_unset(args, DEFAULTS, PRESETS[model], PAPER)``. A layer
    naming a flag the parser does not have is a bug in the script (``AttributeError``)."""
    out = argparse.Namespace(**vars(args))
    merged: dict = {}
    for layer in layers:
        merged.update(layer)
    for key, value in merged.items():
        if getattr(out, key) is None:
            setattr(out, key, value)
    return out


def run_seeds(seeds: Sequence[int], run_seed: Callable[[int], dict], *, config: Mapping[str, Any],
              base: str | None = None, reuse: bool = False) -> list[dict]:
    """Each seed's result, ``run_seed(seed)``, in order: an experiment's sweep over seeds.

    With ``base``, each result is written (atomically) to ``<base>.seed<k>.json`` as it finishes, so
    an interrupted sweep loses at most the seed it was in. With ``reuse``, a saved seed whose
    ``"config"`` equals ``config`` (compared as JSON) is loaded instead of run, and says so; one saved
    with another configuration is run again and overwritten. Results must be JSON-serializable
    (NumPy scalars are written as floats).
    """
    wanted = json.loads(json.dumps(config, default=float))
    out = []
    for seed in seeds:
        path = f"{base}.seed{seed}.json" if base else None
        if path and reuse and os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("config") == wanted:
                print(f"[seed {seed}] reusing {path}", flush=True)
                out.append(saved)
                continue
        one = run_seed(seed)
        if path:
            atomic_write(path, json.dumps(one, indent=2, default=float))
        out.append(one)
    return out


def run_script(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """Call ``main(argv)`` as a command line: a user error or an unwritable/full disk prints one
    ``error: ...`` line on stderr and exits with status 2 (see :func:`describe_error`); ``--traceback``
    (removed from ``argv`` before ``main`` sees it) lets the exception through with its whole trace.
    Anything else (a bug) keeps its trace. Returns what ``main`` returns.

    Use it as ``if __name__ == "__main__": run_script(main)``; pair it with
    :func:`one_line_errors` on the script's parser so that a bad flag is one line too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    show_trace = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    try:
        return main(argv)
    except Exception as err:  # noqa: BLE001 - sorted below; bugs are re-raised
        line = None if show_trace else describe_error(err)
        if line is None:
            raise
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dropout\": 0.3}}', got "
                                         f"{text!r}")
    return value


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (tuple, list)):
        return " ".join(_show(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _help(text: str, default, choices=None) -> str:
    parts = [f"default: {_show(default)}"]
    if choices:
        parts.append(f"choices: {', '.join(_show(c) for c in choices)}")
    return f"{text} ({'; '.join(parts)})".replace("%", "%%")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field (help, default and choices from the field), plus
    ``--workdir``, ``--extend``, ``--no-progress``, ``--quiet`` and ``--traceback``."""
    parser = argparse.ArgumentParser(
        description="Train a pae model; writes runs/<name>/ (or --workdir). Running it again resumes "
                    "the run; a changed config is refused (see --extend).")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag, hint = _flag(field.name), hints[field.name]
        if field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()
        choices = field.metadata.get("choices")
        text = _help(field.metadata.get("help", ""), default, choices)
        kw: dict[str, Any] = {"default": default, "help": text, "metavar": field.name.upper()}
        if field.name == "model_kwargs":
            kw["type"] = _json_object
        elif field.name == "milestones":
            kw.update(type=int, nargs="*", default=list(default))
        elif hint in (bool, bool | None):
            kw["type"] = _parse_bool
        elif hint in (str | None,):
            kw["type"] = str
        else:
            kw["type"] = hint
            if choices and field.metadata.get("validate_choices", True):
                kw["choices"] = choices
        parser.add_argument(flag, **kw)
    parser.add_argument("--workdir", default=None,
                        help="run directory (default: runs/<name>, name as --name says)")
    parser.add_argument("--extend", action="store_true",
                        help="let a saved run train on to a larger --epochs from its saved epoch; "
                             "the lr schedule is rebuilt for the new length (default: off)")
    parser.add_argument("--resume-intact", action="store_true",
                        help="if the newest checkpoint is damaged, move it aside (<step>.damaged) and "
                             "resume from the newest intact one, saying which (default: off: refuse)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bar (it is shown on stderr only when stderr is a "
                             "terminal); the per-epoch lines still go to stdout (default: off)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no per-epoch or resume lines; the final JSON "
                             "result is still printed (default: off)")
    return one_line_errors(parser)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv``, train (:func:`pae.train.run`), print the final row as JSON; returns it.
    Errors raise; ``python experiments/train.py`` and ``pae-train`` (:func:`console`) run this
    through :func:`run_script`."""
    args = vars(build_parser().parse_args(argv))
    args.pop("traceback", None)
    workdir, extend, intact = args.pop("workdir"), args.pop("extend"), args.pop("resume_intact")
    progress, quiet = not args.pop("no_progress"), args.pop("quiet")
    args["milestones"] = tuple(args["milestones"])
    result = run(TrainConfig(**args), workdir=workdir, progress=progress, quiet=quiet, extend=extend,
                 resume_intact=intact)
    print(json.dumps({"workdir": result.workdir, "num_params": result.num_params, **result.final},
                     indent=2), flush=True)
    return result.final


if __name__ == "__main__":
    run_script(main)


def console() -> None:
    """The ``pae-train`` command: :func:`main` on the command line through :func:`run_script`
    (exit status 0; a user error is one line and status 2)."""
    run_script(main)
