"""Which runners a `bench` run compares, and running them in one process: PyTorch eager first (the
baseline for every ratio), then each artifact, then every other backend this machine has."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hsnet_deploy.artifacts import stage_of_node
from hsnet_deploy.errors import UserError
from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.artifact import inspect_artifact, open_artifact
from hsnet_deploy.runtime.base import Runner
from hsnet_deploy.runtime.bench import (
    BenchResult,
    Suite,
    bench_runner,
    episode_flops,
    machine_info,
    matmul_gflops,
    random_feed,
)
from hsnet_deploy.runtime.ort_runner import OrtRunner, available_providers
from hsnet_deploy.runtime.torch_compile import CompiledTorchRunner
from hsnet_deploy.runtime.torch_runner import TorchRunner


def plan_runners(
    paths: list[Path], device: str, threads: int | None, backbone: str | None, cuda_graph: bool, default: bool,
    ep_options: dict[str, str] | None = None,
) -> tuple[list[Runner], list[str], str, int]:
    """Runners in order (eager baselines first) and the reasons other backends were skipped."""
    arts = [inspect_artifact(p) for p in paths]
    first = arts[0]
    checkpoint_device = "cpu" if device == "auto" else device
    # Checkpoint runners are opened once, here: the first one also tells the baseline's backbone.
    eager_runners = {id(a): open_artifact(a.path, checkpoint_device, backbone) for a in arts if a.kind == "checkpoint"}
    if first.kind == "checkpoint":
        base_backbone, img_size = eager_runners[id(first)].model.backbone_name, 400
    else:
        base_backbone, img_size = first.meta["backbone"], int(first.meta["img_size"])
    for art in arts:  # one eager baseline and one FLOP count: every artifact must share the backbone
        other = eager_runners[id(art)].model.backbone_name if art.kind == "checkpoint" else art.meta.get("backbone")
        if other != base_backbone:
            raise UserError(f"{art.path}: a {other} model, but {first.path} is {base_backbone}; the eager baseline "
                            "and FLOP count are per backbone, so bench one backbone per run")
    has_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    runners: list[Runner] = []
    skipped: list[str] = []
    # The baseline runs seeded weights of the same backbone: speed does not depend on weight values.
    eager_model = seeded_model(base_backbone, 0)
    if device in ("auto", "cpu"):
        runners.append(TorchRunner(eager_model, "cpu", "fp32", "eager (seeded weights)"))
    if has_cuda:
        runners.append(TorchRunner(eager_model, "cuda", "fp32", "eager (seeded weights)"))
        runners.append(TorchRunner(eager_model, "cuda", "fp16", "eager (seeded weights)"))
        # The anchor: what a user gets from one line of PyTorch, without this toolkit.
        runners.append(CompiledTorchRunner(eager_model, "cuda", "fp16", "reduce-overhead",
                                           artifact="torch.compile (seeded weights)"))
    elif device == "cuda":
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here")
    providers = available_providers()
    for art in arts:
        if art.kind == "checkpoint":
            runners.append(eager_runners[id(art)])
            continue
        if art.kind == "tensorrt":
            runners.append(open_artifact(art.path, "cuda"))
            continue
        if int(art.meta["img_size"]) != img_size:
            raise UserError(f"{art.path}: {art.meta['img_size']}x{art.meta['img_size']} images, but the first "
                            f"artifact takes {img_size}; bench artifacts of one size together")
        devices = [art.meta["ort_device"]] if art.meta.get("ort_device") else (
            ["cpu", "cuda"] if device == "auto" else [device])
        for dev in devices:
            if dev == "cuda" and "CUDAExecutionProvider" not in providers:
                if default or device == "cuda":
                    skipped.append("onnxruntime-cuda: no CUDAExecutionProvider (pip install onnxruntime-gpu)")
                continue
            if dev == "cpu" and device == "cuda":
                continue
            runners.append(OrtRunner(str(art.path), art.meta, dev, threads, cuda_graph and dev == "cuda",
                                     ep_options=ep_options if dev == "cuda" else None))
    ort_cuda = [r for r in runners if isinstance(r, OrtRunner) and r.device == "cuda"]
    if cuda_graph and not ort_cuda:
        raise UserError("--cuda-graph: CUDA graphs are for ONNX Runtime on CUDA, and this run has no such runner "
                        f"(device {device}; {', '.join(skipped) or 'no ONNX artifact'})")
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


def stage_profiler(runner: Runner, feed) -> Callable[[Runner], dict[str, float]] | None:
    if isinstance(runner, TorchRunner) and not isinstance(runner, CompiledTorchRunner):  # compiled: no marks
        return lambda r: r.profile_stages(feed)
    if isinstance(runner, OrtRunner) and not runner.cuda_graph:  # a replayed graph has no per-node times
        stage_of = stage_of_node(runner.meta)
        return (lambda r: r.profile_stages(feed, stage_of)) if stage_of else None
    return None


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
    if any(isinstance(r, CompiledTorchRunner) for r in runners):
        suite.notes.append("torch.compile runs mode=\"reduce-overhead\" under FP16 autocast; its cold call is its "
                           "compile time")
    suite.notes.append("PyTorch eager baselines use seeded weights of the same backbone (speed does not depend on "
                       "weight values)")
    try:
        suite.matmul_gflop_per_s = matmul_gflops()
        suite.episode_gflop = episode_flops(runners[0].model, feed) / 1e9 / batch if isinstance(
            runners[0], TorchRunner) else None
    except KeyboardInterrupt:
        suite.interrupted = True
        return suite
    for runner in runners:
        tick = on_start(runner, iters)
        result: BenchResult = bench_runner(runner, feed, iters, warmup, tick,
                                           stage_profiler(runner, feed) if stages else None)
        suite.results.append(result)
        if result.note == "interrupted":
            suite.interrupted = True
            break
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
