"""Device-wide GPU readings from NVML, sampled on a thread of their own.

The torch allocator counters read at each step (:mod:`inference.memory`) say what *this process's
allocator* holds; they cannot say how full the device is, how busy it is, how hot it runs or why
its clocks are held down. NVML can, at a cost of tens to hundreds of microseconds a query, which
is why these readings come from a :class:`GpuSampler` thread every ``interval`` seconds and never
from the inference thread::

    with GpuSampler(emitter, interval=1.0, job_of=lambda: runner.current_job):
        ...                                   # GpuSampled + MemorySampled per device per tick

Each tick emits, per visible device, a ``GpuSampled`` (utilisation as a ratio, temperature,
power in watts, the decoded clock-event/throttle reasons) and a ``MemorySampled`` with the
device-wide ``device_used_bytes`` / ``device_total_bytes`` and this process's
``process_device_bytes``. Events go to ``job_of()`` (the job running now) or, between jobs, to
the worker's own stream (:func:`~telemetry.events.stream_of_worker`).

Device names. Events call a device ``cuda:N`` with torch's index ``N``, so NVML readings line up
with the allocator readings of the same device. NVML numbers devices its own way (all of them,
ignoring ``CUDA_VISIBLE_DEVICES``), and CUDA numbers them fastest-first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so indexes cannot be compared directly:

* when ``torch.cuda.is_available()``, each torch device ``i`` is matched to the NVML device with
  the same PCI domain/bus/device (``torch.cuda.get_device_properties(i).pci_*_id``). torch has
  already applied ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``, so this is exact. (Reading
  the properties initialises CUDA in this process; a process that samples a GPU uses it anyway.)
  MIG instances share their parent's PCI address: they are reported as the whole parent GPU.
* otherwise (torch without CUDA, e.g. a CPU build beside a GPU) the mapping is computed from
  ``CUDA_VISIBLE_DEVICES`` alone, **assuming ``CUDA_DEVICE_ORDER=PCI_BUS_ID``**: NVML devices are
  sorted by PCI address, integer entries index that order, ``GPU-…`` entries match a device UUID
  by prefix, and parsing stops at the first entry that matches nothing (a ``MIG-…`` entry, an
  out-of-range or repeated index), as the CUDA runtime does. Unset means every device; empty
  means none.

Absence is normal. Without NVML (``pynvml`` not installed — it is the ``gpu`` extra — or
``nvmlInit`` failing because there is no driver) the sampler says so once, at info level, and is
a no-op whose :attr:`GpuSampler.available` is False. A query that fails while running is counted
per NVML function (:attr:`GpuSampler.errors`) and logged once per function and error; a query the
device does not support (``NVML_ERROR_NOT_SUPPORTED``) leaves its field ``None`` and is not asked
again. Nothing here raises into the caller, and the thread does not die on an error.

``process_device_bytes`` is this process's entry in ``nvmlDeviceGetComputeRunningProcesses``,
matched by pid; it is ``None`` when NVML does not list the pid — which includes a process that has
no context on that device, and a container whose pid namespace hides the host pid NVML reports.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final

import structlog

from telemetry.emitter import Emitter
from telemetry.events import GpuSampled, MemorySampled, stream_of_worker

_log = structlog.get_logger("wantel.nvml")

#: NVML clock-event (formerly "clocks throttle") reason bits and the names events carry. The bit
#: values are part of NVML's ABI (``nvmlClocksEventReason*`` in nvml.h); the last two exist only
#: as ``nvmlClocksThrottleReason*`` constants of nvidia-ml-py.
THROTTLE_REASONS: Final[tuple[tuple[int, str], ...]] = (
    (0x0000_0001, "gpu_idle"),
    (0x0000_0002, "applications_clocks_setting"),
    (0x0000_0004, "sw_power_cap"),
    (0x0000_0008, "hw_slowdown"),
    (0x0000_0010, "sync_boost"),
    (0x0000_0020, "sw_thermal_slowdown"),
    (0x0000_0040, "hw_thermal_slowdown"),
    (0x0000_0080, "hw_power_brake_slowdown"),
    (0x0000_0100, "display_clock_setting"),
    (0x0000_0200, "board_limit"),
    (0x0000_0400, "reliability"),
)
_KNOWN_BITS: Final = sum(bit for bit, _ in THROTTLE_REASONS)

# NVML return codes (nvml.h); read from the module when it has them.
_NVML_ERROR_NOT_SUPPORTED: Final = 3
_NVML_ERROR_FUNCTION_NOT_FOUND: Final = 13
_NVML_TEMPERATURE_GPU: Final = 0

PciAddress = tuple[int, int, int]  # (domain, bus, device)


def decode_throttle_reasons(mask: int) -> tuple[str, ...]:
    """Names of the reasons set in an NVML clock-event bitmask, in bit order.

    Bits NVML may add later come out as ``unknown_0x…`` rather than being dropped. ``0`` (no
    reason: the clocks run as fast as they can) is the empty tuple.
    """
    names = [name for bit, name in THROTTLE_REASONS if mask & bit]
    rest = mask & ~_KNOWN_BITS
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"unknown_{bit:#x}")
            rest &= ~bit
        bit <<= 1
    return tuple(names)


@dataclass(frozen=True)
class NvmlDevice:
    """One physical device as NVML enumerates it."""

    nvml_index: int
    pci: PciAddress
    handle: Any


@dataclass(frozen=True)
class SampledDevice:
    """A device the sampler reads, under its torch name."""

    name: str  # "cuda:N"
    device: NvmlDevice
    #: NVML's ``GPU-…`` id (DCGM exporter's ``UUID`` label), where NVML gives one.
    uuid: str | None = None


def visible_devices(
    devices: Sequence[NvmlDevice],
    *,
    cuda_pci: Sequence[PciAddress] | None,
    cuda_visible: str | None,
    uuid_of: Callable[[NvmlDevice], str | None] = lambda _: None,
) -> list[SampledDevice]:
    """Name NVML devices ``cuda:N`` in torch's order (see the module notes for the rules).

    ``cuda_pci`` is torch's PCI address per device index when torch has CUDA (exact); otherwise
    ``cuda_visible`` (the ``CUDA_VISIBLE_DEVICES`` value, ``None`` when unset) is applied to the
    devices in PCI order, i.e. assuming ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
    """
    if cuda_pci is not None:
        by_pci = {device.pci: device for device in devices}
        return [SampledDevice(f"cuda:{index}", by_pci[pci])
                for index, pci in enumerate(cuda_pci) if pci in by_pci]
    ordered = sorted(devices, key=lambda device: device.pci)
    if cuda_visible is None:
        chosen = ordered
    else:
        chosen = []
        for raw in cuda_visible.split(","):
            entry = raw.strip()
            match = _match_visible_entry(entry, ordered, uuid_of)
            if match is None or match in chosen:
                break  # the CUDA runtime ignores everything from the first invalid entry
            chosen.append(match)
    return [SampledDevice(f"cuda:{index}", device) for index, device in enumerate(chosen)]


def _match_visible_entry(entry: str, ordered: Sequence[NvmlDevice],
                         uuid_of: Callable[[NvmlDevice], str | None]) -> NvmlDevice | None:
    if entry.isdigit():
        index = int(entry)
        return ordered[index] if index < len(ordered) else None
    if entry.upper().startswith("GPU-") and len(entry) > 4:
        prefix = entry.lower()
        matches = [d for d in ordered if (uuid_of(d) or "").lower().startswith(prefix)]
        return matches[0] if len(matches) == 1 else None
    return None  # "MIG-…", negative or malformed entries


def _torch_cuda_pci() -> list[PciAddress] | None:
    """torch's PCI address per CUDA device index, or ``None`` when torch has no usable CUDA."""
    try:
        torch = sys.modules.get("torch") or importlib.import_module("torch")
        if not torch.cuda.is_available():
            return None
        addresses = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            addresses.append((int(props.pci_domain_id), int(props.pci_bus_id),
                              int(props.pci_device_id)))
        return addresses
    except Exception as exc:  # no torch, a broken driver, a torch without the pci fields
        _log.info("torch CUDA device order unavailable; naming GPUs from CUDA_VISIBLE_DEVICES",
                  reason=f"{type(exc).__name__}: {exc}")
        return None


class GpuSampler:
    """Samples every visible NVIDIA device each ``interval`` seconds into ``emitter``.

    ``job_of`` returns the id of the job running now, or ``None`` between jobs (it is called on
    the sampler's thread, so it must be cheap and thread-safe: reading an attribute is). A
    sample filed under a job that just ended is harmless: the emitter continues a finished
    stream's ``seq`` for late events.
    ``worker`` names the stream between jobs and the events' ``worker`` field (default: the
    emitter's worker). Call :meth:`start` / :meth:`stop`, or use it as a context manager.
    """

    def __init__(
        self,
        emitter: Emitter,
        *,
        interval: float = 1.0,
        job_of: Callable[[], str | None] | None = None,
        worker: str | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        pid: int | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.emitter = emitter
        self.interval = interval
        self.job_of = job_of
        self.worker = worker or emitter.worker
        self._clock_ns = clock_ns
        self._pid = os.getpid() if pid is None else pid
        self._nvml: Any = None
        self._devices: list[SampledDevice] = []
        self._probed = False
        self._initialised = False
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._errors: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._unsupported: set[tuple[str, str]] = set()
        self._throttle_fn = "nvmlDeviceGetCurrentClocksEventReasons"
        self._ticks = 0

    # -- detection ------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """True when NVML works here and at least one visible device can be sampled."""
        self._probe()
        return bool(self._devices)

    @property
    def devices(self) -> tuple[str, ...]:
        """The names of the devices sampled (``cuda:0``, …); empty without NVML."""
        self._probe()
        return tuple(device.name for device in self._devices)

    @property
    def errors(self) -> dict[str, int]:
        """Failed NVML queries so far, per NVML function (``sampler`` for anything else)."""
        return dict(self._errors)

    @property
    def ticks(self) -> int:
        """How many sampling rounds have run."""
        return self._ticks

    def _probe(self) -> None:
        """Import and initialise NVML and map its devices to torch names, once."""
        with self._lock:
            if self._probed:
                return
            self._probed = True
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                _log.info("NVML not available; GPU sampling off", reason=str(exc))
                return
            try:
                nvml.nvmlInit()
            except Exception as exc:
                _log.info("NVML not available; GPU sampling off",
                          reason=f"{type(exc).__name__}: {exc}")
                return
            self._nvml = nvml
            self._initialised = True
            reason = "no visible device"
            try:
                self._devices = self._map_devices(nvml)
            except Exception as exc:
                reason = f"devices could not be enumerated: {type(exc).__name__}: {exc}"
                self._devices = []
            if not self._devices:
                self._shutdown()
                _log.info("NVML not available; GPU sampling off", reason=reason)
                return
            if not hasattr(nvml, self._throttle_fn):
                self._throttle_fn = "nvmlDeviceGetCurrentClocksThrottleReasons"
            _log.debug("NVML GPU sampling on", devices=[d.name for d in self._devices])

    def _map_devices(self, nvml: Any) -> list[SampledDevice]:
        devices = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            pci = nvml.nvmlDeviceGetPciInfo(handle)
            devices.append(NvmlDevice(index, (int(pci.domain), int(pci.bus), int(pci.device)),
                                      handle))
        cuda_pci = _torch_cuda_pci()

        def uuid_of(device: NvmlDevice) -> str | None:
            try:
                uuid = nvml.nvmlDeviceGetUUID(device.handle)
            except Exception:
                return None
            return uuid.decode() if isinstance(uuid, bytes) else str(uuid)

        mapped = [replace(sampled, uuid=uuid_of(sampled.device)) for sampled in visible_devices(
            devices, cuda_pci=cuda_pci, cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
            uuid_of=uuid_of)]
        if cuda_pci is not None and len(mapped) < len(cuda_pci):
            _log.info("some CUDA devices have no NVML counterpart and are not sampled",
                      cuda_devices=len(cuda_pci), sampled=len(mapped))
        return mapped

    def _shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            self._failed("nvmlShutdown", "", exc)

    # -- control --------------------------------------------------------------------------

    def start(self) -> GpuSampler:
        """Start sampling (a no-op without NVML, when running, or once stopped)."""
        if not self.available or self._thread is not None or self._stopped:
            return self
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name="wantel-gpu-sampler",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop and join the thread (within ``timeout``, default a few intervals), release NVML.

        A stopped sampler stays stopped: make a new one to sample again.
        """
        self._stopped = True
        self._stop_event.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout if timeout is not None else max(5.0, 3 * self.interval))
            if thread.is_alive():  # an NVML call hung (a lost GPU): leave it, as a daemon
                _log.warning("GPU sampler thread did not stop in time; left running")
                return
        with self._lock:
            self._shutdown()

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            next_at = time.monotonic()
            while not self._stop_event.is_set():
                try:
                    self.sample_once()
                except Exception as exc:  # a bug or an emitter surprise: count, keep going
                    self._failed("sampler", "", exc)
                next_at += self.interval
                delay = next_at - time.monotonic()
                if delay < 0:  # a slow round: skip the missed ticks rather than bunch them
                    next_at = time.monotonic()
                    delay = 0.0
                if self._stop_event.wait(delay):
                    break
        except BaseException as exc:  # never die silently
            _log.error("GPU sampler thread stopped", error=f"{type(exc).__name__}: {exc}")
            raise

    def sample_once(self) -> int:
        """Read every device now and emit its events; returns how many were emitted."""
        self._probe()
        if not self._devices or not self._initialised:
            return 0
        ts = self._clock_ns()
        job = self._current_job()
        emitted = 0
        for sampled in self._devices:
            for event in self._read(sampled, job, ts):
                self.emitter.emit(event)
                emitted += 1
        self._ticks += 1
        return emitted

    def _current_job(self) -> str:
        job: str | None = None
        if self.job_of is not None:
            try:
                job = self.job_of()
            except Exception as exc:
                self._failed("job_of", "", exc)
        return job or stream_of_worker(self.worker)

    def _read(self, sampled: SampledDevice, job: str,
              ts: int) -> list[GpuSampled | MemorySampled]:
        nvml, name, handle = self._nvml, sampled.name, sampled.device.handle
        used = total = process = None
        memory = self._query("nvmlDeviceGetMemoryInfo", name, handle)
        if memory is not None:
            used, total = int(memory.used), int(memory.total)
        processes = self._query("nvmlDeviceGetComputeRunningProcesses", name, handle)
        if processes is not None:
            mine = [p.usedGpuMemory for p in processes
                    if p.pid == self._pid and p.usedGpuMemory is not None]
            process = sum(int(b) for b in mine) if mine else None
        rates = self._query("nvmlDeviceGetUtilizationRates", name, handle)
        utilization = float(rates.gpu) / 100.0 if rates is not None else None
        temperature = self._query("nvmlDeviceGetTemperature", name, handle,
                                  getattr(nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU))
        power_mw = self._query("nvmlDeviceGetPowerUsage", name, handle)
        mask = self._throttle_mask(name, handle)

        events: list[GpuSampled | MemorySampled] = []
        reasons = decode_throttle_reasons(int(mask)) if mask is not None else ()
        if (utilization, temperature, power_mw) != (None, None, None) or mask is not None:
            events.append(GpuSampled(
                job=job, ts=ts, worker=self.worker, device=name,
                gpu=sampled.device.nvml_index, uuid=sampled.uuid,
                utilization_ratio=utilization,
                temperature_celsius=float(temperature) if temperature is not None else None,
                power_watts=float(power_mw) / 1000.0 if power_mw is not None else None,
                throttle_reasons=reasons))
        if (used, total, process) != (None, None, None):
            events.append(MemorySampled(
                job=job, ts=ts, worker=self.worker, device=name, device_used_bytes=used,
                device_total_bytes=total, process_device_bytes=process))
        return events

    def _throttle_mask(self, name: str, handle: Any) -> Any:
        """The clock-event reasons, falling back to the pre-R535 "throttle" function."""
        function = self._throttle_fn
        if (function, name) in self._unsupported:
            return None
        try:
            return getattr(self._nvml, function)(handle)
        except Exception as exc:
            fallback = "nvmlDeviceGetCurrentClocksThrottleReasons"
            if (function != fallback and _error_code(exc) == _NVML_ERROR_FUNCTION_NOT_FOUND
                    and hasattr(self._nvml, fallback)):
                self._throttle_fn = fallback  # a driver older than the "clocks event" names
                return self._query(fallback, name, handle)
            self._failed(function, name, exc)
            return None

    def _query(self, function: str, device: str, *args: Any) -> Any:
        """``pynvml.<function>(*args)``, or ``None`` when it fails (counted, logged once)."""
        if (function, device) in self._unsupported:
            return None
        try:
            return getattr(self._nvml, function)(*args)
        except Exception as exc:
            self._failed(function, device, exc)
            return None

    def _failed(self, function: str, device: str, exc: BaseException) -> None:
        code = _error_code(exc)
        not_supported = code == getattr(self._nvml, "NVML_ERROR_NOT_SUPPORTED",
                                        _NVML_ERROR_NOT_SUPPORTED)
        if not_supported and device:
            self._unsupported.add((function, device))
            _log.info("NVML query not supported on this device; field left empty",
                      function=function, device=device)
            return
        self._errors[function] += 1
        key = (function, type(exc).__name__)
        if key not in self._logged:
            self._logged.add(key)
            _log.warning("NVML query failed; counting further failures silently",
                         function=function, device=device or None,
                         error=f"{type(exc).__name__}: {exc}")


def _error_code(exc: BaseException) -> int | None:
    """The NVML return code carried by a ``pynvml.NVMLError`` (its ``value``), else ``None``."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None
