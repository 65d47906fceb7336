"""Timing, figures and the machine description shared by the benchmark sections."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from grainlab.boundaries.infer import LoadedModel
from grainlab.boundaries.unet import UNetArgs, build_unet

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    """One measured figure; `reference` and `ratio` when a plain implementation was timed beside it."""

    section: str
    name: str
    unit: str
    value: float
    reference: float | None = None
    detail: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if self.reference is None else self.value / self.reference

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Skipped:
    section: str
    name: str
    reason: str


def add_set_option(ap, help: str = "override a setting (repeatable)"):
    """The benchmarks' `--set KEY=VALUE` option, collected in args.overrides."""
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tiles_per_pass(device: torch.device, tile_batch: int) -> str:
    """How tiled inference batches its tiles on this device (see `boundaries.infer.predict_logits`)."""
    return f"batch {tile_batch}" if device.type == "cuda" else "one tile at a time per thread"


def best_times(
    fns: list[Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmup: bool | list[Callable[[], object]] = True,
) -> list[float]:
    """Best wall time of each function over `repeats` rounds, the functions interleaved within a
    round so that a change in machine load hits them alike. Each runs once untimed first
    (first-call costs: kernel selection, allocations, worker start-up) unless warmup=False;
    a list of functions runs those instead (a shorter warm-up)."""
    for fn in warmup if isinstance(warmup, list) else fns if warmup else []:
        fn()
    sync(device)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {
        "node": platform.node(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


class GpuUtilisation:
    """Samples torch.cuda.utilization() in a thread while a block runs (CUDA with NVML only)."""

    def __init__(self, device: torch.device, every_s: float = 0.1):
        self.device, self.every_s, self.samples = device, every_s, []
        self.note = ""
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.type != "cuda":
            self.note = "not on CUDA"
            return self
        try:
            torch.cuda.utilization(self.device)
        except Exception as exc:  # no pynvml / NVML: say so, measure the rest
            self.note = f"torch.cuda.utilization unavailable ({type(exc).__name__}: {exc})"
            return self
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.samples.append(torch.cuda.utilization(self.device))

    def __exit__(self, *exc):
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def inference_model(args: UNetArgs, device: torch.device, seed: int = 0) -> LoadedModel:
    """A freshly initialised U-Net ready for inference (speed does not depend on the weights)."""
    torch.manual_seed(seed)
    net = build_unet(args).eval().to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return LoadedModel(net, device, {}, 0)
