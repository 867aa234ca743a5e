"""Jobs in the shape of the OpenAI video job object: ``GET /v1/videos/{id}`` and ``/v1/videos``.

A client written against OpenAI's video API polls ``GET /v1/videos/{id}`` until ``status`` is
``completed`` or ``failed``, showing ``progress``; pointed at wantel, the same loop works
unchanged. The view is read-only (wantel records jobs, it does not create them) and is a read of
the same read model every other view uses (:func:`telemetry.projections.summary.job_summary`).

The mapping (``docs/api.md``, "A job as an OpenAI video object"):

=================  ==========================================================================
field              from
=================  ==========================================================================
``id``             the job id
``object``         ``"video"``
``model``          the model the job ran (or was queued for)
``status``         ``queued`` → ``queued``; ``running`` → ``in_progress``; ``completed`` →
                   ``completed``; ``failed``, ``cancelled``, ``abandoned`` → ``failed``
``progress``       integer 0–100: the cost-weighted progress wantel shows (never decreasing),
                   floored, at most 99 until the job completes, 100 once it has
``created_at``     integer seconds: when the job was queued (else started)
``completed_at``   integer seconds when the job ended (any ending), else ``null``
``expires_at``     ``null`` (wantel does not delete outputs)
``size``           ``"<width>x<height>"`` once the job started, else ``null``
``seconds``        the video's length as a string, frames ÷ the family's native rate (Wan 16
                   fps, 24 for TI2V-5B; CogVideoX 8…), once the job started, else ``null``
``error``          ``{"code", "message"}`` when ``status`` is ``failed``, else ``null``;
                   ``code``: ``out_of_memory``, the exception's type (``ValueError``…),
                   ``cancelled`` or ``abandoned``
=================  ==========================================================================
"""

from __future__ import annotations

import math
from typing import Any, Final

from telemetry.pipelines import native_fps
from telemetry.projections.jobs import JobsState, JobView
from telemetry.projections.summary import job_summary

OBJECT: Final = "video"
STATUS: Final[dict[str, str]] = {
    "queued": "queued",
    "running": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "failed",
    "abandoned": "failed",
}
DEFAULT_LIMIT: Final = 20
MAX_LIMIT: Final = 100


def _whole_seconds(ts: int | None) -> int | None:
    return None if ts is None else ts // 1_000_000_000


#: The message of an abandoned job's error, by its ``abandon_reason``.
_ABANDONED: Final = {
    "worker lost": "worker lost: the worker running the job was declared lost (silent past "
                   "the liveness timeout)",
    "worker stopped": "worker stopped: the worker running the job shut down before it ended",
}


def _error(view: JobView) -> dict[str, str] | None:
    if view.status == "failed":
        code = "out_of_memory" if view.oom else (view.error_type or "error")
        return {"code": code, "message": view.error_message or code}
    if view.status == "cancelled":
        return {"code": "cancelled", "message": view.error_message or "cancelled"}
    if view.status == "abandoned":
        return {"code": "abandoned", "message": _ABANDONED.get(
            view.abandon_reason or "", "the worker running the job stopped being heard from")}
    return None


def _progress(view: JobView, progress: float | None) -> int:
    if view.status == "completed":
        return 100
    if progress is None or not math.isfinite(progress):
        return 0
    return max(0, min(99, math.floor(progress * 100)))


def _seconds(view: JobView) -> str | None:
    if not view.num_frames:
        return None
    return f"{view.num_frames / native_fps(view.family, view.task):g}"


def video_object(states: dict[str, Any], job: str) -> dict[str, Any] | None:
    """``job`` as an OpenAI video object, or ``None`` if the jobs projection does not hold it."""
    summary = job_summary(states, job)
    if summary is None:
        return None
    view = summary.view
    created = view.queued_ts or view.started_ts or view.last_ts
    ended = view.ended_ts if view.status in ("completed", "failed", "cancelled",
                                             "abandoned") else None
    if view.status == "abandoned" and ended is None:
        ended = view.last_ts
    return {
        "id": view.job,
        "object": OBJECT,
        "model": view.model,
        "status": STATUS.get(view.status, "in_progress"),
        "progress": _progress(view, summary.progress),
        "created_at": _whole_seconds(created) or 0,
        "completed_at": _whole_seconds(ended),
        "expires_at": None,
        "size": f"{view.width}x{view.height}" if view.width and view.height else None,
        "seconds": _seconds(view),
        "error": _error(view),
    }


def list_videos(states: dict[str, Any], *, limit: int = DEFAULT_LIMIT, after: str | None = None,
                order: str = "desc") -> dict[str, Any] | None:
    """A page of jobs as OpenAI's list object (``{"object": "list", "data", "first_id",
    "last_id", "has_more"}``), in order of first appearance (``asc``) or the reverse
    (``desc``, the default), starting after the job ``after``; ``None`` if ``after`` names no
    job the server holds."""
    jobs: JobsState = states["jobs"]
    ids = list(jobs.jobs)
    if order == "desc":
        ids.reverse()
    start = 0
    if after is not None:
        if after not in jobs.jobs:
            return None
        start = ids.index(after) + 1
    page = ids[start:start + limit]
    data = [video for job in page if (video := video_object(states, job)) is not None]
    return {"object": "list", "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": start + limit < len(ids)}


__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "OBJECT", "STATUS", "list_videos", "video_object"]
