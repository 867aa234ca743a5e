"""The NVML sampler: absent here (the normal case off a GPU), and driven through a fake pynvml.

The fake module stands in for the GPU: it answers the same functions with the same shapes
(``nvmlMemory_t``-like objects, process entries with ``pid`` / ``usedGpuMemory``, ``NVMLError``
with a ``value``), and a test can make any function fail, or be unsupported, at any moment. The
check against a real device is separate (it needs one).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from inference.nvml import (
    THROTTLE_REASONS,
    GpuSampler,
    NvmlDevice,
    decode_throttle_reasons,
    visible_devices,
)
from telemetry.emitter import Emitter
from telemetry.events import Event, GpuSampled, MemorySampled, stream_of_worker
from telemetry.log.memory import MemoryLog
from tests.polling import wait_for

from ..telemetry.log_contract import events_of

GIB = 1 << 30
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15


# -- the fake pynvml -----------------------------------------------------------------------


class NVMLError(Exception):
    """Like ``pynvml.NVMLError``: the NVML return code is ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    """What one fake device reports."""

    pci: tuple[int, int, int]
    uuid: str
    used: int
    total: int
    processes: list[tuple[int, int | None]]  # (pid, usedGpuMemory)
    gpu_percent: int
    temperature: int
    power_mw: int
    reasons: int


@dataclass
class FakeNvml:
    """State behind the fake module: devices, calls made, and failures to inject."""

    gpus: list[FakeGpu]
    init_error: int | None = None
    fail: dict[str, int] = field(default_factory=dict)  # function -> NVML error code
    calls: dict[str, int] = field(default_factory=dict)
    initialised: int = 0

    def module(self, *, events_api: bool = True) -> types.ModuleType:
        """A module object with pynvml's names, answering from this state."""
        fake = types.ModuleType("pynvml")
        handles = [object() for _ in self.gpus]

        def gpu(handle: object) -> FakeGpu:
            return self.gpus[handles.index(handle)]

        def api(name: str, fn: Callable[..., Any]) -> None:
            def call(*args: Any) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                if name in self.fail:
                    raise NVMLError(self.fail[name])
                return fn(*args)

            setattr(fake, name, call)

        def init() -> None:
            if self.init_error is not None:
                raise NVMLError(self.init_error)
            self.initialised += 1

        def shutdown() -> None:
            self.initialised -= 1

        api("nvmlInit", init)
        api("nvmlShutdown", shutdown)
        api("nvmlDeviceGetCount", lambda: len(self.gpus))
        api("nvmlDeviceGetHandleByIndex", lambda i: handles[i])
        api("nvmlDeviceGetPciInfo", lambda h: types.SimpleNamespace(
            domain=gpu(h).pci[0], bus=gpu(h).pci[1], device=gpu(h).pci[2]))
        api("nvmlDeviceGetUUID", lambda h: gpu(h).uuid)
        api("nvmlDeviceGetMemoryInfo", lambda h: types.SimpleNamespace(
            used=gpu(h).used, total=gpu(h).total, free=gpu(h).total - gpu(h).used))
        api("nvmlDeviceGetComputeRunningProcesses", lambda h: [
            types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu(h).processes])
        api("nvmlDeviceGetUtilizationRates", lambda h: types.SimpleNamespace(
            gpu=gpu(h).gpu_percent, memory=0))
        api("nvmlDeviceGetTemperature", lambda h, sensor: gpu(h).temperature)
        api("nvmlDeviceGetPowerUsage", lambda h: gpu(h).power_mw)
        api("nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: gpu(h).reasons)
        if events_api:
            api("nvmlDeviceGetCurrentClocksEventReasons", lambda h: gpu(h).reasons)
        fake.NVMLError = NVMLError  # type: ignore[attr-defined]
        fake.NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED  # type: ignore[attr-defined]
        fake.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
        return fake


def two_gpus() -> FakeNvml:
    """NVML index 0 sits at the higher PCI bus, so index order and PCI order differ."""
    me = os.getpid()
    return FakeNvml(gpus=[
        FakeGpu(pci=(0, 0x41, 0), uuid="GPU-bbbb-2222", used=3 * GIB, total=80 * GIB,
                processes=[(me + 1, 2 * GIB)], gpu_percent=12, temperature=40,
                power_mw=90_000, reasons=0x1),
        FakeGpu(pci=(0, 0x1B, 0), uuid="GPU-aaaa-1111", used=20 * GIB, total=80 * GIB,
                processes=[(me, 17 * GIB), (me + 1, GIB)], gpu_percent=97, temperature=71,
                power_mw=612_345, reasons=0x4 | 0x40),
    ])


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """A fake pynvml with two devices, installed as the ``pynvml`` module; no torch CUDA."""
    state = two_gpus()
    monkeypatch.setitem(sys.modules, "pynvml", state.module())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return state


@pytest.fixture
def emitter() -> Iterator[Emitter]:
    """A real emitter into an in-memory log."""
    with Emitter(MemoryLog(), worker="w1", flush_interval=0.005) as instance:
        yield instance


def logged(emitter: Emitter) -> list[Event]:
    """Everything the emitter appended so far."""
    assert emitter.flush(10)
    return events_of(emitter.log.read())


def gpu_events(emitter: Emitter) -> list[GpuSampled | MemorySampled]:
    return [e for e in logged(emitter) if isinstance(e, GpuSampled | MemorySampled)]


# -- decoding ------------------------------------------------------------------------------


def test_decode_throttle_reasons() -> None:
    assert () == decode_throttle_reasons(0)
    assert ("gpu_idle",) == decode_throttle_reasons(0x1)
    assert ("sw_power_cap", "hw_thermal_slowdown") == decode_throttle_reasons(0x4 | 0x40)
    assert (
        "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
        "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown",
        "display_clock_setting",
    ) == decode_throttle_reasons(0x1FF)
    assert ("hw_slowdown", "unknown_0x800", "unknown_0x10000") == decode_throttle_reasons(
        0x8 | 0x800 | 0x10000)
    bits = [bit for bit, _ in THROTTLE_REASONS]
    assert bits == [1 << i for i in range(len(bits))]  # one name per bit, none skipped


# -- naming --------------------------------------------------------------------------------


def nvml_devices() -> list[NvmlDevice]:
    return [NvmlDevice(0, (0, 0x41, 0), "h0"), NvmlDevice(1, (0, 0x1B, 0), "h1"),
            NvmlDevice(2, (1, 0x05, 0), "h2")]


def named(mapped: list[Any]) -> list[tuple[str, object]]:
    return [(d.name, d.device.handle) for d in mapped]


def test_torch_order_wins_by_pci_address() -> None:
    torch_order = [(1, 0x05, 0), (0, 0x41, 0)]  # what torch enumerates after its own rules
    mapped = visible_devices(nvml_devices(), cuda_pci=torch_order, cuda_visible="0,2")
    assert [("cuda:0", "h2"), ("cuda:1", "h0")] == named(mapped)


def test_without_torch_cuda_devices_follow_pci_order_and_visible_devices() -> None:
    uuids = {"h0": "GPU-bbbb", "h1": "GPU-aaaa", "h2": "GPU-cccc"}

    def visible(value: str | None) -> list[tuple[str, object]]:
        return named(visible_devices(nvml_devices(), cuda_pci=None, cuda_visible=value,
                                     uuid_of=lambda d: uuids[d.handle]))

    assert [("cuda:0", "h1"), ("cuda:1", "h0"), ("cuda:2", "h2")] == visible(None)
    assert [("cuda:0", "h2"), ("cuda:1", "h1")] == visible("2, 0")
    assert [("cuda:0", "h0")] == visible("GPU-bb")
    assert [] == visible("")
    assert [] == visible("-1")
    # the CUDA runtime stops at the first invalid entry: out of range, repeated, MIG, unknown
    assert [("cuda:0", "h1")] == visible("0,7,1")
    assert [("cuda:0", "h1")] == visible("0,0,1")
    assert [("cuda:0", "h0")] == visible("1,MIG-0123,2")
    assert [] == visible("GPU-ffff,0")


# -- absence -------------------------------------------------------------------------------


def test_absent_here_is_a_quiet_no_op() -> None:
    """The real import on this machine: no driver, so ``nvmlInit`` fails (or no pynvml)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine; the absence path needs a GPU-less one")
    log = MemoryLog()
    with Emitter(log, worker="w1") as emitter, capture_logs() as logs:
        sampler = GpuSampler(emitter, interval=0.01)
        assert sampler.available is False
        assert sampler.available is False  # detected once
        sampler.start()
        assert sampler.sample_once() == 0
        sampler.stop()
        assert () == sampler.devices
        assert {} == sampler.errors
        assert emitter.flush(5)
    assert [] == [e for e in events_of(log.read()) if isinstance(e, GpuSampled | MemorySampled)]
    notices = [entry for entry in logs if entry["event"] == "NVML not available; GPU sampling off"]
    assert 1 == len(notices)
    assert "info" == notices[0]["log_level"]


def test_missing_module_and_failing_init_are_the_same_no_op(
        monkeypatch: pytest.MonkeyPatch, emitter: Emitter) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with capture_logs() as logs, GpuSampler(emitter) as sampler:
        assert not sampler.available
    assert ["info"] == [e["log_level"] for e in logs]

    state = two_gpus()
    state.init_error = 9  # NVML_ERROR_DRIVER_NOT_LOADED
    monkeypatch.setitem(sys.modules, "pynvml", state.module())
    with capture_logs() as logs, GpuSampler(emitter) as sampler:
        assert not sampler.available
    assert 1 == state.calls["nvmlInit"]
    assert ["NVML not available; GPU sampling off"] == [e["event"] for e in logs]
    assert [] == gpu_events(emitter)


def test_no_device_or_failed_enumeration_is_a_no_op_too(
        monkeypatch: pytest.MonkeyPatch, emitter: Emitter) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for state in (FakeNvml(gpus=[]), two_gpus()):
        if state.gpus:
            state.fail["nvmlDeviceGetPciInfo"] = 999  # NVML_ERROR_UNKNOWN
        monkeypatch.setitem(sys.modules, "pynvml", state.module())
        with capture_logs() as logs, GpuSampler(emitter) as sampler:
            assert not sampler.available
            assert 0 == sampler.sample_once()
        assert ["NVML not available; GPU sampling off"] == [e["event"] for e in logs]
        assert 0 == state.initialised  # initialised, then shut down again
    assert [] == gpu_events(emitter)


# -- sampling through the fake ---------------------------------------------------------------


def test_one_round_reads_every_device(nvml: FakeNvml, emitter: Emitter) -> None:
    sampler = GpuSampler(emitter, worker="w1", clock_ns=lambda: 1234)
    assert sampler.available
    assert ("cuda:0", "cuda:1") == sampler.devices
    assert 4 == sampler.sample_once()
    events = gpu_events(emitter)
    gpu = {e.device: e for e in events if isinstance(e, GpuSampled)}
    memory = {e.device: e for e in events if isinstance(e, MemorySampled)}
    # cuda:0 is the lower PCI bus, i.e. NVML index 1
    assert GpuSampled(job="worker/w1", seq=gpu["cuda:0"].seq, ts=1234, worker="w1",
                      device="cuda:0", gpu=1, uuid="GPU-aaaa-1111",  # NVML's index and id
                      utilization_ratio=0.97, temperature_celsius=71.0,
                      power_watts=612.345,
                      throttle_reasons=("sw_power_cap", "hw_thermal_slowdown")) == gpu["cuda:0"]
    assert (0.12, 40.0, 90.0, ("gpu_idle",)) == (
        gpu["cuda:1"].utilization_ratio, gpu["cuda:1"].temperature_celsius,
        gpu["cuda:1"].power_watts, gpu["cuda:1"].throttle_reasons)
    assert (20 * GIB, 80 * GIB, 17 * GIB) == (
        memory["cuda:0"].device_used_bytes, memory["cuda:0"].device_total_bytes,
        memory["cuda:0"].process_device_bytes)
    # this process has no context on the other device: unknown, not zero
    assert (3 * GIB, None) == (memory["cuda:1"].device_used_bytes,
                               memory["cuda:1"].process_device_bytes)
    assert memory["cuda:0"].allocated_bytes is None  # the allocator's fields are not NVML's
    assert {stream_of_worker("w1")} == {e.job for e in events}
    assert {} == sampler.errors
    sampler.stop()
    assert 0 == nvml.initialised  # nvmlShutdown balanced nvmlInit


def test_visible_devices_restrict_and_rename(nvml: FakeNvml, emitter: Emitter,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    sampler = GpuSampler(emitter)
    assert ("cuda:0",) == sampler.devices
    sampler.sample_once()
    [memory] = [e for e in gpu_events(emitter) if isinstance(e, MemorySampled)]
    assert ("cuda:0", 3 * GIB) == (memory.device, memory.device_used_bytes)  # PCI bus 0x41
    sampler.stop()


def test_torch_cuda_order_is_used_when_torch_has_cuda(nvml: FakeNvml, emitter: Emitter,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    props = {0: (0, 0x41, 0), 1: (0, 0x1B, 0)}  # torch puts bus 0x41 first (fastest first)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(
        pci_domain_id=props[i][0], pci_bus_id=props[i][1], pci_device_id=props[i][2]))
    sampler = GpuSampler(emitter)
    sampler.sample_once()
    memory = {e.device: e.device_used_bytes for e in gpu_events(emitter)
              if isinstance(e, MemorySampled)}
    assert {"cuda:0": 3 * GIB, "cuda:1": 20 * GIB} == memory
    sampler.stop()


def test_job_of_picks_the_stream(nvml: FakeNvml, emitter: Emitter) -> None:
    current: list[str | None] = ["job-1"]

    def job_of() -> str | None:
        if current[0] == "boom":
            raise RuntimeError("job_of broke")
        return current[0]

    sampler = GpuSampler(emitter, worker="w1", job_of=job_of)
    sampler.sample_once()
    current[0] = None
    sampler.sample_once()
    current[0] = "boom"
    sampler.sample_once()
    jobs = [e.job for e in gpu_events(emitter)]
    assert ["job-1"] * 4 + ["worker/w1"] * 8 == jobs
    assert {"job_of": 1} == sampler.errors
    stream = [e.seq for e in logged(emitter) if e.job == "worker/w1"]  # heartbeats share it
    assert list(range(len(stream))) == stream
    sampler.stop()


def test_unsupported_queries_leave_fields_empty_and_are_not_asked_again(
        nvml: FakeNvml, emitter: Emitter) -> None:
    nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = NVML_ERROR_NOT_SUPPORTED
    nvml.fail["nvmlDeviceGetPowerUsage"] = NVML_ERROR_NOT_SUPPORTED
    sampler = GpuSampler(emitter)
    for _ in range(3):
        sampler.sample_once()
    events = gpu_events(emitter)
    assert all(e.process_device_bytes is None for e in events if isinstance(e, MemorySampled))
    assert all(e.power_watts is None for e in events if isinstance(e, GpuSampled))
    assert all(e.utilization_ratio is not None for e in events if isinstance(e, GpuSampled))
    assert 2 == nvml.calls["nvmlDeviceGetComputeRunningProcesses"]  # once per device
    assert 2 == nvml.calls["nvmlDeviceGetPowerUsage"]
    assert {} == sampler.errors  # not supported is not a failure
    sampler.stop()


def test_old_drivers_use_the_throttle_reasons_function(
        monkeypatch: pytest.MonkeyPatch, emitter: Emitter) -> None:
    state = two_gpus()
    monkeypatch.setitem(sys.modules, "pynvml", state.module(events_api=False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sampler = GpuSampler(emitter)
    sampler.sample_once()
    reasons = [e.throttle_reasons for e in gpu_events(emitter) if isinstance(e, GpuSampled)]
    assert [("sw_power_cap", "hw_thermal_slowdown"), ("gpu_idle",)] == reasons
    sampler.stop()

    # a pynvml with the new name on a driver without it: NVML says "function not found"
    state = two_gpus()
    state.fail["nvmlDeviceGetCurrentClocksEventReasons"] = NVML_ERROR_FUNCTION_NOT_FOUND
    monkeypatch.setitem(sys.modules, "pynvml", state.module())
    sampler = GpuSampler(emitter)
    sampler.sample_once()
    sampler.sample_once()
    assert 1 == state.calls["nvmlDeviceGetCurrentClocksEventReasons"]
    assert 4 == state.calls["nvmlDeviceGetCurrentClocksThrottleReasons"]
    assert {} == sampler.errors
    sampler.stop()


# -- the thread ----------------------------------------------------------------------------


def test_thread_samples_into_the_log_and_survives_failing_calls(
        nvml: FakeNvml, emitter: Emitter) -> None:
    with capture_logs() as logs:
        sampler = GpuSampler(emitter, interval=0.01, worker="w1")
        with sampler:
            wait_for(lambda: sampler.ticks >= 3)
            wait_for(lambda: sum(isinstance(e, GpuSampled) for e in gpu_events(emitter)) >= 6)
            nvml.fail["nvmlDeviceGetPowerUsage"] = NVML_ERROR_GPU_IS_LOST  # starts failing
            wait_for(lambda: sampler.errors.get("nvmlDeviceGetPowerUsage", 0) >= 6)
            later = sampler.ticks
            wait_for(lambda: sampler.ticks >= later + 3)  # still running
            del nvml.fail["nvmlDeviceGetPowerUsage"]
            wait_for(lambda: [e for e in gpu_events(emitter)
                              if isinstance(e, GpuSampled)][-1].power_watts is not None)
        assert sampler._thread is not None
        assert not sampler._thread.is_alive()
    events = [e for e in gpu_events(emitter) if isinstance(e, GpuSampled)]
    powers = [e.power_watts for e in events]
    assert None in powers
    assert powers[0] is not None
    assert powers[-1] is not None
    assert all(e.temperature_celsius is not None for e in events)  # other fields unaffected
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert 1 == len(warnings)  # logged once, counted after
    assert "nvmlDeviceGetPowerUsage" == warnings[0]["function"]
    assert 0 == nvml.initialised


def test_an_unexpected_error_is_counted_and_the_thread_goes_on(
        nvml: FakeNvml, emitter: Emitter, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = {"on": True}
    module = sys.modules["pynvml"]
    real = module.nvmlDeviceGetMemoryInfo

    def memory_info(handle: object) -> Any:
        return object() if broken["on"] else real(handle)  # no .used: a bug, not an NVML error

    monkeypatch.setattr(module, "nvmlDeviceGetMemoryInfo", memory_info)
    with GpuSampler(emitter, interval=0.01) as sampler:
        wait_for(lambda: sampler.errors.get("sampler", 0) >= 3)
        broken["on"] = False
        wait_for(lambda: any(isinstance(e, MemorySampled) for e in gpu_events(emitter)))
        assert sampler._thread is not None
        assert sampler._thread.is_alive()


def test_start_and_stop_are_idempotent(nvml: FakeNvml, emitter: Emitter) -> None:
    sampler = GpuSampler(emitter, interval=0.01)
    sampler.start()
    thread = sampler._thread
    sampler.start()
    assert thread is sampler._thread
    sampler.stop()
    sampler.stop()
    sampler.start()  # a stopped sampler stays stopped
    assert thread is sampler._thread
    assert 0 == nvml.initialised
    with pytest.raises(ValueError, match="interval"):
        GpuSampler(emitter, interval=0)
