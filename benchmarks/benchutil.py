"""Shared helpers of the GPU benchmarks: the hardware and versions every JSON records, and what
the GPU ran at while a measurement ran."""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import statistics
import subprocess
import threading

import torch

from qkvlab.costs import BF16_PEAK, bf16_peak  # noqa: F401  (the benchmarks take them from here)


def source_commit() -> str | None:
    """The commit of the qkvlab sources the benchmark imports (:func:`qkvlab.provenance.code_version`:
    ``$QKVLAB_GIT_COMMIT`` where set, else git; None for a package outside a checkout, as a
    copied tree is), with ``+dirty`` for uncommitted changes."""
    from qkvlab.provenance import code_version

    commit, dirty = code_version()
    return None if commit is None else commit + ("+dirty" if dirty else "")


def env_info(device: torch.device) -> dict:
    """Date, source commit, Python / torch / CUDA / cuDNN / Triton versions, GPU name, SMs, memory,
    driver, clocks."""
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": source_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1))
        info["l2_MB"] = round(getattr(p, "L2_cache_size", 0) / 1e6, 1)
        try:
            q = "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem"
            out = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["driver"], info["max_sm_clock"], info["max_mem_clock"] = (x.strip() for x in out.stdout.split(","))
        except (OSError, ValueError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(gpu=f"cpu ({platform.processor() or platform.machine()}), Triton interpreter")
    return info


def _nvml_handle(device: torch.device):
    """``(pynvml, handle)`` of ``device``, or None without CUDA or NVML (``nvidia-ml-py``, on the
    GPU image). The card is found by its UUID, else its PCI bus id, never by index: NVML's order
    need not be CUDA's, and CUDA_VISIBLE_DEVICES renumbers CUDA's."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    p = torch.cuda.get_device_properties(device)
    try:
        uuid = str(p.uuid)
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except (AttributeError, pynvml.NVMLError):
        pass
    try:
        bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0"
        return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except (AttributeError, pynvml.NVMLError):
        return None


def _reason_names(nvml) -> dict[int, str]:
    """NVML's clock event reasons, bit to name, from the module's own constants (the older
    ``Throttle`` spelling where a module lacks ``Event``); the first name of a bit where two share it."""
    for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
        names: dict[int, str] = {}
        for name in sorted(n for n in dir(nvml) if n.startswith(prefix)):
            bit = getattr(nvml, name)
            if isinstance(bit, int) and bit > 0 and bit & (bit - 1) == 0:  # one bit: not None or All
                names.setdefault(bit, name.removeprefix(prefix))
        if names:
            return names
    return {}


class GpuWatch:
    """What the GPU ran at while a measurement ran: NVML samples, taken on a thread every
    ``interval`` seconds (and once at each end), of the SM and memory clocks, the temperature, the
    power draw and the reasons the driver gives for holding clocks down (power cap, thermal
    slowdown...). Two runs of the same code can differ by several percent; this says whether the
    card did. Without CUDA or NVML nothing runs and :meth:`summary` is None::

        with GpuWatch(device) as watch:
            ...  # timed work
        row["gpu_state"] = watch.summary()
    """

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device, self.interval = device, interval
        self.samples: list[tuple[int, int, int, float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self._handle = self._reasons = None

    def __enter__(self) -> GpuWatch:
        found = _nvml_handle(self.device)
        if found is not None:
            self._nvml, self._handle = found
            self._reasons = getattr(self._nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            self._reasons = self._reasons or self._nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # older name
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        # a query this card or driver lacks loses the sample, not the measurement
        with contextlib.suppress(nv.NVMLError):
            self.samples.append(
                (
                    nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
                    nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM),
                    nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                    nv.nvmlDeviceGetPowerUsage(h) / 1000,  # NVML gives milliwatts
                    self._reasons(h),
                )
            )

    def summary(self) -> dict | None:
        """Clocks (MHz: min, median, max), highest temperature (C) and power (W), and every clock
        event reason seen in any sample; None where nothing was sampled."""
        if not self.samples:
            return None
        sm, mem, temp, power, bits = zip(*self.samples, strict=True)
        seen = 0
        for b in bits:
            seen |= b
        names = _reason_names(self._nvml)
        return dict(
            samples=len(self.samples),
            sm_clock_MHz=dict(min=min(sm), median=statistics.median(sm), max=max(sm)),
            mem_clock_MHz=dict(min=min(mem), median=statistics.median(mem), max=max(mem)),
            temperature_C_max=max(temp),
            power_W_max=max(power),
            clock_event_reasons=sorted(name for bit, name in names.items() if seen & bit),
        )


def write_json(doc: dict, name: str, extra_path: str | None = None) -> list[str]:
    """Write ``doc`` to ``extra_path`` (if given) and to ``$OUT/name`` (on the device machine).

    Called after every case as well as at the end, so a run stopped at its time limit still
    leaves the rows it finished. Each write replaces the file atomically.
    """
    import json
    import os
    from pathlib import Path

    out_env = os.environ.get("OUT") and os.path.join(os.environ["OUT"], name)
    written = []
    for path in filter(None, [extra_path, out_env]):
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=float) + "\n")
        tmp.replace(p)
        written.append(str(p))
    return written


def jit_now(fn):
    """``triton.jit(fn)``, decorated at the call rather than at import, so that a smoke run's
    ``TRITON_INTERPRET=1`` set before it holds. The kernel's module gets the helpers such a
    kernel calls as globals (Triton's interpreter sees no closure): ``_sum`` (the reduction's
    combine function) and the dependent-launch pair ``_gdc_wait`` / ``_gdc_launch_dependents``."""
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - exercised only where triton is missing
        raise SystemExit("this benchmark needs Triton (pip install -e '.[dev]')") from None
    from qkvlab.kernels import kv_decode

    fn.__globals__.update(
        _sum=tl.standard._sum_combine,
        _gdc_wait=kv_decode._gdc_wait,
        _gdc_launch_dependents=kv_decode._gdc_launch_dependents,
    )
    return triton.jit(fn)
