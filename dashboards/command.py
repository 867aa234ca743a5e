"""``wantel dashboards build``: regenerate the Grafana dashboards and the Prometheus rules.

The outputs are committed; this command is how they change. It writes
``dashboards/generated/*.json`` and ``dashboards/alerts/wantel.yml`` (or both into ``--out
DIR``), byte for byte the same on every run, so a diff shows exactly what a code change did.
Files are replaced atomically (a reader such as Grafana's provisioner never sees half a file).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from telemetry.errors import UsageError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PACKAGE_DIR / "generated"
DEFAULT_RULES = PACKAGE_DIR / "alerts" / "wantel.yml"


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


def write_atomic(path: Path, text: str) -> bool:
    """Replace ``path`` with ``text`` unless it already holds exactly that; True if written."""
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def build_all(out: Path | None = None, *, runbook_base: str | None = None) -> list[Path]:
    """Write every dashboard and the rule file; returns the paths that changed."""
    from dashboards.build import render_all
    from dashboards.rules import RuleParams, render_rules

    dash_dir = out or DEFAULT_OUT
    rules_path = (out / DEFAULT_RULES.name) if out else DEFAULT_RULES
    params = RuleParams() if runbook_base is None else RuleParams(runbook_base=runbook_base)
    outputs = {dash_dir / name: text for name, text in render_all().items()}
    outputs[rules_path] = render_rules(params)
    return [path for path, text in outputs.items() if write_atomic(path, text)]


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
