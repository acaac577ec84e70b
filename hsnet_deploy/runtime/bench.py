"""The timing loop behind `hsnet-deploy bench`: latency percentiles, throughput, cold start, memory,
per-stage breakdown and achieved GFLOP/s, for any list of runners, measured in one process and one run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hsnet_deploy.artifacts import INPUT_NAMES
from hsnet_deploy.machine import OtherCpuUse, cpu_name, usable_cores
from hsnet_deploy.runtime.base import Runner, input_shapes
from hsnet_deploy.runtime.memory import peak_rss_bytes, reset_peak_rss

PERCENTILES = (50, 90, 95, 99)


@dataclass
class BenchResult:
    label: str
    backend: str
    device: str
    precision: str
    artifact: str
    batch: int
    shots: int
    iters: int = 0
    cold_ms: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)  # every timed call, for distributions
    episodes_per_s: float | None = None
    peak_rss_mb: float | None = None
    device_mem_mb: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    gflop_per_s: float | None = None
    speedup_vs_eager: float | None = None
    device_io_ms: dict[str, float] = field(default_factory=dict)
    compile_s: float | None = None
    other_cpu_cores: float | None = None  # cores other processes kept busy during the timed calls (machine.py)
    complete: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    out = {"min": float(ms.min()), "mean": float(ms.mean())}
    out.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
    out["max"] = float(ms.max())
    return out


def episode_flops(model, feed: dict[str, np.ndarray]) -> float:
    """FLOPs of one call (2 per multiply-add), counted by PyTorch's FlopCounterMode on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    tensors = [torch.from_numpy(feed[n]) for n in INPUT_NAMES]
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(*tensors)
    return float(counter.get_total_flops())


def matmul_gflops(seconds: float = 1.0, n: int = 1024) -> float:
    """This machine's FP32 GEMM rate right now, as the yardstick for the episode's achieved GFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - start) / 1e9


def bench_runner(
    runner: Runner,
    feed: dict[str, np.ndarray],
    iters: int,
    warmup: int,
    tick: Callable[[], None] = lambda: None,
    stages: bool = False,
) -> BenchResult:
    """Enter the runner, time a cold call, warm up, time `iters` calls. Ctrl-C keeps what was measured."""
    b, k = feed["support_imgs"].shape[:2]
    info = runner.info
    res = BenchResult(info.label, info.backend, info.device, info.precision, info.artifact, int(b), int(k))
    reset_peak_rss()
    try:
        with runner:
            runner.infer(feed)
            res.cold_ms = runner.inference_times[-1] * 1e3
            for _ in range(max(0, warmup - 1)):
                runner.infer(feed)
            runner.inference_times.clear()
            others = OtherCpuUse()
            for _ in range(iters):
                runner.infer(feed)
                tick()
            res.other_cpu_cores = others.cores()
            if runner.supports_device_io:
                res.device_io_ms = device_io_latency(runner, feed, iters, warmup)
            stage_s = runner.profile_stages(feed) if stages else None
            if stage_s:
                res.stages_ms = {s: t * 1e3 for s, t in stage_s.items()}
            res.complete = True
            mem = runner.device_memory_bytes()
            res.device_mem_mb = None if mem is None else mem / 2**20
    except KeyboardInterrupt:
        res.note = "interrupted"  # the caller sees it, reports what was measured and stops
    finally:
        times = runner.inference_times
        if times:
            res.iters = len(times)
            res.latency_ms = latency_summary(times)
            res.times_ms = [t * 1e3 for t in times]
            res.episodes_per_s = b / float(np.mean(times))
        compile_s = (info.details.get("compile_s") or {}).get((int(b), int(k)))
        res.compile_s = None if compile_s is None else float(compile_s)
        peak = peak_rss_bytes()
        res.peak_rss_mb = None if peak is None else peak / 2**20
    return res


def device_io_latency(runner: Runner, feed: dict[str, np.ndarray], iters: int, warmup: int,
                      device: str = "cuda") -> dict[str, float]:
    """Latency of `infer_device` with the episode already on the device: what a caller with GPU
    pre-processing pays (no host copies), beside `infer`'s host-I/O figure."""
    tensors = {n: torch.from_numpy(v).to(device) for n, v in feed.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(max(1, warmup)):
        runner.infer_device(tensors)
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        runner.infer_device(tensors)
        sync()
        times.append(time.perf_counter() - start)
    return latency_summary(times)


@dataclass
class Suite:
    """Everything one `bench` run measured, for the table and the JSON."""

    batch: int
    shots: int
    img_size: int
    backbone: str
    machine: dict = field(default_factory=dict)
    episode_gflop: float | None = None
    matmul_gflop_per_s: float | None = None
    results: list[BenchResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [r.to_dict() for r in self.results]
        return d


def machine_info() -> dict:
    import platform

    info = {"cpu": cpu_name(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def random_feed(batch: int, shots: int, img_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed random episode with filled-square support masks (timing does not depend on content)."""
    rng = np.random.default_rng(seed)
    shapes = input_shapes(batch, shots, img_size, img_size)
    masks = np.zeros(shapes["support_masks"], np.float32)
    lo, hi = img_size // 4, 3 * img_size // 4
    masks[..., lo:hi, lo:hi] = 1.0
    return {
        "query_img": rng.standard_normal(shapes["query_img"], dtype=np.float32),
        "support_imgs": rng.standard_normal(shapes["support_imgs"], dtype=np.float32),
        "support_masks": masks,
    }


SHORT_BACKEND = {"onnxruntime": "ort", "pytorch": "torch", "tensorrt": "trt", "torch.compile": "compile"}


def short_labels(results: list[BenchResult]) -> tuple[list[str], list[str]]:
    """Labels that fit an 80-column table ('ort-cpu fp32 [1]') and the notes naming each [n]'s artifact."""
    labels, notes, numbers = [], [], {}
    for r in results:
        label = f"{SHORT_BACKEND.get(r.backend, r.backend)}-{r.device} {r.precision}"
        if r.artifact and Path(r.artifact).is_file():  # eager baselines carry a description, not a file
            if r.artifact not in numbers:
                numbers[r.artifact] = len(numbers) + 1
                notes.append(f"[{numbers[r.artifact]}] {r.artifact}")
            label += f" [{numbers[r.artifact]}]"
        labels.append(label)
    return labels, notes
