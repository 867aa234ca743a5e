"""``wantel``: the command line, the application's entry point.

Each subcommand lives in its own module under :mod:`wantel.commands`, with two functions,
``configure(parser)`` and ``run(args) -> int``, and is named here by a string, so ``wantel
--help`` and the light commands never import torch (``run`` and ``demo`` load it only when
they run). The base install (``pip install wan-telemetry``) has no torch at all: it serves,
replays and exports; ``run`` and ``demo`` need the ``[wan]`` extra, and say so in one line when
it is missing. Every failure a user can cause — a missing log, an unknown flag, a bad value, a
missing extra — ends as one line on stderr and exit code 2, never a traceback. A log that is
there but broken (malformed metadata, a segment that is not a regular file) is one line and
exit code 1: the input was right, the log needs fixing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol, cast

from telemetry import __version__, accelerate
from telemetry.errors import UsageError
from telemetry.log.base import BrokenLog, LogError
from wantel.config import (
    DEFAULT_LOG_DIR,
    LOG_ENV,
    PURE_PYTHON_ENV,
    VARIABLES,
    pure_python_requested,
)
from wantel.logs import configure_logging

EXIT_USAGE = 2
EXIT_BROKEN_LOG = 1
#: What ``pip install 'wan-telemetry[wan]'`` adds that a command cannot run without.
WAN_EXTRA_MODULES = ("torch", "diffusers")
WAN_EXTRA_INSTALL = "pip install 'wan-telemetry[wan]'"


class _PrintVersion(argparse.Action):
    """``--version`` on one line, never re-wrapped (argparse's own action wraps it)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"wantel {__version__} ({accelerate.describe()})")
        parser.exit()


@dataclass(frozen=True)
class Command:
    """A subcommand: where it lives and what it is for (shown by ``wantel --help``)."""

    name: str
    module: str
    purpose: str
    uses_log: bool = True
    #: Modules it needs beyond the base install (the ``[wan]`` extra's), checked before loading.
    needs: tuple[str, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command(
        "run",
        "wantel.commands.run",
        "generate a video with a tiny offline Wan model or a local diffusers model, "
        "recording every stage (needs the [wan] extra)",
        needs=WAN_EXTRA_MODULES,
    ),
    Command(
        "serve",
        "wantel.commands.serve",
        "follow the log; serve /metrics, the HTTP API, WebSocket progress and the live page",
    ),
    Command(
        "demo",
        "wantel.commands.demo",
        "serve, and stream tiny jobs of every Wan layout into the log (no GPU needed; "
        "needs the [wan] extra)",
        needs=WAN_EXTRA_MODULES,
    ),
    Command(
        "eta",
        "wantel.commands.eta",
        "calibrate the ETA model from the log (fit) and score it against baselines (eval)",
    ),
    Command(
        "dashboards",
        "wantel.commands.dashboards",
        "regenerate the Grafana dashboards and Prometheus alert rules from code",
        uses_log=False,
    ),
    Command("cat", "wantel.commands.cat", "print the log's events as JSON Lines"),
    Command(
        "ship",
        "wantel.commands.ship",
        "follow the local log and ship it to the fleet's NATS JetStream stream",
    ),
    Command(
        "advise",
        "wantel.commands.advise",
        "predict a job's duration and peak memory from the log's history, and what would fit",
    ),
    Command(
        "compare",
        "wantel.commands.compare",
        "compare models, variants, configurations, workers or devices side by side",
    ),
    Command(
        "replay",
        "wantel.commands.replay",
        "rebuild the projections from the log and print a per-job summary",
    ),
)


class _CommandModule(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """The parser; only the selected subcommand's module is imported and configured."""
    parser = _Parser(
        prog="wantel",
        description="Event-sourced telemetry for Wan video-diffusion inference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Commands that read or write the log take --log DIR (else ${LOG_ENV}, "
        f"else ./{DEFAULT_LOG_DIR}).\n'wantel COMMAND --help' explains each command.\n\n"
        "environment:\n" + "".join(f"  {name:<20} {what}\n" for name, what in VARIABLES.items()),
    )
    parser.add_argument("--version", action=_PrintVersion, nargs=0,
                        help="show the version, and whether replay's frame checks run in C")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.purpose, description=command.purpose)
        if command.name != selected:
            continue
        if command.uses_log:
            child.add_argument(
                "--log",
                metavar="DIR",
                help=f"the event log directory (default: ${LOG_ENV}, else ./{DEFAULT_LOG_DIR})",
            )
        _load(command).configure(child)
    return parser


def _load(command: Command) -> _CommandModule:
    return cast(_CommandModule, importlib.import_module(command.module))


def missing_modules(command: Command) -> list[str]:
    """The modules ``command`` needs that are not installed (found without importing them)."""
    return [name for name in command.needs if importlib.util.find_spec(name) is None]


def configure_accelerators() -> None:
    """Decide, once per process, whether the objects commands build check replay's frames in
    C (where built) or in Python: ``$WANTEL_PURE_PYTHON`` asks for Python."""
    if pure_python_requested():
        accelerate.configure(compiled=False, reason=f"${PURE_PYTHON_ENV}")
    else:
        accelerate.configure(compiled=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wantel`` console script."""
    configure_accelerators()  # first: --version reports it while the arguments are parsed
    args_list = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in args_list if not a.startswith("-")), None)
    chosen = next((c for c in COMMANDS if c.name == selected), None)
    missing = missing_modules(chosen) if chosen is not None else []
    if chosen is not None and missing:  # before its module is imported: it imports them
        print(f"wantel {chosen.name}: error: needs {' and '.join(missing)}, which the base "
              f"install leaves out: {WAN_EXTRA_INSTALL}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser(selected)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    configure_logging()  # diagnostics on stderr: `wantel cat` output stays clean JSON Lines
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        return _load(command).run(args)
    except BrokenLog as exc:
        print(f"wantel {command.name}: error: {exc}", file=sys.stderr)
        return EXIT_BROKEN_LOG
    except (UsageError, LogError) as exc:
        print(f"wantel {command.name}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `wantel cat | head`: the reader left; that is not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
