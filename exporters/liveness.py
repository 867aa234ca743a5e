"""Declaring silent workers lost: the aggregator's clock, recorded as an event.

The projections never read a clock, so "this worker has been silent for longer than the
liveness timeout" cannot be decided inside them. :class:`LivenessSink` decides it in the shell:
it is a sink of the runner that follows the log (``wantel serve``'s), and while that runner is
live and caught up it looks, about once a second and whenever the log is idle, at the jobs
projection's workers. A worker that has neither stopped (``WorkerStopped``) nor been declared
lost already, and from which neither a heartbeat, a lifecycle event nor an event of one of its
running jobs arrived within the timeout (wall clock against the events' ``ts``), is declared
lost: the sink appends :class:`~telemetry.events.WorkerLost` to the log it follows. The runner
reads it back like any event, and the projections mark that worker's running jobs abandoned
(reason ``worker lost``): every view agrees because every view folds the same event.

Idempotent. Two aggregators following one log both notice the same silence; they write the
same record: ``job`` = ``wantel/lost/<worker>`` and ``seq`` = one past the last declaration of
that worker the engine has applied (both derive it from the same log), so

* on JetStream, the second publish carries the same ``Nats-Msg-Id``
  (``wantel/lost/<worker>:<seq>``) and the server drops it;
* on a local log, :meth:`~telemetry.log.base.EventLog.append_new` checks the log's tail and
  appends under the log's ``flock``: the second writer finds the first's record and writes
  nothing;
* and if a copy slips through anyway (a publish after the server's duplicate window), the
  engine drops it by ``(job, seq)``, and the jobs projection applies only the first
  declaration per ``(worker, last_seen_ts)``.

A worker with no running job is declared lost only if it was heard from within
:data:`LOST_WINDOW_S` (an old log's long-gone workers are not declared lost on every new
aggregator's first start); one with a running job always is (that job is not running).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Final

import structlog

from telemetry.engine import ProjectionEngine
from telemetry.events import WorkerLost, stream_of_lost
from telemetry.liveness import WORKER_TIMEOUT_S
from telemetry.log.base import EventLog
from telemetry.projections.jobs import JobsState
from telemetry.runner import Applied, Sink

_log = structlog.get_logger("wantel.liveness")

#: A worker without a running job is declared lost only if last heard from within this many
#: seconds (the window ``wantel_jobs_lost`` keeps a lost job for, too).
LOST_WINDOW_S: Final = 3600.0


def default_declarer() -> str:
    """Who declares, in ``WorkerLost.declared_by``: ``serve@<host>:<pid>``."""
    return f"serve@{socket.gethostname()}:{os.getpid()}"


class LivenessSink(Sink):
    """Appends ``WorkerLost`` for workers silent past ``timeout_s`` (see the module's
    docstring). Attach it to a runner whose engine has the jobs projection; ``log`` is the
    log that runner follows."""

    name = "liveness"

    def __init__(self, log: EventLog, engine: ProjectionEngine, *,
                 timeout_s: float = WORKER_TIMEOUT_S, declared_by: str | None = None,
                 clock: Callable[[], int] = time.time_ns,
                 lost_window_s: float = LOST_WINDOW_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if "jobs" not in engine.states:
            raise ValueError("the liveness sink reads the jobs projection: the engine lacks it")
        self.log = log
        self.engine = engine
        self.timeout_ns = int(timeout_s * 1e9)
        self.lost_window_ns = int(lost_window_s * 1e9)
        self.declared_by = declared_by or default_declarer()
        self.clock = clock
        #: Seconds between checks while the log is idle (and at most that often while busy).
        self.tick_interval: float = min(1.0, timeout_s / 4)
        self._check_every_ns = int(self.tick_interval * 1e9)
        self._last_check = 0
        #: ``(stream, seq)`` of the declarations this sink wrote (or found written) that the
        #: engine has not applied yet: not written again meanwhile.
        self._written: set[tuple[str, int]] = set()
        #: Declarations written by this sink, and append failures.
        self.declared = 0
        self.failures = 0

    def on_applied(self, applied: Applied) -> None:
        """While live and caught up, check at most every :attr:`tick_interval` seconds."""
        if not applied.live or applied.behind:
            return
        if self.clock() - self._last_check >= self._check_every_ns:
            self.check()

    def on_tick(self) -> None:
        """The log is idle: check."""
        self.check()

    def check(self) -> list[WorkerLost]:
        """Declare lost every worker silent past the timeout now; returns the declarations
        this call appended (none if another aggregator's were there already)."""
        now = self.clock()
        self._last_check = now
        engine = self.engine
        jobs: JobsState = engine.states["jobs"]
        horizon = now - self.timeout_ns
        running: dict[str, int] = {}  # worker → the newest ts of its running jobs
        count: dict[str, int] = {}  # worker → how many
        for job in jobs.active:
            view = jobs.jobs.get(job)
            if view is None or view.status != "running" or view.worker is None:
                continue
            running[view.worker] = max(running.get(view.worker, 0), view.last_ts or 0)
            count[view.worker] = count.get(view.worker, 0) + 1
        last_seq = engine.last_seq
        self._written = {key for key in self._written if last_seq.get(key[0], -1) < key[1]}
        due: list[WorkerLost] = []
        for name, worker in jobs.workers.items():
            if worker.gone is not None:
                continue
            last_seen = max(worker.last_ts, running.get(name, 0))
            if last_seen >= horizon:
                continue
            if name not in running and last_seen < now - self.lost_window_ns:
                continue
            stream = stream_of_lost(name)
            seq = last_seq.get(stream, -1) + 1
            if (stream, seq) in self._written:
                continue
            due.append(WorkerLost(job=stream, seq=seq, ts=now, worker=name,
                                  last_seen_ts=last_seen, declared_by=self.declared_by))
        if not due:
            return []
        try:
            appended = self.log.append_new(due, engine.position)
        except Exception as exc:  # a read-only aggregator, a broker away: next check retries
            self.failures += 1
            if self.failures & (self.failures - 1) == 0:
                _log.warning("cannot declare silent workers lost; will retry",
                             workers=[e.worker for e in due], failures=self.failures,
                             error=f"{type(exc).__name__}: {exc}")
            return []
        self._written.update((event.job, event.seq) for event in due)
        declared = [event for event in appended if isinstance(event, WorkerLost)]
        for event in declared:
            _log.warning("worker declared lost: nothing from it or its jobs within the "
                         "liveness timeout; its running jobs are abandoned",
                         worker=event.worker, running_jobs=count.get(event.worker or "", 0),
                         silent_s=round((now - event.last_seen_ts) / 1e9, 1),
                         declared_by=self.declared_by)
        self.declared += len(declared)
        return declared


__all__ = ["LOST_WINDOW_S", "LivenessSink", "default_declarer"]
