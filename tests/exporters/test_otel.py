"""Traces from real tiny jobs, exported by the real OTLP exporters to a real OTLP receiver."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from exporters.otel import (
    SpanSink,
    exporter_from_config,
    spans_for_job,
    stage_role,
)
from inference.instrument import instrument
from inference.runner import GenerationRequest, generate, prepare
from inference.tiny_models import build_tiny_pipeline
from telemetry.emitter import Emitter
from telemetry.engine import CheckpointStore, ProjectionEngine
from telemetry.events import (
    TERMINAL_TYPES as TERMINALS,
)
from telemetry.events import (
    Event,
    ExpertSwitched,
    JobFailed,
    JobQueued,
    JobStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    StepEnded,
)
from telemetry.log.local import LocalLog
from telemetry.projections.eta import EtaProjection
from telemetry.runner import ProjectionRunner
from telemetry.tracing import span_id_for
from tests.exporters.otlp_receiver import RECEIVERS, OtlpReceiver, ReceivedSpan
from tests.polling import wait_for as wait_until
from tests.telemetry.log_contract import events_of

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
STEPS = 4
FAIL_AT_STEP = 2
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR
KIND_INTERNAL = 1  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_INTERNAL


@dataclass(frozen=True)
class Recorded:
    """The events of the real tiny jobs, by job."""

    a14b: list[Event]
    failed: list[Event]

    @property
    def all(self) -> list[Event]:
        """Both jobs' events, in log order."""
        return sorted(self.a14b + self.failed, key=lambda e: (e.ts, e.seq))


@pytest.fixture(name="recorded", scope="module")
def _recorded(tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """A queued Wan 2.2 A14B job joining a caller's trace, and a job that fails mid-denoise."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("jobs")
    log = LocalLog(tmp / "log")
    with Emitter(log) as emitter:
        emitter.emit(JobQueued(job="a14b-1", ts=time.time_ns(), model="tiny-t2v-a14b",
                               task="t2v", traceparent=CALLER))
        generate(prepare(GenerationRequest(
            model="tiny-t2v-a14b", prompt="waves at dusk", frames=5, height=32, width=32,
            steps=STEPS, out=str(tmp / "a14b.mp4"), job="a14b-1", traceparent=CALLER)), emitter)
        pipe = build_tiny_pipeline("tiny-t2v")
        calls = {"n": 0}

        def explode(module: Any, args: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2 * FAIL_AT_STEP + 1:  # first of the two CFG passes of the step
                raise RuntimeError("CUDA error: an illegal memory access (simulated)")

        hook = pipe.transformer.register_forward_pre_hook(explode)
        try:
            with pytest.raises(RuntimeError), instrument(pipe, emitter=emitter, job="fail-1",
                                                         model="tiny-t2v"):
                pipe(prompt="a fox", height=32, width=32, num_frames=5,
                     num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                     generator=torch.Generator().manual_seed(1))
        finally:
            hook.remove()
    events = events_of(log.read())
    log.close()
    return Recorded(a14b=[e for e in events if e.job == "a14b-1"],
                    failed=[e for e in events if e.job == "fail-1"])


def by_name(spans: list[Any]) -> dict[str, Any]:
    """Spans by name (names are unique within one job here)."""
    return {span.name: span for span in spans}


def hex_span(span: Any) -> str:
    """A ReadableSpan's span id as 16 hex digits."""
    return format(span.context.span_id, "016x")


def of_type(events: list[Event], kind: type[Event]) -> list[Any]:
    """The events of one type, in order."""
    return [e for e in events if isinstance(e, kind)]


def opened(events: list[Event]) -> int:
    """The ``ts`` of a run's opening event (its JobQueued, else its JobStarted): its ids' key."""
    queued = of_type(events, JobQueued)
    return int((queued or of_type(events, JobStarted))[0].ts)


class TestSpansForJob:
    def test_one_root_and_a_child_per_stage(self, recorded: Recorded) -> None:
        """video.generate is the root; queue.wait and each stage are its children."""
        spans = spans_for_job(recorded.a14b)
        stages = [e.stage for e in of_type(recorded.a14b, StageStarted)]
        assert (["video.generate", "queue.wait"] + [f"stage.{s}" for s in stages]
                == [s.name for s in spans])
        root = spans[0]
        assert [root.context.span_id] * (len(spans) - 1) == [s.parent.span_id for s in spans[1:]]
        assert {CALLER_TRACE} == {format(s.context.trace_id, "032x") for s in spans}
        assert span_id_for("a14b-1", "root", opened(recorded.a14b)) == hex_span(root)
        assert span_id_for("a14b-1", stage_role("denoise", 0),
                           opened(recorded.a14b)) == hex_span(
            by_name(spans)["stage.denoise"])

    def test_the_root_joins_the_callers_span(self, recorded: Recorded) -> None:
        """A valid traceparent makes the caller's span the root's (remote) parent."""
        root = spans_for_job(recorded.a14b)[0]
        assert (CALLER_SPAN, True) == (format(root.parent.span_id, "016x"),
                                       root.parent.is_remote)

    def test_timestamps_are_the_events_ts(self, recorded: Recorded) -> None:
        """Stages run StageStarted.ts → StageEnded.ts; the root JobQueued.ts → JobCompleted.ts."""
        spans = spans_for_job(recorded.a14b)
        starts = of_type(recorded.a14b, StageStarted)
        ends = of_type(recorded.a14b, StageEnded)
        assert ([(s.ts, e.ts) for s, e in zip(starts, ends, strict=True)]
                == [(s.start_time, s.end_time) for s in spans[2:]])
        assert ((recorded.a14b[0].ts, recorded.a14b[-1].ts)
                == (spans[0].start_time, spans[0].end_time))

    def test_root_attributes(self, recorded: Recorded) -> None:
        """Model, variant, task, resolution, frames, steps, device, status and the GenAI names."""
        attributes = spans_for_job(recorded.a14b)[0].attributes
        assert {
            "wantel.model": "tiny-t2v-a14b", "wantel.variant": "tiny-t2v-a14b",
            "wantel.task": "t2v", "wantel.resolution": "32x32", "wantel.frames": 5,
            "wantel.steps": STEPS, "wantel.device": "cpu", "wantel.status": "completed",
            "gen_ai.operation.name": "generate_content",
            "gen_ai.request.model": "tiny-t2v-a14b",
        }.items() <= dict(attributes).items()
        eta_keys = {k for k in attributes if k.startswith("wantel.eta.")}
        assert {"wantel.eta.at_10pct_s", "wantel.eta.at_25pct_s", "wantel.eta.at_50pct_s",
                "wantel.eta.at_50pct_error", "wantel.eta.prior_s",
                "wantel.eta.residual"} <= eta_keys

    def test_residuals_agree_with_the_eta_projection(self, recorded: Recorded) -> None:
        """Per-bucket residuals on the root are the ETA projection's for the same job."""
        projection = EtaProjection()
        state = projection.initial()
        for event in recorded.a14b:
            state = projection.apply(state, event)
        attributes = spans_for_job(recorded.a14b)[0].attributes
        assert state.finished["a14b-1"].residuals == {
            k.removeprefix("wantel.eta.residual."): v for k, v in attributes.items()
            if k.startswith("wantel.eta.residual.")}

    def test_steps_and_the_expert_switch_are_events_of_the_denoise_span(
        self, recorded: Recorded
    ) -> None:
        """One denoise.step event per StepEnded (same ts, same fields) and one expert.switched."""
        denoise = by_name(spans_for_job(recorded.a14b))["stage.denoise"]
        steps = of_type(recorded.a14b, StepEnded)
        (switch,) = of_type(recorded.a14b, ExpertSwitched)
        expected = sorted(
            [("denoise.step", s.ts, s.step, s.expert, s.passes, s.sigma) for s in steps]
            + [("expert.switched", switch.ts, switch.step, switch.to_expert, None, None)],
            key=lambda row: (row[1], row[0] != "expert.switched"))
        actual = [(e.name, e.timestamp, e.attributes["wantel.step"],
                   e.attributes.get("wantel.expert", e.attributes.get("wantel.expert.to")),
                   e.attributes.get("wantel.passes"), e.attributes.get("wantel.sigma"))
                  for e in denoise.events]
        assert sorted(expected, key=lambda r: (r[1], r[0] != "expert.switched")) == sorted(
            actual, key=lambda r: (r[1], r[0] != "expert.switched"))
        assert ["high_noise", "low_noise"] == [switch.from_expert, switch.to_expert]

    def test_the_decodes_pieces_are_events_of_its_span(self, recorded: Recorded) -> None:
        """One decode.piece event per StageProgress, at its ts, saying how many of how many
        (5 frames: 2 latent frames, 2 pieces)."""
        decode = by_name(spans_for_job(recorded.a14b))["stage.decode"]
        pieces = of_type(recorded.a14b, StageProgress)
        assert [("decode.piece", p.ts, p.done, 2) for p in pieces] == [
            (e.name, e.timestamp, e.attributes["wantel.piece"], e.attributes["wantel.pieces"])
            for e in decode.events]
        assert [1, 2] == [p.done for p in pieces]

    def test_a_failed_job_has_an_error_root(self, recorded: Recorded) -> None:
        """JobFailed → root status ERROR with error.type, an exception event, the stage in error."""
        spans = spans_for_job(recorded.failed)
        root, denoise = spans[0], by_name(spans)["stage.denoise"]
        (failed,) = of_type(recorded.failed, JobFailed)
        assert ("ERROR", "RuntimeError", "failed", "denoise", FAIL_AT_STEP) == (
            root.status.status_code.name, root.attributes["error.type"],
            root.attributes["wantel.status"], root.attributes["wantel.failed.stage"],
            root.attributes["wantel.failed.step"])
        assert [("exception", failed.ts)] == [(e.name, e.timestamp) for e in root.events]
        assert "ERROR" == denoise.status.status_code.name
        assert FAIL_AT_STEP == len([e for e in denoise.events if e.name == "denoise.step"])
        assert failed.ts == root.end_time

    def test_rebuilding_gives_the_same_spans(self, recorded: Recorded) -> None:
        """Shuffled and duplicated input gives the same ids, names and times: replay re-exports."""
        noisy = recorded.a14b + recorded.a14b[:10]
        random.Random(3).shuffle(noisy)

        def key(spans: list[Any]) -> list[tuple[Any, ...]]:
            return [(s.name, s.context.span_id, s.start_time, s.end_time, len(s.events))
                    for s in spans]

        assert key(spans_for_job(recorded.a14b)) == key(spans_for_job(noisy))


def folded_eta(events: list[Event], job: str) -> dict[str, Any]:
    """What the ETA projection, folding ``events`` in order, holds for ``job`` just before its
    terminal event: the ETAs it issued, and its estimator as it started."""
    projection = EtaProjection()
    state = projection.initial()
    start = None
    issued: list[Any] = []
    for event in events:
        if event.job == job and isinstance(event, TERMINALS):
            issued = list(state.running[job].issued)
        if type(event) in projection.handles:
            state = projection.apply(state, event)
        if event.job == job and isinstance(event, JobStarted):
            start = state.running[job].live.restart()
    return {"eta_issued": issued, "eta_start": start}


class TestSpanSink:
    @pytest.mark.parametrize("with_eta", [True, False])
    def test_the_spans_are_those_rebuilt_from_the_events(
        self, recorded: Recorded, tmp_path: Path, with_eta: bool
    ) -> None:
        """Through a runner, each job's spans — ETA attributes included, read from the ETA
        projection's state, or computed from the events without it — are spans_for_job's."""
        exporter = InMemorySpanExporter()
        sink = SpanSink(exporter)
        log = make_log(tmp_path / "log", recorded.all)
        projections = [EtaProjection()] if with_eta else []
        ProjectionRunner(log, ProjectionEngine(projections), sinks=[sink]).catch_up()
        exported = exporter.get_finished_spans()
        if with_eta:  # the second job starts from what the first taught the projection
            expected = [span for job in (recorded.a14b, recorded.failed)
                        for span in spans_for_job(job, **folded_eta(recorded.all, job[0].job))]
        else:
            expected = spans_for_job(recorded.a14b) + spans_for_job(recorded.failed)
        # (exported as they end: each stage first, the root at the job's end)
        assert sorted((s.context.span_id, s.name, s.start_time, s.end_time, dict(s.attributes))
                      for s in expected) == sorted(
            (s.context.span_id, s.name, s.start_time, s.end_time, dict(s.attributes))
            for s in exported)
        root = next(s for s in exported if s.name == "video.generate").attributes
        assert {"wantel.eta.prior_s", "wantel.eta.prior_error",
                "wantel.eta.residual"} <= set(root)

    def test_a_late_event_after_the_terminal_opens_no_job(
        self, recorded: Recorded, tmp_path: Path
    ) -> None:
        """A stage that ends after its job's terminal event is no part of the exported trace."""
        late = StageEnded(job="a14b-1", seq=recorded.a14b[-1].seq + 1,
                          ts=recorded.a14b[-1].ts + 1, stage="save", duration_s=0.1)
        sink = SpanSink(InMemorySpanExporter())
        log = make_log(tmp_path / "log", recorded.a14b + [late])
        ProjectionRunner(log, ProjectionEngine([EtaProjection()]), sinks=[sink]).catch_up()
        assert (1, 0) == (sink.stats.jobs_exported, sink.stats.open_jobs)


# -- over the wire ---------------------------------------------------------------------------


@pytest.fixture(name="receiver", params=["http", "grpc"])
def _receiver(request: pytest.FixtureRequest) -> Iterator[OtlpReceiver]:
    """A real OTLP receiver of each protocol, not yet started."""
    receiver = RECEIVERS[request.param]()
    yield receiver
    if receiver.running:
        receiver.stop()


def exporter_for(receiver: OtlpReceiver) -> Any:
    """The real OTLP exporter for ``receiver``, with a short timeout (the collector may be down)."""
    exporter = exporter_from_config(receiver.endpoint, protocol=receiver.protocol, timeout=1.0)
    assert exporter is not None
    return exporter


def make_log(path: Path, events: list[Event]) -> LocalLog:
    """A fresh log holding ``events`` (copied from the recorded real jobs)."""
    log = LocalLog(path)
    if events:
        log.append(events)
    return log


def span_runner(log: LocalLog, exporter: Any, checkpoint: Path,
                **options: Any) -> tuple[ProjectionRunner, SpanSink]:
    """Span export as ``wantel serve`` wires it: a runner with the ETA projection and the sink."""
    sink = SpanSink(exporter)
    runner = ProjectionRunner(log, ProjectionEngine([EtaProjection()]),
                              CheckpointStore(checkpoint), sinks=[sink], **options)
    return runner, sink


def export_pending(runner: ProjectionRunner, sink: SpanSink) -> int:
    """One non-blocking pass over what is stored; how many spans it exported."""
    before = sink.stats.spans_exported
    runner.catch_up()
    return sink.stats.spans_exported - before


def wire_view(span: Any) -> tuple[Any, ...]:
    """What of a ReadableSpan must survive the wire: ids, parent, name, times, events."""
    parent = format(span.parent.span_id, "016x") if span.parent is not None else ""
    return (format(span.context.trace_id, "032x"), hex_span(span), parent, span.name,
            span.start_time, span.end_time,
            [(e.name, e.timestamp, dict(e.attributes)) for e in span.events])


def received_view(span: ReceivedSpan) -> tuple[Any, ...]:
    """The same fields of a received span."""
    return (span.trace_id, span.span_id, span.parent_span_id, span.name, span.start_ns,
            span.end_ns, [(e.name, e.time_ns, e.attributes) for e in span.events])


class TestOtlpExport:
    def test_the_receiver_gets_each_jobs_span_tree(
        self, recorded: Recorded, receiver: OtlpReceiver, tmp_path: Path
    ) -> None:
        """Every span arrives once with its ids, parent, times, attributes and step events."""
        receiver.start()
        log = make_log(tmp_path / "log", recorded.all)
        exporter = exporter_for(receiver)
        runner, sink = span_runner(log, exporter, tmp_path / "otel.ckpt")
        expected = spans_for_job(recorded.a14b) + spans_for_job(recorded.failed)
        assert len(expected) == export_pending(runner, sink)
        received = receiver.spans
        assert sorted(wire_view(s) for s in expected) == sorted(
            received_view(s) for s in received)
        by_id = {s.span_id: s for s in received}
        root = by_id[span_id_for("a14b-1", "root", opened(recorded.a14b))]
        assert dict(expected[0].attributes) == root.attributes
        assert (KIND_INTERNAL, "wantel") == (root.kind, root.resource["service.name"])
        failed_root = by_id[span_id_for("fail-1", "root", opened(recorded.failed))]
        assert (STATUS_ERROR, "RuntimeError") == (
            failed_root.status_code, failed_root.attributes["error.type"])
        exporter.shutdown()

    def test_env_configuration_reaches_the_receiver(
        self, recorded: Recorded, receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT (a base URL) and _PROTOCOL pick the exporter."""
        receiver.start()
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.base_url)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", receiver.protocol)
        exporter = exporter_from_config(None, timeout=2.0)
        assert exporter is not None
        spans = spans_for_job(recorded.failed)
        assert "SUCCESS" == exporter.export(spans).name
        assert len(spans) == len(receiver.wait_for(lambda got: len(got) >= len(spans)))
        exporter.shutdown()


class TestConfig:
    def test_nothing_configured_is_none(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No --otlp and no OTEL_EXPORTER_OTLP_* endpoint: no exporter."""
        assert exporter_from_config(None, environ={}) is None

    def test_sdk_disabled_is_none(self) -> None:
        """OTEL_SDK_DISABLED=true wins over an endpoint."""
        assert exporter_from_config(
            None, environ={"OTEL_SDK_DISABLED": "true",
                           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}) is None

    @pytest.mark.parametrize(("endpoint", "env", "expected"), [
        ("http://jaeger:4318", {}, "http://jaeger:4318/v1/traces"),
        ("http://c:4318/custom", {}, "http://c:4318/custom"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/t",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}, "http://c:9/t"),
    ])
    def test_http_endpoint_resolution(
        self, endpoint: str | None, env: dict[str, str], expected: str
    ) -> None:
        """Base URLs get /v1/traces; a signal-specific URL or an --otlp path is used as is."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = exporter_from_config(endpoint, environ=env)
        assert isinstance(exporter, OTLPSpanExporter)
        assert expected == exporter._endpoint

    @pytest.mark.parametrize(("endpoint", "env"), [
        ("grpc://jaeger:4317", {}),
        ("http://jaeger:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}),
        ("http://jaeger:4317", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
                                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}),
    ])
    def test_grpc_is_chosen_by_scheme_or_protocol(
        self, endpoint: str, env: dict[str, str]
    ) -> None:
        """grpc:// URLs and the protocol variables (traces-specific first) select gRPC."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = exporter_from_config(endpoint, environ=env)
        assert isinstance(exporter, OTLPSpanExporter)
        exporter.shutdown()

    def test_an_unsupported_protocol_fails_early(self) -> None:
        """http/json is refused with a message naming what is supported."""
        with pytest.raises(ValueError, match="http/protobuf, grpc"):
            exporter_from_config("http://c:4318", protocol="http/json")


# -- delivery --------------------------------------------------------------------------------


class TestDelivery:
    def test_collector_down_then_up_sends_every_span_once(
        self, recorded: Recorded, receiver: OtlpReceiver, tmp_path: Path
    ) -> None:
        """Spans wait while the receiver is down and arrive exactly once when it is back."""
        log = make_log(tmp_path / "log", recorded.all)
        exporter = exporter_for(receiver)
        runner, sink = span_runner(log, exporter, tmp_path / "otel.ckpt",
                                   retry_backoff=(0.05, 0.2))
        runner.start()
        try:
            wait_until(lambda: sink.stats.export_failures >= 2)
            assert (0, 0) == (sink.stats.spans_exported, len(receiver.spans))
            receiver.start()
            expected = {hex_span(s) for s in
                        spans_for_job(recorded.a14b) + spans_for_job(recorded.failed)}
            wait_until(lambda: sink.stats.spans_exported == len(expected))
        finally:
            assert runner.stop(timeout=10)
        restarted, restarted_sink = span_runner(log, exporter, tmp_path / "otel.ckpt")
        # the stopped runner's checkpoint covers them
        assert 0 == export_pending(restarted, restarted_sink)
        assert {span_id: 1 for span_id in expected} == dict(receiver.span_counts())
        exporter.shutdown()

    def test_a_restart_resumes_from_the_checkpoint(
        self, recorded: Recorded, receiver: OtlpReceiver, tmp_path: Path
    ) -> None:
        """Open jobs survive a restart; spans unsent at a restart are sent once by the next one."""
        first, failed = recorded.a14b, recorded.failed
        half = len(failed) // 2
        log = make_log(tmp_path / "log", first)
        ckpt = CheckpointStore(tmp_path / "otel.ckpt")
        receiver.start()
        exporter = exporter_for(receiver)
        runner, sink = span_runner(log, exporter, ckpt.path)
        assert len(spans_for_job(first)) == export_pending(runner, sink)
        log.append(failed[:half])
        # fail-1 is open: only the stages that ended are sent, the root waits for its end
        ended_early = spans_for_job(failed[:half], final=False)
        assert ended_early, "the first half of fail-1 ends at least one stage"
        assert len(ended_early) == export_pending(runner, sink)
        assert 1 == sink.stats.open_jobs
        receiver.stop()
        log.append(failed[half:])
        assert 0 == export_pending(runner, sink)  # the receiver is down: fail-1's spans wait
        assert (1, len(spans_for_job(failed)) - len(ended_early)) == (
            sink.stats.export_failures, sink.stats.pending_spans)
        del runner, sink  # a crash or restart here: what it held in memory is gone
        exporter.shutdown()
        receiver.start()
        exporter = exporter_for(receiver)  # a restarted process builds a new exporter
        restarted, restarted_sink = span_runner(log, exporter, ckpt.path)
        assert 1 == restarted_sink.stats.open_jobs
        expected = spans_for_job(first) + spans_for_job(failed)
        assert len(spans_for_job(failed)) - len(ended_early) == export_pending(
            restarted, restarted_sink)
        assert 0 == export_pending(*span_runner(log, exporter, ckpt.path))
        assert {hex_span(s): 1 for s in expected} == dict(receiver.span_counts())
        got = {s.span_id: received_view(s) for s in receiver.spans}
        assert sorted(wire_view(s) for s in expected) == sorted(got.values())
        exporter.shutdown()
