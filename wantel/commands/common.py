"""Pieces shared by the subcommands that read the log."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Final

from telemetry.errors import UsageError
from telemetry.log.base import EventLog, Gap, LogNotFound, Quarantined
from telemetry.log.local import LocalLog
from wantel.config import (
    NATS_CA_ENV,
    NATS_CREDS_ENV,
    NATS_ENV,
    resolve_log_dir,
    resolve_nats,
    resolve_nats_file,
)

if TYPE_CHECKING:
    from telemetry.log.nats import NatsOptions


def add_nats_flags(parser: argparse.ArgumentParser, *, reading: bool = False,
                   what: str | None = None) -> None:
    """``--nats URL`` (its help starting with ``what``), ``--nats-creds FILE``,
    ``--nats-ca FILE``."""
    what = what or ("read the fleet's stream there instead of the local log" if reading
                    else "the fleet's NATS server(s), comma-separated")
    parser.add_argument("--nats", metavar="URL",
                        help=f"{what} (default: ${NATS_ENV})")
    parser.add_argument("--nats-creds", metavar="FILE",
                        help=f"a NATS credentials file (default: ${NATS_CREDS_ENV}; never "
                             "printed)")
    parser.add_argument("--nats-ca", metavar="FILE",
                        help=f"a CA bundle for the server's TLS certificate (default: "
                             f"${NATS_CA_ENV})")


def nats_options(args: argparse.Namespace, *, reconnect: bool = False,
                 required: str | None = None) -> NatsOptions:
    """The connection options the flags and variables give; a usage error if a command that
    ``required`` them has no URL or the [nats] extra is missing."""
    url = resolve_nats(getattr(args, "nats", None))
    if url is None:
        raise UsageError(f"{required or 'this command'} needs --nats URL (or ${NATS_ENV})")
    problem = nats_url_problem(url)
    if problem is not None:
        raise UsageError(f"--nats (or ${NATS_ENV}): {problem}")
    try:
        import nats  # noqa: F401

        from telemetry.log.nats import NatsOptions
    except ImportError:
        raise UsageError("--nats needs nats-py, which the base install leaves out: "
                         "pip install 'wan-telemetry[nats]'") from None
    for flag, name in (("nats_creds", NATS_CREDS_ENV), ("nats_ca", NATS_CA_ENV)):
        path = resolve_nats_file(getattr(args, flag, None), name)
        if path is not None:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"--{flag.replace('_', '-')}: cannot read {path}: "
                                 f"{exc.strerror}") from None
    return NatsOptions(url, creds=resolve_nats_file(getattr(args, "nats_creds", None),
                                                    NATS_CREDS_ENV),
                       ca=resolve_nats_file(getattr(args, "nats_ca", None), NATS_CA_ENV),
                       reconnect=reconnect)


#: The schemes a NATS server URL may have (nats-py's).
NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")


def nats_url_problem(url: str) -> str | None:
    """Why ``url`` (one server URL or several, comma-separated) cannot name NATS servers, in
    a phrase (credentials in it are never repeated), or ``None``. As the client reads them,
    ``HOST`` and ``HOST:PORT`` without a scheme mean ``nats://``; another scheme (``http://``)
    is refused here rather than tried."""
    from urllib.parse import urlsplit

    from telemetry.log.nats import redact

    for given in url.split(","):
        one = given.strip()
        try:
            parts = urlsplit(one if "://" in one else f"nats://{one}")
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            return f"{redact(one)!r} has a malformed host or port"
        if parts.scheme not in NATS_SCHEMES or not parts.hostname:
            return (f"expected nats://HOST[:PORT] or tls://HOST[:PORT] (ws://, wss:// too; "
                    f"comma-separated for several servers), got {redact(one)!r}")
    return None


def fleet_requested(args: argparse.Namespace) -> bool:
    """Whether ``--nats``/``$WANTEL_NATS`` asks to read the fleet stream (only for a command
    that has the flag: ``wantel demo`` serves its own local log whatever the variable says)."""
    return hasattr(args, "nats") and resolve_nats(args.nats) is not None


def open_log_for_reading(args: argparse.Namespace) -> EventLog:
    """The fleet stream with ``--nats``/``$WANTEL_NATS``, else the local log named by
    ``--log``/``$WANTEL_LOG``/default; a clear error if there is none."""
    if fleet_requested(args):
        from telemetry.log.nats import NatsLog

        return NatsLog(nats_options(args), create=False)
    return open_local_for_reading(args)


def open_local_for_reading(args: argparse.Namespace) -> LocalLog:
    """The local log named by ``--log``/``$WANTEL_LOG``/default; a clear error if none."""
    path = resolve_log_dir(args.log)
    try:
        return LocalLog(path, create=False)
    except LogNotFound as exc:
        raise LogNotFound(
            f"{exc}; run a job first (wantel run …) or point --log / $WANTEL_LOG at a log"
        ) from None


def warn_quarantined(command: str, notice: Quarantined) -> None:
    """One line on stderr for records the log had to skip, or positions it lost."""
    if isinstance(notice, Gap):
        print(f"wantel {command}: warning: gap: positions {notice.first}-{notice.next - 1} "
              f"({notice.count}) are missing at {notice.where}: {notice.reason}",
              file=sys.stderr)
        return
    count = f"{notice.count} record(s)" if notice.count else "records"
    print(
        f"wantel {command}: warning: skipped {count} at {notice.where}: {notice.reason}",
        file=sys.stderr,
    )
