"""``wantel dashboards build``: regenerate the Grafana dashboards and the Prometheus rules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dashboards.outputs import DEFAULT_OUT, DEFAULT_RULES, build_all
from telemetry.errors import UsageError


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel dashboards``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="write the dashboards' JSON and the alert rules",
                           description="Regenerate dashboards/generated/*.json and "
                                       "dashboards/alerts/wantel.yml from dashboards/*.py.")
    build.add_argument("--out", metavar="DIR",
                       help=f"write the dashboards (and wantel.yml) here instead "
                            f"(default: {DEFAULT_OUT} and {DEFAULT_RULES})")
    build.add_argument("--runbook-base", metavar="URL",
                       help="where docs/runbooks.md is served, for the alerts' runbook_url "
                            "(default: the repository-relative path docs/runbooks.md)")


def run(args: argparse.Namespace) -> int:
    """Build; print what changed."""
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    try:
        changed = build_all(out, runbook_base=args.runbook_base)
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("grafana_foundation_sdk"):
            raise
        raise UsageError("building dashboards needs Grafana's SDK: "
                         "pip install 'grafana-foundation-sdk==1769699379!11.6.0' "
                         "(or the dev extra: pip install -e '.[dev]')") from None
    except OSError as exc:
        raise UsageError(f"cannot write: {exc}") from None
    for path in changed:
        print(f"wrote {path}")
    if not changed:
        print("wantel dashboards: up to date", file=sys.stderr)
    return 0
