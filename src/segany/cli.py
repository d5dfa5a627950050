"""The ``segany`` command line (SPEC §7); ``python -m segany`` runs the same :func:`main`.

    segany predict model=sam_b.pt source=img.jpg bboxes=[439,437,524,709]
    segany predict --model sam_b.pt --source images/ --points [[400,370],[900,370]] --labels [1,1]
    segany info model=sam_b.pt detailed=True
    segany benchmark model=sam_b.pt,mobile_sam.pt format=csv
    segany annotate data=path/to/images det_model=yolo11x.pt sam_model=sam_b.pt

Exit status:

- 0: success.
- 2: bad usage, one line on stderr: unknown command or option (with the nearest valid name),
  malformed value, bad prompts (:class:`~segany.errors.PromptError`), invalid option values
  (:class:`~segany.errors.ConfigError`), a missing source or a folder with no images
  (:class:`~segany.errors.ImageNotFoundError`), an output folder that cannot be written, a
  checkpoint that is not found (:class:`~segany.errors.CheckpointNotFoundError`).
- 1: runtime failure, one line on stderr: every other error (unreadable image, corrupt or unsafe
  checkpoint, a failed download (:class:`~segany.errors.DownloadError`: offline, put the file in
  place by hand), a feature not available in this version, out of memory, ...).
- 130: interrupted (Ctrl-C); 141: the output pipe was closed (``segany ... | head``).

``--verbose`` (or ``SEGANY_DEBUG=1``) also prints the traceback of an error.

Options are ``key=value``, ``--key value``, ``--key=value``, ``--flag`` / ``--no-flag`` (booleans).
Values are parsed without ``eval``: ``true``/``false``, ``None``, ints, floats, JSON lists
(``[439,437,524,709]``, ``[[400,370],[900,370]]``; Python tuples and True/False/None inside are
accepted), comma-separated numbers (``0,2`` → ``[0, 2]``) and strings otherwise. A list that the
shell split at spaces (``bboxes=[1, 2, 3, 4]`` unquoted) is joined back until its brackets balance.
The commands themselves are in :mod:`segany.cli_commands` and :mod:`segany.benchmark`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
import warnings
from typing import Any

from .config import check_type, suggest
from .errors import (CheckpointNotFoundError, ConfigError, ImageNotFoundError, PromptError,
                     SegAnyError)

# ------------------------------------------------------------------------------ parsing

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_WORDS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False,
          "none": None, "None": None, "null": None}


NO_VALUE = "\0no value"  # split_args: a --key with no value after it


class UsageError(SegAnyError, ValueError):
    """A command line that cannot be run as given (exit status 2)."""


def _number(s: str) -> int | float | None:
    if _INT.fullmatch(s):
        return int(s)
    if _FLOAT.fullmatch(s):
        return float(s)
    return None


# Options that name files, folders or runs: their text is kept as typed (a folder "0123" or a run
# "007" must not become the number 123 or 7). The words true/false/none and JSON lists (class_names=
# ["person","car"]) are still read as such; a name that only looks like a list ([1].jpg) stays text.
TEXT_OPTIONS = frozenset({"model", "source", "project", "name", "data", "output_dir", "det_model", "sam_model",
                          "class_names", "masks", "val_data", "save_dir", "save_json"})


# Options whose default is the empty string (shown as '' by --help): device='' in a shell arrives as device=.
EMPTY_OPTIONS = frozenset({"device"})


def parse_value(text: str, key: str = "value", as_text: bool = False) -> Any:
    """One command-line value → a Python value (see the module docstring); never evaluates code.
    ``as_text``: the value names a file or a run (see :data:`TEXT_OPTIONS`)."""
    s = text.strip()
    if not s and key in EMPTY_OPTIONS:
        return ""
    if not s:
        raise UsageError(f"{key}= has no value: write {key}=VALUE")
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]  # quoted by the user on purpose: keep it a string
    if s in _WORDS:
        return _WORDS[s]  # (a name option given True is refused by its type check, as before)
    if as_text and s[:1] not in "[(":
        return s
    num = _number(s)
    if num is not None:
        return num
    if s[:1] in "[(":
        # Python-style tuples and capitalised literals are accepted too, as the seed's examples use them.
        js = s.replace("(", "[").replace(")", "]")
        js = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", js)))
        try:
            value = json.loads(js)
        except json.JSONDecodeError as e:
            if as_text:
                return s  # a name that starts with a bracket: [1].jpg
            raise UsageError(f"{key}={text}: malformed list ({e.msg} at character {e.pos + 1}); "
                             f"write it like [439,437,524,709] or [[400,370],[900,370]]") from None
        if not isinstance(value, list):
            raise UsageError(f"{key}={text}: malformed list; write it like [439,437,524,709]")
        return value
    if "," in s:
        parts = [_number(p.strip()) for p in s.split(",")]
        if all(p is not None for p in parts):
            return parts  # 0,2 → [0, 2]
    return s


def _balance(s: str) -> int:
    return s.count("[") + s.count("(") - s.count("]") - s.count(")")


def split_args(tokens: list[str], booleans: set[str], names: frozenset[str] | set[str] = frozenset()
               ) -> list[tuple[str, str | None]]:
    """``key=value`` / ``--key value`` / ``--key=value`` / ``--flag`` / ``--no-flag`` → (key, raw text).

    A raw text of ``None`` means a bare boolean flag (True). Dashes in keys become underscores.
    ``names``: the command's option names, for the message about a stray argument.
    """
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            else:
                key, raw = body, None
                key_u = key.replace("-", "_")
                if key_u.startswith("no_") and key_u[3:] in booleans:
                    out.append((key_u[3:], "false"))
                    continue
                nxt = tokens[i] if i < len(tokens) else None
                if key_u in booleans:
                    if nxt is not None and nxt in _WORDS and isinstance(_WORDS[nxt], bool):
                        raw, i = nxt, i + 1
                elif nxt is not None and not nxt.startswith("--"):
                    raw, i = nxt, i + 1
                else:
                    raw = NO_VALUE  # reported by parse_options, after the check of the name
        elif "=" in tok and not tok.startswith("="):
            key, raw = tok.split("=", 1)
        elif tok.startswith("-") and len(tok) > 1 and not _number(tok):
            raise UsageError(f"unknown option '{tok}': options are key=value or --key value")
        else:
            if tok in names:
                raise UsageError(f"'{tok}' needs a value: " + (f"{tok}=True or --{tok}" if tok in booleans
                                                                 else f"{tok}=VALUE or --{tok} VALUE"))
            example = f" (e.g. source={tok})" if "source" in names and not tok.startswith("=") else ""
            raise UsageError(f"unexpected argument '{tok}': options are key=value{example} or --key value")
        # Rejoin a list that the shell split at spaces: bboxes=[1, 2, 3, 4]
        while raw is not None and raw.lstrip()[:1] in ("[", "(") and _balance(raw) > 0 and i < len(tokens):
            raw, i = raw + " " + tokens[i], i + 1
        out.append((key.replace("-", "_"), raw))
    return out


def parse_options(tokens: list[str], valid: dict[str, Any], aliases: dict[str, str] | None = None,
                  types: dict[str, Any] | None = None, command: str = "",
                  texts: frozenset[str] = TEXT_OPTIONS) -> dict[str, Any]:
    """Parse and check option tokens against ``valid`` (name → default, which also gives the type;
    ``types`` gives an example value for options whose default is ``None``).

    Unknown names, repeated names and values of the wrong type are a :class:`UsageError`.
    """
    aliases, types = aliases or {}, types or {}
    booleans = {k for k, v in valid.items() if isinstance(v, bool)}
    booleans |= {a for a, k in aliases.items() if k in booleans}
    names = set(valid) | set(aliases)
    out: dict[str, Any] = {}
    given: dict[str, list[str]] = {}  # option → the names it was given under
    for key, raw in split_args(tokens, booleans, names):
        if key not in names:
            listed = (f"Valid options: {', '.join(sorted(valid))}" if len(valid) <= 12
                      else f"'segany {command or 'COMMAND'} --help' lists the options")
            raise UsageError(f"unknown option '{key}'.{suggest(key, names)} {listed}")
        canonical = aliases.get(key, key)
        if canonical in out:
            both = list(dict.fromkeys([*given[canonical], key]))
            raise UsageError(f"'{canonical}' is given twice" + (
                " (as " + " and ".join(f"'{k}'" for k in both) + ")" if len(both) > 1 else ""))
        given.setdefault(canonical, []).append(key)
        if raw == NO_VALUE:
            raise UsageError(f"--{key} needs a value: --{key} VALUE or {key}=VALUE")
        value = True if raw is None else parse_value(raw, key, as_text=canonical in texts)
        out[canonical] = check_type(key, value, types.get(canonical, valid[canonical]))
    return out


# ----------------------------------------------------------------------------- commands

COMMANDS = ("predict", "info", "benchmark", "annotate", "serve", "train", "val", "export")
# A failed download is a runtime failure (exit 1), like an unreadable image: the command line was right.
USAGE_ERRORS = (UsageError, ConfigError, PromptError, ImageNotFoundError, CheckpointNotFoundError)

HELP = """\
usage: segany COMMAND [key=value ...] [--key value ...]

Promptable image segmentation with the Segment Anything family (SAM, MobileSAM).

commands:
  predict     segment images, folders, globs or videos with box/point/mask prompts, or
              segment everything when no prompt is given; saves to runs/segment/predict*
  info        print a model summary: layers, parameters, GFLOPs, checkpoint size
  benchmark   size, parameters and speed of the checkpoints available locally
  annotate    auto-annotate a folder: detector boxes -> SAM masks -> YOLO-seg labels
  serve       a JSON API and a click-to-segment web page on 127.0.0.1 (segany[serve])
  train       fine-tune SAM on COCO / YOLO-seg / synthetic data with simulated prompts
  val         box / point / multi-point mIoU of a model on a dataset
  export      ONNX files of a SAM / MobileSAM model: image encoder and prompt decoder (segany[export])

examples:
  segany predict model=sam_b.pt source=path/to/image.jpg
  segany predict model=sam_b.pt source=img.jpg bboxes=[439,437,524,709]
  segany predict model=sam_b.pt source=img.jpg points=[[400,370],[900,370]] labels=[1,1]
  segany info model=sam_b.pt
  segany annotate data=path/to/images det_model=yolo11x.pt sam_model=sam_b.pt
  segany benchmark

Options are key=value or --key value (--flag / --no-flag for booleans). Values: numbers,
true/false, None, lists like [439,437,524,709], strings otherwise.
  segany COMMAND --help   options of a command
  --version               print the version
  --verbose               print the traceback of an error (or set SEGANY_DEBUG=1)

exit status: 0 success, 1 runtime failure, 2 bad usage"""


def _debug_from_env() -> bool:
    return os.environ.get("SEGANY_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """An exception as a single line (messages that list alternatives span several lines)."""
    return " ".join(str(e).split()) or type(e).__name__


def exit_code(e: BaseException) -> int:
    """2 for bad usage, 1 for runtime failures (see the module docstring)."""
    return 2 if isinstance(e, USAGE_ERRORS) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_from_env() or "--debug" in args
    # A bare --verbose is the debug switch; verbose=False / --verbose false stay predict options.
    if "--verbose" in args:
        i = args.index("--verbose")
        if i + 1 >= len(args) or args[i + 1].lower() not in ("true", "false"):
            debug = True
            args.pop(i)
    args = [a for a in args if a != "--debug"]
    if not debug:
        # FFmpeg's own lines for a broken video ("moov atom not found") would stand beside the
        # one-line warning that names the file; read when OpenCV first opens a video.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    _shown.clear()  # each run shows its own warnings (main may run twice in one process)
    try:
        with warnings.catch_warnings():  # restores the caller's warning display after an in-process call
            warnings.showwarning = _show_warning
            return _dispatch(args)
    except KeyboardInterrupt:
        print("segany: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `segany ... | head`: the reader left; stop quietly as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # every failure becomes one line and an exit status
        if debug:
            traceback.print_exc()
        known = isinstance(e, (UsageError,)) or type(e).__module__.startswith("segany")
        hint = "" if known or debug else f" ({type(e).__name__}; run with --verbose for the traceback)"
        print(f"segany: error: {one_line(e)}{hint}", file=sys.stderr)
        return exit_code(e)


_shown: set[str] = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line (``segany: warning: ...``) rather than file, line number and source;
    each text once (prompts are checked once per image and again when decoded)."""
    text = str(message)
    if text not in _shown:
        _shown.add(text)
        # Through tqdm, so a line does not land in the middle of a progress bar.
        from tqdm import tqdm

        tqdm.write(f"segany: warning: {text}", file=sys.stderr)


def _wants_help(args: list[str]) -> bool:
    """``-h``, ``--help`` or a bare ``help`` among the options; not ``help`` as the value of a
    ``--key`` before it (``--name help`` names a run folder)."""
    return any(a in ("-h", "--help") or (a == "help" and not (i and args[i - 1].startswith("--")
                                                             and "=" not in args[i - 1]))
               for i, a in enumerate(args))


def _dispatch(args: list[str]) -> int:
    if args and args[0] == "segment":  # the seed's `yolo segment predict ...` shape
        args = args[1:]
    if not args:
        print(HELP)
        return 0
    cmd, rest = args[0], args[1:]
    if cmd in ("-h", "--help", "help"):
        if rest and rest[0] in COMMANDS:
            cmd, rest = rest[0], ["--help"]
        else:
            print(HELP)
            return 0
    if cmd in ("-V", "--version", "version"):
        return _version()
    if cmd not in COMMANDS:
        raise UsageError(f"unknown command '{cmd}'.{suggest(cmd, COMMANDS)} Commands: {', '.join(COMMANDS)} "
                         "(segany --help)")
    from . import benchmark as b
    from . import cli_commands as c
    from . import onnx_export as x

    runners = dict(predict=(c.predict_help, c.run_predict), info=(lambda: c.INFO_HELP, c.run_info),
                   benchmark=(lambda: b.BENCHMARK_HELP, b.run_cli),
                   annotate=(lambda: c.ANNOTATE_HELP, c.run_annotate),
                   serve=(lambda: c.serve_command().SERVE_HELP, lambda t: c.serve_command().run_serve(t)),
                   train=(lambda: c.train_command().TRAIN_HELP, lambda t: c.train_command().run_train(t)),
                   val=(lambda: c.train_command().VAL_HELP, lambda t: c.train_command().run_val(t)),
                   export=(lambda: x.EXPORT_HELP, x.run_export))
    help_text, run = runners[cmd]
    if _wants_help(rest):
        print(help_text())
        return 0
    return run(rest)


def _version() -> int:
    import platform
    from importlib import metadata

    from . import __version__

    try:  # the installed version, without importing torch
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    print(f"segany {__version__} (torch {torch_version}, Python {platform.python_version()})")
    return 0


