"""``wantel dashboards build``: regenerate the Grafana dashboards and the Prometheus rules."""

from __future__ import annotations

import argparse
import re
import sys
import urllib.parse
from pathlib import Path

from dashboards.outputs import DEFAULT_OUT, DEFAULT_RULES, build_all
from dashboards.rules import DEFAULT_RUNBOOK_URL, RuleParams, scrape_job_matcher
from dashboards.specs import JAEGER_URL, JOB_ID_FIELD, BuildOptions
from telemetry.errors import UsageError

#: One PromQL label matcher: ``name op "value"`` (the value may escape quotes).
_MATCHER = re.compile(r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*')


def configure(parser: argparse.ArgumentParser) -> None:
    """Flags of ``wantel dashboards``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = sub.add_parser(
        "build", help="write the dashboards' JSON and the alert rules",
        description="Regenerate dashboards/generated/*.json and dashboards/alerts/wantel.yml "
                    "from dashboards/*.py, for your deployment: the rules select wantel's own "
                    "series (never a scrape-job name unless you give one), and the dashboards "
                    "link traces to your trace backend.",
        epilog="Examples:\n"
               "  wantel dashboards build --out deploy/ --scrape-job gpu-workers \\\n"
               "      --runbook-url https://wiki.example.com/wantel/runbooks.md \\\n"
               "      --trace-url http://jaeger.example.com:16686 --datasource Mimir\n"
               "  # Tempo, through Grafana Explore (a data source with uid 'tempo'):\n"
               "  wantel dashboards build --trace-url '/explore?schemaVersion=1&panes="
               '{"t":{"datasource":"tempo","queries":[{"refId":"A","queryType":"traceql",'
               '"query":"{ span.wantel.job = \\"{job_id}\\" }"}]}}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--out", metavar="DIR",
                       help=f"write the dashboards (and wantel.yml) here instead "
                            f"(default: {DEFAULT_OUT} and {DEFAULT_RULES})")
    build.add_argument("--scrape-job", metavar="JOB",
                       help="the Prometheus scrape job that scrapes wantel: the rules select "
                            "only its series (job=\"JOB\") and the health dashboard selects it "
                            "by default (default: any job that scrapes wantel's series)")
    build.add_argument("--selector", metavar="MATCHERS", default="",
                       help="more PromQL label matchers every rule adds to wantel's series, "
                            "e.g. 'namespace=\"gpu\",cluster=\"eu-1\"' (default: none)")
    build.add_argument("--runbook-url", "--runbook-base", dest="runbook_url", metavar="URL",
                       default=DEFAULT_RUNBOOK_URL,
                       help="absolute http(s) URL where docs/runbooks.md is served; each "
                            "alert's runbook_url is URL#<alert> (default: %(default)s, a "
                            "placeholder that never resolves)")
    build.add_argument("--trace-url", metavar="URL", default=JAEGER_URL,
                       help="where the job drill-down links a job's traces: Jaeger's UI base "
                            "URL (searched by the job's wantel.job tag), or a URL template "
                            f"holding {JOB_ID_FIELD} (Grafana Explore over Tempo, another UI; "
                            "may start with / to stay inside Grafana) (default: %(default)s)")
    build.add_argument("--datasource", metavar="NAME", default="Prometheus",
                       help="the Prometheus data source the dashboards select by default, by "
                            "its name in Grafana (default: %(default)s)")


def _absolute(flag: str, url: str, *, relative_ok: bool = False) -> str:
    """``url`` if it is an absolute http(s) URL (or, where allowed, a path from /)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        return url
    if relative_ok and url.startswith("/") and not url.startswith("//"):
        return url
    need = "an absolute http(s) URL" + (" or a path from /" if relative_ok else "")
    raise UsageError(f"{flag} {url!r}: need {need}")


def _matchers(args: argparse.Namespace) -> str:
    """The rules' label matchers from ``--scrape-job`` and ``--selector``, checked."""
    if args.scrape_job is not None and (not args.scrape_job.strip()
                                        or any(c in args.scrape_job for c in "\n\r")):
        raise UsageError(f"--scrape-job {args.scrape_job!r}: need a scrape job name")
    extra = args.selector.strip().strip("{}").strip()
    if extra:
        # Split on commas outside quotes, then check each matcher.
        parts = re.findall(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+', extra)
        bad = [part for part in parts if not _MATCHER.fullmatch(part)]
        if bad or "".join(parts).count('"') % 2:
            raise UsageError(f"--selector {args.selector!r}: need PromQL label matchers such "
                             f"as 'namespace=\"gpu\"' (comma-separated)")
        extra = ",".join(part.strip() for part in parts)
    return ",".join(m for m in (scrape_job_matcher(args.scrape_job), extra) if m)


def run(args: argparse.Namespace) -> int:
    """Build; print what changed."""
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a directory")
    if not args.datasource.strip():
        raise UsageError("--datasource: need a data source name")
    params = RuleParams(matchers=_matchers(args),
                        runbook_base=_absolute("--runbook-url", args.runbook_url))
    options = BuildOptions(trace_url=_absolute("--trace-url", args.trace_url, relative_ok=True),
                           datasource=args.datasource, scrape_job=args.scrape_job)
    try:
        changed = build_all(out, params=params, options=options)
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
