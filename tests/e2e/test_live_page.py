"""The live page in a real browser: Debian's Chromium, driven by Playwright, on a real server."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.exporters.test_server import JobScript, served, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed")


@pytest.fixture
def page() -> Iterator[Any]:
    """A fresh Chromium page (Playwright with the system browser; never `playwright install`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 560})
        finally:
            browser.close()


def row_text(page: Any, table: str, job: str) -> str:
    """The text of a job's row in ``#running`` or ``#finished`` ('' while absent)."""
    row = page.query_selector(f'#{table} tr[data-job="{job}"]')
    return str(row.inner_text()) if row is not None else ""


def row_with(page: Any, table: str, job: str, needle: str) -> str:
    """The row's text if it contains ``needle``, else ''."""
    text = row_text(page, table, job)
    return text if needle in text else ""


def test_a_tiny_job_goes_from_estimating_to_completed(page: Any, tmp_path: Path,
                                                      pytestconfig: pytest.Config) -> None:
    """The page shows a real job 'estimating' while it starts, then completed with its ETA error.

    The screenshot goes to ``tmp_path``; ``make docs-image`` (``--save-live-page``) copies it to
    ``docs/live-page.png``.
    """
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    from inference.runner import GenerationRequest, generate, prepare
    from telemetry.emitter import Emitter

    log_dir = tmp_path / "log"
    earlier = JobScript("t2v-earlier", steps=6)
    long_one = JobScript("t2v-long", steps=40, gap_s=0.75, ago_s=25)  # 14 of 40 steps done
    with served(log_dir) as s:
        s.append(earlier.whole() + long_one.start() + long_one.step_range(0, 14))
        page.goto(s.base)
        wait_for(lambda: page.inner_text("#conn") == "live", "the page to connect")
        wait_for(lambda: "t2v-long" in row_text(page, "running", "t2v-long"), "the running row")

        release = threading.Event()
        request = GenerationRequest(model="tiny-t2v-a14b", prompt="a fox", frames=5, height=32,
                                    width=32, steps=4, job="e2e-fox",
                                    out=str(tmp_path / "fox.mp4"))
        outcome: dict[str, Any] = {}

        def run_job() -> None:
            # The gate holds the job after its load stage: before two steps, ETA is "estimating".
            with Emitter(s.log) as emitter:
                outcome["result"] = generate(prepare(request), emitter,
                                             on_instrumented=lambda _: release.wait(60))

        worker = threading.Thread(target=run_job)
        worker.start()
        try:
            estimating = wait_for(lambda: row_with(page, "running", "e2e-fox", "estimating"),
                                  "the job to show 'estimating'", timeout=120)
        finally:
            release.set()
        finished = wait_for(lambda: row_text(page, "finished", "e2e-fox"),
                            "the job to finish on the page", timeout=60)
        worker.join(60)
        status = page.inner_text('#finished tr[data-job="e2e-fox"] td.status')
        running_jobs = page.eval_on_selector_all("#running tbody tr", "rows => rows.length")
        still_running = row_text(page, "running", "e2e-fox")
        screenshot = tmp_path / "live-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
    assert "completed" == outcome["result"].status
    assert "tiny-t2v-a14b" in estimating
    assert "completed" == status
    assert "±" in finished  # the ETA error of a completed job
    assert "" == still_running
    assert 1 == running_jobs  # only the synthetic long job is still running
    assert screenshot.stat().st_size > 0
    save_to = pytestconfig.getoption("--save-live-page")
    if save_to:
        shutil.copyfile(screenshot, save_to)


TRACE_URL = "http://jaeger.example:16686/trace/{trace_id}"


@pytest.mark.parametrize("width", [1280, 390])
def test_selection_progressbar_details_and_width(page: Any, tmp_path: Path, width: int) -> None:
    """At 1280 and 390 px: no horizontal overflow; each running job has an accessible
    progressbar whose value never goes back; a job's selected text and the picked job survive
    the updates that keep arriving; the picked job shows its worker, expert and a trace link
    through the configured template; a failed job shows its error, stage and step."""
    import msgspec

    from exporters.service import summarize
    from telemetry.events import Event, StepEnded

    def low_noise(events: list[Event]) -> list[Event]:
        """Steps of a Wan 2.2 A14B job past its boundary: the low-noise expert's."""
        return [msgspec.structs.replace(e, expert="low_noise") if isinstance(e, StepEnded)
                else e for e in events]

    page.set_viewport_size({"width": width, "height": 900})
    log_dir = tmp_path / "log"
    busy = JobScript("t2v-busy-with-a-long-job-id", steps=400, gap_s=0.05, worker="gpu-node-1:77")
    failed = JobScript("oom-1", steps=4, worker="gpu-node-2:9")
    with served(log_dir, trace_url=TRACE_URL) as s:
        s.append(failed.whole("failed") + busy.start() + low_noise(busy.step_range(0, 3)))
        page.goto(s.base)
        wait_for(lambda: page.inner_text("#conn") == "live", "the page to connect")
        cell = f'#running tr[data-job="{busy.job}"] td.job'
        wait_for(lambda: page.query_selector(cell), "the running row")
        # a user picks the job, then selects its id's text (to copy it)
        page.click(f'#running tr[data-job="{busy.job}"] td.size')
        page.eval_on_selector(cell, "td => getSelection().selectAllChildren(td)")
        values: list[int] = []
        for first in range(3, 60, 3):  # updates keep coming, and the page redraws every 500 ms
            s.append(low_noise(busy.step_range(first, first + 3)))
            now = page.get_attribute(f'#running tr[data-job="{busy.job}"] [role=progressbar]',
                                     "aria-valuenow")
            values.append(int(now))
        wait_for(lambda: int(page.get_attribute(
            f'#running tr[data-job="{busy.job}"] [role=progressbar]', "aria-valuenow"))
            > values[0] or None, "the bar to move", timeout=20)
        page.wait_for_timeout(1200)  # two redraws of the countdown, at least
        selection = page.evaluate("getSelection().toString()")
        picked = page.get_attribute(f'#running tr[data-job="{busy.job}"]', "aria-selected")
        details = page.inner_text("#details")
        link = page.get_attribute("#details a", "href")
        bar = page.query_selector(f'#running tr[data-job="{busy.job}"] [role=progressbar]')
        assert bar is not None
        aria = {name: bar.get_attribute(name) for name in
                ("aria-valuemin", "aria-valuemax", "aria-label")}
        overflow = page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        page.screenshot(path=str(tmp_path / f"live-{width}.png"), full_page=True)
        with s.service.lock:
            view = summarize(s.service.engine.states, busy.job)
        page.click('#finished tr[data-job="oom-1"] td.size')
        failure = wait_for(lambda: "OutOfMemoryError" in page.inner_text("#details")
                           and page.inner_text("#details"), "the failure details")
        page.screenshot(path=str(tmp_path / f"live-{width}-failed.png"), full_page=True)
    assert busy.job == selection.strip()
    assert "true" == picked
    assert values == sorted(values)
    assert {"aria-valuemin": "0", "aria-valuemax": "100",
            "aria-label": f"progress of job {busy.job}"} == aria
    assert overflow[0] <= overflow[1] <= width  # nothing wider than the window
    assert "gpu-node-1:77" in details and "low noise" in details
    assert view is not None and view["trace_id"]
    assert TRACE_URL.replace("{trace_id}", view["trace_id"]) == link
    assert "out of memory" in failure and "denoise" in failure
    assert (tmp_path / f"live-{width}.png").stat().st_size > 0


def test_a_queued_job_shows_its_place_and_when_it_starts(page: Any, tmp_path: Path) -> None:
    """A job waiting behind a running one: 'queued #1 in gpu · starts in ~…'."""
    import time

    from telemetry.events import JobQueued

    def queued(job: str) -> JobQueued:
        return JobQueued(job=job, seq=0, ts=time.time_ns(), model="tiny-t2v", task="t2v",
                         queue="gpu", worker="svc")

    history = [JobScript(f"h{i}", worker="w", ago_s=30.0) for i in range(2)]
    busy = JobScript("busy", worker="w", steps=40, gap_s=0.5)
    busy.seq = 1  # its JobQueued took seq 0
    with served(tmp_path / "log") as s:
        s.append([e for h in history for e in h.whole()] + [queued("busy"), *busy.start(),
                                                            *busy.step_range(0, 3),
                                                            queued("next")])
        page.goto(s.base)
        wait_for(lambda: page.inner_text("#conn") == "live", "the page to connect")
        row = wait_for(lambda: row_with(page, "running", "next", "starts in ~"),
                       "the queued row with its predicted start")
    assert "queued #1 in gpu" in row


def test_a_job_of_a_worker_declared_lost_leaves_the_running_table(page: Any,
                                                                  tmp_path: Path) -> None:
    """A worker goes silent mid-job; the server declares it lost (WorkerLost): the page moves
    the job from running to finished, status 'abandoned', its details saying why."""
    import time

    from tests.exporters.test_liveness import a_running_job

    log_dir = tmp_path / "log"
    with served(log_dir, worker_timeout_s=1.0, declare_lost_as="agg") as s:
        page.goto(s.base)
        wait_for(lambda: page.inner_text("#conn") == "live", "the page to connect")
        s.append(a_running_job("silent-1", "w1", time.time_ns()))
        wait_for(lambda: row_text(page, "running", "silent-1"), "the running row")
        wait_for(lambda: row_text(page, "finished", "silent-1"), "the job to leave running",
                 timeout=30)
        status = page.inner_text('#finished tr[data-job="silent-1"] td.status')
        page.click('#finished tr[data-job="silent-1"]')
        details = wait_for(lambda: row_with_details(page, "worker lost"), "the reason shown")
        still_running = row_text(page, "running", "silent-1")
    assert "abandoned" == status
    assert "" == still_running
    assert "worker lost" in details


def row_with_details(page: Any, needle: str) -> str:
    """The details panel's text if it contains ``needle``, else ''."""
    text = str(page.inner_text("body"))
    return text if needle in text else ""


def _seconds(text: str) -> float:
    """Seconds from the page's duration text (``12.5 s``, ``9 m 05 s``)."""
    import re

    found = re.fullmatch(r"(?:(\d+) m )?(\d+(?:\.\d+)?) s", text.strip())
    assert found is not None, text
    return 60 * int(found.group(1) or 0) + float(found.group(2))


def test_the_eta_counts_down_from_when_it_was_issued(page: Any, tmp_path: Path) -> None:
    """An ETA is issued about every tenth of the loop; the step frames between two issues carry
    the same one. The page counts it down from when it was issued (by the frames' own event
    time), not from each frame's arrival, so it does not jump back up at every step: with steps
    of 20 s, two steps and a memory sample after the issue, it shows 100 s less than issued."""
    import json
    from urllib.request import urlopen

    slow = JobScript("slow-steps", steps=40, gap_s=20.0, ago_s=700.0)
    with served(tmp_path / "log") as s:
        s.append(slow.start() + slow.step_range(0, 12))  # the 12th step issues an ETA
        page.goto(s.base)
        wait_for(lambda: page.inner_text("#conn") == "live", "the page to connect")
        wait_for(lambda: row_with(page, "running", "slow-steps", "12/40"), "step 12 on the page")
        s.applied(s.append(slow.step_range(12, 14)))  # no issue at 13 or 14
        row = wait_for(lambda: row_with(page, "running", "slow-steps", "14/40"),
                       "step 14 on the page")
        with urlopen(s.base + "api/jobs/slow-steps", timeout=10) as response:
            eta = json.loads(response.read())["eta"]["history"][-1]  # the latest issued
    lag = slow.ts / 1e9 - eta["ts"]  # the latest frame's event time less the ETA's issue
    assert 95 <= lag <= 105
    shown = _seconds(row.split("\t")[6].split(" (")[0])
    assert eta["remaining_s"] - lag - 10 <= shown <= eta["remaining_s"] - lag + 1
