"""Configuration read in one place: every ``WANTEL_*`` variable, and the flags that override them.

The libraries (``telemetry``, ``inference``, ``exporters``, ``dashboards``) read no environment
variable of wantel's: the application reads them here, when a command starts, and passes plain
values to the objects it builds. Each variable is documented once, in :data:`VARIABLES`, which
``wantel --help`` prints.

The OpenTelemetry SDK's own ``OTEL_*`` variables are read by the SDK, as its users expect; wantel
only looks at whether an OTLP endpoint is set, to decide whether to export spans at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from telemetry.errors import UsageError
from telemetry.liveness import WORKER_TIMEOUT_S

LOG_ENV: Final = "WANTEL_LOG"
TOKEN_ENV: Final = "WANTEL_TOKEN"
PURE_PYTHON_ENV: Final = "WANTEL_PURE_PYTHON"
NATS_ENV: Final = "WANTEL_NATS"
NATS_CREDS_ENV: Final = "WANTEL_NATS_CREDS"
NATS_CA_ENV: Final = "WANTEL_NATS_CA"
WORKER_ENV: Final = "WANTEL_WORKER"
WEBHOOK_SECRET_ENV: Final = "WANTEL_WEBHOOK_SECRET"
WORKER_TIMEOUT_ENV: Final = "WANTEL_WORKER_TIMEOUT"
TRACE_URL_ENV: Final = "WANTEL_TRACE_URL"
DEFAULT_LOG_DIR: Final = "wantel-log"
OTLP_ENVS: Final = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

#: Every variable wantel reads, with what it does (shown by ``wantel --help``).
VARIABLES: Final[dict[str, str]] = {
    LOG_ENV: f"the event log directory when --log is not given (default ./{DEFAULT_LOG_DIR})",
    TOKEN_ENV: "the bearer token `serve` and `demo` require when --token is not given",
    WEBHOOK_SECRET_ENV: "the key `serve` signs webhooks with when --webhook-secret is not "
                        "given",
    PURE_PYTHON_ENV: "set to 1 to check replay's frames in Python even where the C "
                     "accelerator was built",
    NATS_ENV: "the fleet's NATS server(s) when --nats is not given: `ship` and `run` ship to "
              "it, and `serve`, `replay` and `cat` read the fleet stream instead of a local log",
    NATS_CREDS_ENV: "a NATS credentials file when --nats-creds is not given (never printed)",
    NATS_CA_ENV: "a CA bundle for the NATS server's TLS certificate when --nats-ca is not given",
    WORKER_ENV: "this worker's id in the fleet when --worker is not given "
                "(default: host:pid:start)",
    WORKER_TIMEOUT_ENV: "seconds a silent worker's running jobs wait before `serve` and "
                        "`demo` declare them abandoned, when --worker-timeout is not given "
                        "(default 60)",
    TRACE_URL_ENV: "the live page's trace link, a URL template with {trace_id}, when "
                   "--trace-url is not given",
}


def _environ(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def resolve_log_dir(flag: str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--log DIR``, else ``$WANTEL_LOG``, else ``./wantel-log``."""
    return Path(flag or _environ(env).get(LOG_ENV) or DEFAULT_LOG_DIR)


def resolve_token(flag: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """``--token T``, else ``$WANTEL_TOKEN``, else no token.

    An empty ``--token ""`` (or ``WANTEL_TOKEN=``) is returned as given, not taken for "no
    token": the server refuses it at start rather than serving without auth by accident.
    """
    if flag is not None:
        return flag
    return _environ(env).get(TOKEN_ENV)


def resolve_webhook_secret(flag: str | None,
                           env: Mapping[str, str] | None = None) -> str | None:
    """``--webhook-secret S``, else ``$WANTEL_WEBHOOK_SECRET``, else none (unsigned)."""
    if flag is not None:
        return flag
    return _environ(env).get(WEBHOOK_SECRET_ENV)


def otlp_configured(flag: str | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether spans should be exported: ``--otlp URL`` or an ``OTEL_EXPORTER_OTLP_*`` endpoint."""
    environ = _environ(env)
    return bool(flag) or any(environ.get(name) for name in OTLP_ENVS)


def resolve_worker_timeout(flag: float | None, env: Mapping[str, str] | None = None) -> float:
    """``--worker-timeout S``, else ``$WANTEL_WORKER_TIMEOUT``, else 60 seconds; a
    :class:`~telemetry.errors.UsageError` (exit 2) unless a finite number above 0."""
    source, raw = "--worker-timeout", flag
    if raw is None:
        text = _environ(env).get(WORKER_TIMEOUT_ENV, "").strip()
        if not text:
            return WORKER_TIMEOUT_S
        source = f"${WORKER_TIMEOUT_ENV}"
        try:
            raw = float(text)
        except ValueError:
            raise UsageError(f"{source} must be a number of seconds, got {text!r}") from None
    if not (math.isfinite(raw) and raw > 0):
        raise UsageError(f"{source} must be a number of seconds above 0, got {raw:g}")
    return raw


def resolve_trace_url(flag: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """``--trace-url TEMPLATE``, else ``$WANTEL_TRACE_URL``, else none (no trace links)."""
    if flag is not None:
        return flag
    return _environ(env).get(TRACE_URL_ENV) or None


def pure_python_requested(env: Mapping[str, str] | None = None) -> bool:
    """``$WANTEL_PURE_PYTHON`` set (to anything but empty or 0): skip the C accelerator."""
    return _environ(env).get(PURE_PYTHON_ENV, "") not in ("", "0")


def resolve_nats(flag: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """``--nats URL``, else ``$WANTEL_NATS``, else ``None`` (the local log)."""
    return flag or _environ(env).get(NATS_ENV) or None


def resolve_nats_file(flag: str | None, name: str,
                      env: Mapping[str, str] | None = None) -> str | None:
    """A credentials or CA file: the flag, else the variable ``name``, else ``None``."""
    return flag or _environ(env).get(name) or None


def resolve_worker(flag: str | None, env: Mapping[str, str] | None = None, *,
                   default: str) -> str:
    """``--worker ID``, else ``$WANTEL_WORKER``, else ``default``."""
    return flag or _environ(env).get(WORKER_ENV) or default
