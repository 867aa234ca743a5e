"""The event catalogue: immutable, typed, versioned records of what happened during inference.

Every derived view in wantel is a fold over these records, so they are the contract between the
emitting side (``inference/``) and everything else. They are msgspec ``Struct``s in one tagged
union: encoding and schema-checked decoding cost a fraction of a microsecond each, which keeps
the emitter off the model's critical path and replay above a million events per second.

Common fields, present on every event:

``type``
    the tag (the class name), written by msgspec.
``v``
    the schema version of that type; old versions are upcast on read (see :mod:`telemetry.codec`).
``job``
    the stream the event belongs to: a job id, or ``worker/<name>`` for a worker's own events.
``seq``
    per-stream sequence number from 0, gap-free. The emitter assigns it when the event is left at
    :data:`UNSEQUENCED`, so drops under overload never leave holes. ``(job, seq)`` is the
    de-duplication key of every backend and projection.
``ts``
    wall clock at the moment the event describes, in nanoseconds since the epoch.
``worker``
    the emitting worker, where known.

The prompt is never an event field: ``JobStarted`` carries its SHA-256 only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Final, Literal

import msgspec

#: Placeholder ``seq`` for events whose sequence number the emitter assigns at flush time.
UNSEQUENCED: Final = -1

Stage = Literal[
    "load",
    "text_encode",
    "image_encode",
    "latent_init",
    "denoise",
    "decode",
    "postprocess",
    "save",
]
STAGES: Final[tuple[str, ...]] = (
    "load",
    "text_encode",
    "image_encode",
    "latent_init",
    "denoise",
    "decode",
    "postprocess",
    "save",
)

Expert = Literal["high_noise", "low_noise"]
#: Wan's tasks (``t2v``, ``i2v``, ``ti2v``) and those of other diffusers pipelines
#: (:mod:`telemetry.pipelines`): video to video, text to image, image to image, inpainting.
Task = Literal["t2v", "i2v", "ti2v", "v2v", "t2i", "i2i", "inpaint"]

OptionValue = str | int | float | bool | None


def _version(number: int) -> Callable[[], int]:
    """A ``v`` default that is always encoded (``omit_defaults`` skips only plain defaults)."""
    return lambda: number


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True, gc=False,
            omit_defaults=True):
    """Fields every event carries. Subclasses set ``v`` to their current schema version.

    ``omit_defaults``: a stored record leaves out fields at their default (mostly ``null``s),
    which makes records ~40 % smaller and replay's decode and checksums cheaper; decoding fills
    them back in. ``v`` is the exception — a default *factory*, so it is always written and an
    old record keeps saying which version wrote it. :func:`to_builtins` (APIs, ``wantel cat``)
    shows every field.

    ``gc=False``: events hold only scalars, tuples and dicts of scalars, so they can never be
    part of a reference cycle; leaving them out of the cyclic collector's tracking makes a
    replay's decode ~10 % cheaper (millions of events would otherwise be tracked).
    """

    VERSION: ClassVar[int] = 1

    v: int = msgspec.field(default_factory=_version(1))
    job: str
    seq: int = UNSEQUENCED
    ts: int
    worker: str | None = None


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Which device ran a job: ``kind`` is ``cuda``, ``cpu`` or ``mps``."""

    kind: str
    name: str
    total_memory_bytes: int | None = None
    index: int | None = None


class JobQueued(Event, frozen=True, kw_only=True):
    """A service accepted a request; lets projections measure queue wait apart from execution
    and keep each queue's order.

    ``queue`` names the queue the job waits in and ``priority`` orders it there (higher runs
    first; equal priorities in arrival order). Both were added later with defaults, so a record
    written before them decodes as the ``"default"`` queue at priority 0 (no version bump: a
    missing field is the default, which is exactly what those records meant).
    """

    model: str
    task: Task
    request: dict[str, OptionValue] = {}
    traceparent: str | None = None
    queue: str = "default"
    priority: int = 0


class JobStarted(Event, frozen=True, kw_only=True):
    """Execution began: the request and the device, enough to predict how long it will take."""

    model: str
    family: str
    variant: str
    task: Task
    width: int
    height: int
    num_frames: int
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None = None
    cfg: bool
    boundary_ratio: float | None = None
    seed: int | None = None
    device: DeviceInfo
    options: dict[str, OptionValue] = {}
    prompt_sha256: str | None = None
    #: Only with an explicit opt-in (``wantel run --record-prompt``); never by default.
    prompt: str | None = None
    traceparent: str | None = None


class StageStarted(Event, frozen=True, kw_only=True):
    """A stage of the pipeline began."""

    stage: Stage


class StageEnded(Event, frozen=True, kw_only=True):
    """A stage ended; ``duration_s`` is measured on the device where one is used."""

    stage: Stage
    duration_s: float
    ok: bool = True


class StepEnded(Event, frozen=True, kw_only=True):
    """One denoising step finished.

    v2 (current): ``passes`` replaced v1's ``cfg_passes``, and ``sigma`` and ``expert`` were added
    (v1 records are upcast with both unknown).
    """

    VERSION: ClassVar[int] = 2

    v: int = msgspec.field(default_factory=_version(2))
    step: int
    total_steps: int
    timestep: float | None = None
    sigma: float | None = None
    expert: Expert | None = None
    passes: int = 1
    duration_s: float | None = None


class StageProgress(Event, frozen=True, kw_only=True):
    """A stage that runs in pieces finished ``done`` of its ``total`` pieces.

    Wan's VAE decodes one latent frame at a time (per tile, per video), and on a tiny model or
    a long clip the decode is most of the job: these let the ETA measure the decode's own pace
    as it goes instead of waiting for its end. ``ts`` is when the piece finished on the
    device. Added after v1 of the catalogue; no other type changed with it.
    """

    stage: Stage
    done: int
    total: int


class ExpertSwitched(Event, frozen=True, kw_only=True):
    """Wan 2.2 A14B handed the remaining steps from one expert transformer to the other."""

    step: int
    from_expert: Expert
    to_expert: Expert


class MemorySampled(Event, frozen=True, kw_only=True):
    """Memory readings; ``None`` where the source does not exist (no CUDA, no NVML)."""

    device: str
    stage: Stage | None = None
    step: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None
    device_total_bytes: int | None = None
    process_device_bytes: int | None = None
    host_rss_bytes: int | None = None
    #: The process's resident-set high-water mark since the job started (CPU; cheap to read).
    host_peak_rss_bytes: int | None = None


class GpuSampled(Event, frozen=True, kw_only=True):
    """NVML readings of one device; only emitted where NVML is present.

    ``gpu`` (NVML's index, which DCGM exporter's ``gpu`` label is) and ``uuid`` (``GPU-…``,
    DCGM's ``UUID``) name the physical device, so ``/metrics`` can join DCGM's series; both
    are optional (records written before they existed decode with ``None``).
    """

    device: str
    gpu: int | None = None
    uuid: str | None = None
    utilization_ratio: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    throttle_reasons: tuple[str, ...] = ()


class JobCompleted(Event, frozen=True, kw_only=True):
    """The job produced its output."""

    duration_s: float
    output_path: str | None = None
    frames: int | None = None
    bytes: int | None = None


class JobFailed(Event, frozen=True, kw_only=True):
    """The job raised; the message is sanitised (no prompt, bounded length).

    v2 (current): ``category`` (one of :data:`telemetry.guidance.CATEGORIES`) and
    ``suggestions`` (short, concrete, with numbers from the job's own shape) were added; v1
    records are upcast with the category told from their type, message, stage and ``oom``
    flag, and no suggestions.
    """

    VERSION: ClassVar[int] = 2

    v: int = msgspec.field(default_factory=_version(2))
    duration_s: float
    stage: Stage | None = None
    step: int | None = None
    error_type: str
    message: str
    oom: bool = False
    category: str = "internal"
    suggestions: tuple[str, ...] = ()


class JobCancelled(Event, frozen=True, kw_only=True):
    """The job was interrupted on request, at a step boundary."""

    duration_s: float
    stage: Stage | None = None
    step: int | None = None
    reason: str = "cancelled"


class WorkerHeartbeat(Event, frozen=True, kw_only=True):
    """A worker is alive; lets projections mark the jobs of a silent worker abandoned."""

    host: str
    pid: int
    devices: tuple[str, ...] = ()


class WorkerStopped(Event, frozen=True, kw_only=True):
    """A worker shut down cleanly (its emitter closed: ``wantel run`` ending, a process
    exiting, ``wantel ship`` stopping): scale-down, not a failure.

    It is the last event of the worker's own stream (``worker/<name>``). The worker is no
    longer alive from here, and no view raises "lost" for it; a job of it still running here
    (the process exited mid-job) is ``abandoned`` at once with the reason ``worker stopped``.
    A later event of the same worker makes it alive again.
    """

    host: str
    pid: int


class WorkerLost(Event, frozen=True, kw_only=True):
    """An aggregator declared a worker lost: nothing from it or its jobs for longer than the
    liveness timeout, by the aggregator's clock (``wantel serve``; the projections never read
    a clock, so the decision is recorded as this event).

    ``worker`` names the lost worker (not the writer: that is ``declared_by``), and ``job`` is
    :func:`stream_of_lost` of it, with ``seq`` the number of earlier declarations of that
    worker the aggregator had applied: two aggregators that notice the same silence write
    the same ``(job, seq)``, which the log de-duplicates (NATS ``Nats-Msg-Id``) and every view
    drops anyway. ``last_seen_ts`` is the newest event time the aggregator had from the worker
    and its running jobs: projections apply only the first declaration per
    ``(worker, last_seen_ts)``, and none that the worker's own later events refute. The
    worker's running jobs become ``abandoned`` (reason ``worker lost``); a new heartbeat makes
    the worker alive again.
    """

    last_seen_ts: int
    declared_by: str


class EventsDropped(Event, frozen=True, kw_only=True):
    """The emitter dropped events; ``counts`` are cumulative per reason since it started."""

    counts: dict[str, int]


class EtaCalibrated(Event, frozen=True, kw_only=True):
    """``wantel eta fit`` calibrated the ETA model; jobs that start after it use these figures.

    Recording the calibration in the log keeps replay deterministic: a projection uses the
    latest calibration at each position, never one read from elsewhere.
    """

    coefficients: dict[str, tuple[float, ...]]
    rel_sigma: dict[str, float] = {}
    warmup: dict[str, float] = {}
    quantiles: dict[str, tuple[float, float]] = {}
    jobs: int = 0


class CancelRequested(Event, frozen=True, kw_only=True):
    """Someone asked for a job to stop (``POST /api/jobs/{id}/cancel``).

    It lives in wantel's control stream (``job`` is :data:`CONTROL_STREAM`), not in the job's
    own: the job's worker owns that stream's ``seq`` numbers, and a second writer would collide
    with them (``(job, seq)`` is the de-duplication key). ``target`` names the job. The worker
    learns of it through the control channel (:mod:`telemetry.control`), stops at its next step
    boundary and records ``JobCancelled(reason="requested")``.
    """

    target: str
    by: str = "api"
    reason: str = "requested"


AnyEvent = (
    JobQueued
    | JobStarted
    | StageStarted
    | StageEnded
    | StepEnded
    | StageProgress
    | ExpertSwitched
    | MemorySampled
    | GpuSampled
    | JobCompleted
    | JobFailed
    | JobCancelled
    | WorkerHeartbeat
    | WorkerStopped
    | WorkerLost
    | EventsDropped
    | EtaCalibrated
    | CancelRequested
)

EVENT_TYPES: Final[tuple[type[Event], ...]] = (
    JobQueued,
    JobStarted,
    StageStarted,
    StageEnded,
    StepEnded,
    ExpertSwitched,
    MemorySampled,
    GpuSampled,
    JobCompleted,
    JobFailed,
    JobCancelled,
    WorkerHeartbeat,
    EventsDropped,
    EtaCalibrated,
    CancelRequested,
    WorkerStopped,
    WorkerLost,
    StageProgress,
)
EVENT_TYPES_BY_NAME: Final[dict[str, type[Event]]] = {cls.__name__: cls for cls in EVENT_TYPES}

TERMINAL_TYPES: Final[tuple[type[Event], ...]] = (JobCompleted, JobFailed, JobCancelled)


class Priority:
    """What to drop first when the emitter's queue is full: samples, then steps, then the rest."""

    SAMPLE: Final = 0
    STEP: Final = 1
    LIFECYCLE: Final = 2
    NAMES: Final = ("sample", "step", "lifecycle")


PRIORITY: Final[dict[type[Event], int]] = {
    cls: Priority.LIFECYCLE for cls in EVENT_TYPES
} | {
    MemorySampled: Priority.SAMPLE,
    GpuSampled: Priority.SAMPLE,
    WorkerHeartbeat: Priority.SAMPLE,
    StepEnded: Priority.STEP,
    StageProgress: Priority.STEP,
}


#: The stream calibrations are recorded in.
ETA_STREAM: Final = "wantel/eta"
#: The stream of wantel's requests to workers (:class:`CancelRequested`).
CONTROL_STREAM: Final = "wantel/control"
#: Prefixes of the streams the log keeps for itself: a worker's own events
#: (:func:`stream_of_worker`) and wantel's (:data:`ETA_STREAM`, and any later ``wantel/…``).
RESERVED_STREAM_PREFIXES: Final = ("worker/", "wantel/")


def stream_of_worker(worker: str) -> str:
    """The ``job`` field used for a worker's own events (heartbeats, drop counts, its stop)."""
    return f"worker/{worker}"


#: The prefix of the streams aggregators declare lost workers in (:class:`WorkerLost`).
LOST_STREAM_PREFIX: Final = "wantel/lost/"


def stream_of_lost(worker: str) -> str:
    """The ``job`` field of :class:`WorkerLost` declarations of ``worker``: a stream of their
    own (``wantel/lost/<worker>``), since the worker owns the ``seq`` of its stream."""
    return f"{LOST_STREAM_PREFIX}{worker}"


def job_id_problem(job: str) -> str | None:
    """Why ``job`` cannot name a job, in a phrase, or ``None`` when it can.

    This module owns the rule: a job id is a non-empty string, encodable as UTF-8 (a lone
    surrogate is not), that does not start with a reserved stream prefix
    (:data:`RESERVED_STREAM_PREFIXES`) — a job there would be folded as a worker's or
    wantel's own events. Whether the id is already in a log is the log's to answer
    (:meth:`telemetry.log.base.EventLog.has_job`).
    """
    if not isinstance(job, str) or not job:
        return "a job id is a non-empty string"
    reserved = next((p for p in RESERVED_STREAM_PREFIXES if job.startswith(p)), None)
    if reserved is not None:
        return (f"job ids starting with {reserved!r} are reserved for the log's own streams "
                "(worker/<name>, wantel/eta)")
    try:
        job.encode("utf-8")
    except UnicodeEncodeError:
        return "a job id must be valid Unicode text (it holds a lone surrogate)"
    return None


def to_builtins(event: Event) -> dict[str, Any]:
    """The event as plain JSON-ready builtins: its ``type`` tag and every field, defaults too.

    Stored records omit default values; what people and programs read (``wantel cat``, the
    HTTP API, WebSocket frames) keeps one stable shape with every key present.
    """
    data: dict[str, Any] = {"type": type(event).__struct_config__.tag}
    for name in event.__struct_fields__:
        data[name] = getattr(event, name)
    result: dict[str, Any] = msgspec.to_builtins(data)
    return result
