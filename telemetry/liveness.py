"""When a silent worker stops counting: one number for the projections and the exporters."""

from __future__ import annotations

from typing import Final

#: Seconds a worker may go unheard (no event from it or its jobs) and still count as alive.
#: Past it, the jobs projection marks its running jobs ``abandoned`` (in event time) and
#: ``/metrics`` stops counting it and its jobs as alive or running (in wall time).
WORKER_TIMEOUT_S: Final = 60.0
