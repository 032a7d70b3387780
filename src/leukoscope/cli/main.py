"""``leukoscope <command>``: argument parsing, dispatch and clean error messages."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from leukoscope import INTENDED_USE, __version__
from leukoscope.cli._common import EXIT_INTERNAL, EXIT_IO, EXIT_USAGE

#: Command modules in ``leukoscope.cli``, in the order ``--help`` lists them.
COMMANDS = (
    "data", "split", "agreement", "synth", "train", "cv", "adapt", "predict",
    "evaluate", "report", "screen", "review", "export", "demo",
)
#: Commands that run networks: worth re-executing under tcmalloc when it is installed.
HEAVY = {"train", "cv", "adapt", "predict", "evaluate", "report", "screen", "export", "demo"}

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def _load_commands():
    mods = []
    for name in COMMANDS:
        try:
            mods.append(importlib.import_module(f"leukoscope.cli.{name}"))
        except ModuleNotFoundError as exc:  # a command whose module is not in this build
            if exc.name != f"leukoscope.cli.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukoscope",
        description="White-blood-cell morphology recognition and AML blast screening. " + INTENDED_USE,
    )
    parser.add_argument("--version", action="version", version=f"leukoscope {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment variable LEUKOSCOPE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _load_commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP.replace("%", "%%"), description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _maybe_reexec_with_tcmalloc(argv: list[str]) -> None:
    """Re-run the command under tcmalloc (about 2x faster torch on CPU) when it is installed.

    Nothing requires it: without the library, or with ``LEUKOSCOPE_NO_TCMALLOC=1``, the
    command runs as it is.
    """
    if not argv or argv[0] not in HEAVY or os.environ.get("LEUKOSCOPE_NO_TCMALLOC"):
        return
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    env["LEUKOSCOPE_NO_TCMALLOC"] = "1"  # never loop
    try:
        os.execve(sys.executable, [sys.executable, "-m", "leukoscope", *argv], env)
    except OSError:
        return


#: errno -> the words of a file-system error message (others use the system's own wording).
_OS_REASONS = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for the file system",
    errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
    errno.EISDIR: "is a folder, not a file", errno.ENOTDIR: "not a folder", errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder", errno.ELOOP: "too many levels of symbolic links (a link loop?)",
    errno.ENAMETOOLONG: "file name too long", errno.EIO: "input/output error",
}


def os_error_message(exc: OSError) -> str:
    """One line for a file-system error: ``FILE: reason`` (both files for a rename)."""
    reason = _OS_REASONS.get(exc.errno) or exc.strerror or str(exc)
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    if files:
        return f"{' -> '.join(files)}: {reason}"
    return str(exc) if exc.strerror is None else reason


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The deepest (sub)command parser that ``argv`` selects, for its usage line."""
    current = parser
    for tok in argv:
        acts = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not acts:
            break
        if tok in acts[0].choices:
            current = acts[0].choices[tok]
    return current


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, except that an unknown option is reported with its subcommand's usage."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        _subparser(parser, argv).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if from_shell:
        _maybe_reexec_with_tcmalloc(argv)
    parser = build_parser()
    args = parse_args(parser, argv)
    debug = args.debug or bool(os.environ.get("LEUKOSCOPE_DEBUG"))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("leukoscope: interrupted; completed work and checkpoints are kept", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError, RuntimeError) as exc:
        if debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.filename is not None:
            msg = os_error_message(exc)
        print(f"leukoscope {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # permission, disk full, a folder where a file was expected, ...
        if debug:
            raise
        print(f"leukoscope {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_IO if exc.errno is not None else EXIT_USAGE  # no errno: a bad input (e.g. PIL's)
    except Exception as exc:  # a bug: one line, the traceback on request
        if debug:
            raise
        print(f"leukoscope {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
