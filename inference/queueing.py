"""Record that a service queued a job: ``queued(...)`` when it accepts a request.

::

    queued(emitter, "req-42", model="wan2.2-t2v-a14b", queue="hd", priority=5)
    ...                                         # later, on a worker thread:
    with instrument(pipe, emitter=emitter, job="req-42"):   # the same job continues
        pipe(...)

A job with only a ``JobQueued`` is not taken: ``instrument(job=...)`` starts it under that id.
The projections then keep the queue's order (higher priority first, then arrival), measure the
wait apart from the run, and predict when each waiting job will start and finish.
"""

from __future__ import annotations

import time
from typing import Any, Final

from telemetry.emitter import Emitter, process_emitter
from telemetry.events import JobQueued, OptionValue, job_id_problem
from telemetry.log.base import EventLog

TASKS: Final = ("t2v", "i2v", "ti2v")
#: The longest queue name: it is a Prometheus label value.
MAX_QUEUE_NAME: Final = 64


def queue_name_problem(queue: Any) -> str | None:
    """Why ``queue`` cannot name a queue, in a phrase, or ``None`` when it can: a non-empty
    string of at most :data:`MAX_QUEUE_NAME` printable characters."""
    if not isinstance(queue, str) or not queue:
        return "a queue name is a non-empty string"
    if len(queue) > MAX_QUEUE_NAME:
        return f"a queue name has at most {MAX_QUEUE_NAME} characters, got {len(queue)}"
    if not queue.isprintable():
        return "a queue name holds only printable characters"
    return None


def queued(
    target: Emitter | EventLog,
    job: str,
    *,
    model: str,
    task: str = "t2v",
    queue: str = "default",
    priority: int = 0,
    request: dict[str, OptionValue] | None = None,
    traceparent: str | None = None,
) -> JobQueued:
    """Emit ``JobQueued`` for ``job`` and return it; call it when the service accepts the
    request, before the job waits.

    ``target``: the process's emitter, or a log (its process emitter is used, the one
    ``instrument(log=...)`` shares). ``priority``: higher starts first; equal priorities in
    arrival order. ``request``: a few scalars describing the request (width, height, frames:
    never the prompt). Bad arguments raise ``ValueError`` here, before anything is recorded;
    the emit itself never blocks and never raises.
    """
    if (problem := job_id_problem(job)) is not None:
        raise ValueError(f"job={job!r}: {problem}")
    if (problem := queue_name_problem(queue)) is not None:
        raise ValueError(f"queue={queue!r}: {problem}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    emitter = target if isinstance(target, Emitter) else process_emitter(target)
    event = JobQueued(job=job, ts=time.time_ns(), model=model, task=task,  # type: ignore[arg-type]
                      request=dict(request or {}), traceparent=traceparent, queue=queue,
                      priority=priority)
    emitter.emit(event)
    return event


__all__ = ["MAX_QUEUE_NAME", "queue_name_problem", "queued"]
