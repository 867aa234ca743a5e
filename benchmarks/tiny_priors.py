"""The tiny Wan pipelines' CPU priors, measured in one run: fitted, and set beside the priors.

A job's phases share one speed (``telemetry.eta.live``): its first phases and steps say how
fast this machine runs it, and every phase to come is its prior at that speed. So what the
priors must get right is not their level (the machine's speed moves it, run to run) but the
ratio of each phase to the others, at every size. That needs every phase measured in the same
run. This records ``scripts/record_eta_corpus.py --plan priors`` (every tiny Wan variant, a
still to ~3,300 tokens, 8 steps, CFG on and off: real ``wantel run`` processes, one CPU
thread), fits it with ``wantel eta fit``'s own fit, and prints, per component, the fitted
coefficients beside the prior's, and fitted ÷ prior at the grid's smallest, middle and largest
shape. The save's fit includes a process's first export (every ``wantel run`` job pays it;
``FIRST_EXPORT_S``, measured by ``benchmarks/save_cost.py``), so its intercept is printed less
that.

    python benchmarks/tiny_priors.py                 # record into a temporary log, then fit
    python benchmarks/tiny_priors.py --log DIR       # fit a run recorded before
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def record(out: Path, jobs: int) -> None:
    """Record the priors plan into ``out``: one ``wantel run`` process per job."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "record_eta_corpus.py"),
                    "--plan", "priors", "--jobs", str(jobs), "--seed", "500", "--out",
                    str(out)], check=True, stdout=subprocess.DEVNULL)


def report(log: Path) -> None:
    """Fit the recorded run and print each component against its prior."""
    from telemetry.eta.fit import fit
    from telemetry.eta.jobs import job_records
    from telemetry.eta.model import (
        FIRST_EXPORT_S,
        component_key,
        features,
        prior_coefficients,
    )
    from telemetry.log.base import Batch
    from telemetry.log.local import LocalLog

    events = [e for item in LocalLog(log, create=False).read(0) if isinstance(item, Batch)
              for e in item.events]
    records = [r for r in job_records(events) if r.completed]
    result = fit(records)
    shapes = sorted({r.shape for r in records}, key=lambda s: (s.tokens, s.pixels))
    print(f"fitted on {len(records)} job(s) of the priors plan; fitted ÷ prior at the "
          "smallest, middle and largest shape that runs each component")
    print(f"{'COMPONENT':<36} {'FITTED':<32} {'PRIOR':<32} RATIOS")
    for component in result.components:
        phase, part, _device = component.key.split("|")
        fitted = list(component.coefficients)
        if phase == "save":
            fitted[0] -= FIRST_EXPORT_S
        runs = [s for s in shapes if component_key(phase, s) == component.key]
        prior = prior_coefficients(phase, runs[0])
        ratios = []
        for probe in (runs[0], runs[len(runs) // 2], runs[-1]):
            x = features(phase, probe)
            predicted = sum(c * v for c, v in zip(prior, x, strict=False))
            measured = sum(c * v for c, v in zip(fitted, x, strict=False))
            ratios.append(f"{measured / predicted:.2f}" if predicted > 0 else "–")
        print(f"{phase + '|' + part:<36} {_fmt(fitted):<32} {_fmt(prior):<32} "
              f"{' / '.join(ratios)}")


def _fmt(coefficients: Sequence[float]) -> str:
    return " ".join(f"{c:.4g}" for c in coefficients)


def main() -> None:
    """Record (unless ``--log``), then report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="a priors run recorded before")
    parser.add_argument("--jobs", type=int, default=30,
                        help="jobs to record (default 30: each variant at each size)")
    args = parser.parse_args()
    if args.log is not None:
        report(args.log)
        return
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "priors-run"
        record(log, args.jobs)
        report(log)


if __name__ == "__main__":
    main()
