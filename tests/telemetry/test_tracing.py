"""Trace ids come from the caller's traceparent, else deterministically from the job."""

from __future__ import annotations

import pytest

from telemetry.tracing import (
    job_trace_id,
    job_traceparent,
    parse_traceparent,
    span_id_for,
    trace_id_for,
    traceparent_sampled,
)

CALLER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_traceparent_is_joined() -> None:
    """The job's trace is the caller's trace."""
    assert "4bf92f3577b34da6a3ce929d0e0e4736" == trace_id_for("job-1", CALLER)


def test_without_traceparent_the_id_is_derived_and_stable() -> None:
    """The same job always has the same 32-hex trace id; different jobs differ."""
    assert trace_id_for("job-1") == trace_id_for("job-1")
    assert trace_id_for("job-1") != trace_id_for("job-2")
    assert 32 == len(trace_id_for("job-1"))


def test_invalid_traceparents_are_ignored() -> None:
    """Malformed or all-zero ids do not hijack the trace."""
    for bad in ("garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "", None):
        assert parse_traceparent(bad) is None
    assert trace_id_for("j", "garbage") == trace_id_for("j")


def test_span_ids_are_per_role() -> None:
    """Span ids are 16 hex digits, stable per (job, role)."""
    assert span_id_for("j", "root") == span_id_for("j", "root")
    assert span_id_for("j", "root") != span_id_for("j", "stage:decode:0")
    assert 16 == len(span_id_for("j", "root"))


def test_a_jobs_traceparent_is_its_starts_else_its_queueds() -> None:
    """JobStarted's traceparent wins; JobQueued's is used when the start carries none."""
    other = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-00f067aa0ba902b7-01"
    assert "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" == job_trace_id("j", other, CALLER)
    assert "4bf92f3577b34da6a3ce929d0e0e4736" == job_trace_id("j", None, CALLER)
    assert trace_id_for("j") == job_trace_id("j")
    assert job_traceparent(None, None) is None


def test_a_run_key_gives_a_reused_job_id_a_trace_per_run() -> None:
    """Two runs under one job id (opened at different times) have different trace and span
    ids; a run whose opening was lost keeps the job-only ids; a caller's trace id wins."""
    first, second = job_trace_id("j", opened_ts=1), job_trace_id("j", opened_ts=2)
    assert first != second
    assert trace_id_for("j") == job_trace_id("j", opened_ts=None)
    assert span_id_for("j", "root", 1) != span_id_for("j", "root", 2)
    assert "4bf92f3577b34da6a3ce929d0e0e4736" == job_trace_id("j", CALLER, opened_ts=1)


def test_the_callers_sampled_flag_is_read() -> None:
    """Flags 01 sample, 00 do not; a job without (or with a broken) traceparent is sampled."""
    assert traceparent_sampled(CALLER)
    assert not traceparent_sampled(CALLER[:-2] + "00")
    assert traceparent_sampled(CALLER[:-2] + "03")  # other flag bits do not matter
    assert traceparent_sampled(None)
    assert traceparent_sampled("garbage-00")


def test_a_span_id_is_never_all_zeros(monkeypatch: pytest.MonkeyPatch) -> None:
    """A digest whose first 16 hex digits are zeros (invalid in W3C and OTLP) becomes
    ``0000000000000001``; one with a single non-zero digit stays as it is."""
    from telemetry import tracing

    class Digest:
        def __init__(self, text: str) -> None:
            self.text = text

        def hexdigest(self) -> str:
            return self.text

    monkeypatch.setattr(tracing.hashlib, "sha256", lambda data: Digest("0" * 64))
    assert "0000000000000001" == span_id_for("j", "root")
    monkeypatch.setattr(tracing.hashlib, "sha256", lambda data: Digest("0" * 15 + "2" + "0" * 48))
    assert "0000000000000002" == span_id_for("j", "root")
