"""Which runners a `bench` run compares, and running them in one process: PyTorch eager first (the
baseline for every ratio), then each artifact, then every other backend this machine has."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hsnet_deploy.errors import UserError
from hsnet_deploy.machine import BUSY_CORES, usable_cores
from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.artifact import eager_baselines, inspect_artifact, open_artifact
from hsnet_deploy.runtime.base import AUTHORS_IMG_SIZE, Runner
from hsnet_deploy.runtime.bench import (
    BenchResult,
    Suite,
    bench_runner,
    episode_flops,
    machine_info,
    matmul_gflops,
    random_feed,
)
from hsnet_deploy.runtime.ort_runner import available_providers


def plan_runners(
    paths: list[Path], device: str, threads: int | None, backbone: str | None, cuda_graph: bool, default: bool,
    ep_options: dict[str, str] | None = None,
) -> tuple[list[Runner], list[str], str, int]:
    """Runners in order (eager baselines first) and the reasons other backends were skipped.

    Every artifact is opened by `open_artifact`, so each of its refusals (wrong ORT version or device,
    another image size) applies here as in eval and predict."""
    arts = [inspect_artifact(p) for p in paths]
    checkpoint_device = "cpu" if device == "auto" else device
    artifact_runners: list[Runner] = []
    first = arts[0]
    # A checkpoint has no image size of its own: the run takes the first exported artifact's, whatever the order
    # (a checkpoint first used to fix 400 and refuse a 64x64 ONNX model given after it), else the authors' 400.
    sized = next((a for a in arts if a.kind != "checkpoint"), None)
    img_size = int(sized.meta["img_size"]) if sized else AUTHORS_IMG_SIZE
    skipped: list[str] = []
    providers = available_providers()
    for art in arts:
        if art.kind == "checkpoint":
            artifact_runners.append(open_artifact(art.path, checkpoint_device, backbone))
            continue
        if art.kind == "tensorrt":
            artifact_runners.append(open_artifact(art.path, "cuda", img_size=img_size))
        else:
            devices = [art.meta["ort_device"]] if art.meta.get("ort_device") else (
                ["cpu", "cuda"] if device == "auto" else [device])
            for dev in devices:
                if dev == "cuda" and "CUDAExecutionProvider" not in providers:
                    if default or device == "cuda":
                        skipped.append("onnxruntime-cuda: no CUDAExecutionProvider (pip install onnxruntime-gpu)")
                    continue
                if dev == "cpu" and device == "cuda":
                    continue
                artifact_runners.append(open_artifact(
                    art.path, dev, img_size=img_size, threads=threads, cuda_graph=cuda_graph and dev == "cuda",
                    ep_options=ep_options if dev == "cuda" else None))
    # The first artifact names the baseline's backbone (a checkpoint's runner knows it; else the metadata).
    base_backbone = artifact_runners[0].info.backbone if first.kind == "checkpoint" else first.meta["backbone"]
    for r in artifact_runners:  # one eager baseline and one FLOP count: every artifact must share the backbone
        if r.info.backbone != base_backbone:
            raise UserError(f"{r.info.artifact}: a {r.info.backbone} model, but {first.path} is {base_backbone}; "
                            "the eager baseline and FLOP count are per backbone, so bench one backbone per run")
    has_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not has_cuda:
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here")
    # The baseline runs seeded weights of the same backbone: speed does not depend on weight values.
    runners = eager_baselines(seeded_model(base_backbone, 0), cpu=device in ("auto", "cpu"), cuda=has_cuda)
    runners += artifact_runners
    ort_cuda = [r for r in runners if r.info.backend == "onnxruntime" and r.info.device == "cuda"]
    if cuda_graph and not ort_cuda:
        raise UserError("--cuda-graph: CUDA graphs are for ONNX Runtime on CUDA, and this run has no such runner "
                        f"(device {device}; {no_ort_cuda_reason(arts, providers, skipped)})")
    if ep_options and not ort_cuda:
        raise UserError("--cuda-ep-option: this run has no ONNX Runtime CUDA runner to take it")
    if default:
        skipped.append(_tensorrt_status())
    return runners, [s for s in skipped if s], base_backbone, img_size


def _tensorrt_status() -> str:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return ("tensorrt: not installed here (pip install \"hsnet-deploy[tensorrt]\" on a machine with an NVIDIA "
                "GPU, or build a plan elsewhere and pass it as ARTIFACT)")
    return "tensorrt: installed; build a plan with `hsnet-deploy build-engine --backend tensorrt` and pass it"


def run_suite(
    paths: list[Path], *, batch: int, shots: int, iters: int, warmup: int, device: str, threads: int | None,
    backbone: str | None, stages: bool, cuda_graph: bool, default: bool, ep_options: dict[str, str] | None = None,
    on_start: Callable[[Runner, int], Callable[[], None]] = lambda r, n: (lambda: None),
) -> Suite:
    """Run every planned runner on one random episode; Ctrl-C ends the suite with what was measured."""
    if threads:
        torch.set_num_threads(threads)
    runners, skipped, base_backbone, img_size = plan_runners(paths, device, threads, backbone, cuda_graph, default,
                                                                ep_options)
    feed = random_feed(batch, shots, img_size)
    suite = Suite(batch, shots, img_size, base_backbone, machine_info(), skipped=skipped)
    if default:
        suite.notes.append("embedded default: resnet50 with SEEDED RANDOM weights")
    if any(r.info.backend == "torch.compile" for r in runners):
        suite.notes.append("torch.compile runs mode=\"reduce-overhead\" under FP16 autocast; its cold call is its "
                           "compile time")
    suite.notes.append("PyTorch eager baselines use seeded weights of the same backbone (speed does not depend on "
                       "weight values)")
    try:
        suite.matmul_gflop_per_s = matmul_gflops()
        flop_model = runners[0].flop_model()
        suite.episode_gflop = episode_flops(flop_model, feed) / 1e9 / batch if flop_model is not None else None
    except KeyboardInterrupt:
        suite.interrupted = True
        return suite
    for runner in runners:
        tick = on_start(runner, iters)
        result: BenchResult = bench_runner(runner, feed, iters, warmup, tick, stages=stages)
        suite.results.append(result)
        if result.note == "interrupted":
            suite.interrupted = True
            break
    suite.notes.extend(busy_machine_notes(suite.results))
    baseline = next((r for r in suite.results if r.backend == "pytorch" and r.precision == "fp32"
                     and r.device == "cpu" and r.latency_ms), None)
    for r in suite.results:
        ref = next((b for b in suite.results if b.backend == "pytorch" and b.precision == "fp32"
                    and b.device == r.device and b.latency_ms), baseline)
        if ref and r.latency_ms:
            r.speedup_vs_eager = ref.latency_ms["mean"] / r.latency_ms["mean"]
        if suite.episode_gflop and r.latency_ms:
            r.gflop_per_s = suite.episode_gflop * batch / (r.latency_ms["mean"] / 1e3)
    return suite


def no_ort_cuda_reason(arts: list, providers: list[str], skipped: list[str]) -> str:
    """Why a run has no ONNX Runtime CUDA runner, for the --cuda-graph refusal."""
    onnx_models = [a for a in arts if a.kind == "onnx"]
    if not onnx_models:
        return "no ONNX artifact"
    if "CUDAExecutionProvider" not in providers:
        return skipped[0] if skipped else "this ONNX Runtime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    pinned = [a.path for a in onnx_models if a.meta.get("ort_device") == "cpu"]
    return f"{', '.join(map(str, pinned))} optimised for the CPU" if pinned else "no ONNX model for CUDA"


def busy_machine_notes(results: list[BenchResult]) -> list[str]:
    """A note per runner timed while other processes kept BUSY_CORES or more of its cores busy: its latency, and
    every ratio against it, says as much about the machine as about the runner."""
    notes = []
    for r in results:
        if r.other_cpu_cores is not None and r.other_cpu_cores >= BUSY_CORES:
            what = r.label + (f" ({r.artifact})" if Path(r.artifact).is_file() else "")
            notes.append(f"other work kept {r.other_cpu_cores:.2f} of {usable_cores()} cores busy while {what} was "
                         "timed: its figures and the ratios against it are inflated; rerun on a quiet machine")
    return notes
