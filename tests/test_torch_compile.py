"""The torch.compile anchor: its runner on the CPU with a tiny model, and its place in a GPU bench plan."""

import numpy as np
import pytest
import torch
from conftest import run_cli

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.bench import random_feed
from hsnet_deploy.runtime.ort_runner import available_providers
from hsnet_deploy.runtime.suite import plan_runners
from hsnet_deploy.runtime.torch_compile import CompiledTorchRunner
from hsnet_deploy.runtime.torch_runner import TorchRunner


class TinyHSNetShape(torch.nn.Module):
    """HSNet's signature and output shapes in a few ops, so Inductor compiles it in seconds."""

    backbone_name = "tiny"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, q, s, m):
        b, k = s.shape[:2]
        x = self.conv(s.reshape(b * k, *s.shape[2:])).reshape(b, k, 2, *s.shape[-2:])
        logits = x + self.conv(q)[:, None] * m[:, :, None]
        return logits, (logits[:, :, 1] > logits[:, :, 0]).float().amax(1)


def test_compiled_runner_agrees_with_eager_and_records_compile_time_per_shape():
    model = TinyHSNetShape().eval()
    feeds = [random_feed(1, 2, 16, seed=0), random_feed(1, 2, 16, seed=1), random_feed(2, 1, 16, seed=2)]
    with TorchRunner(model, "cpu") as eager:
        refs = [eager.infer(f) for f in feeds]
    # reduce-overhead on the CPU compiles with Inductor and skips the CUDA graphs (they need CUDA)
    with CompiledTorchRunner(model, "cpu", "fp32", "reduce-overhead") as runner:
        outs = [runner.infer(f) for f in feeds]
        assert runner.info.backend == "torch.compile" and runner.info.details["mode"] == "reduce-overhead"
        assert set(runner.compile_seconds) == {(1, 2), (2, 1)}
        assert all(t > 0 for t in runner.compile_seconds.values())
    for out, ref in zip(outs, refs):
        scale = np.abs(ref["logits"]).max()
        assert np.abs(out["logits"] - ref["logits"]).max() <= 1e-5 * scale
        np.testing.assert_array_equal(out["mask"], ref["mask"])


def test_compiled_runner_refuses_fp16_on_the_cpu_and_unknown_modes():
    with pytest.raises(UserError, match="fp16"):
        CompiledTorchRunner(TinyHSNetShape(), "cpu", "fp16")
    with pytest.raises(ValueError, match="mode 'fast'"):
        CompiledTorchRunner(TinyHSNetShape(), "cpu", "fp32", "fast")


def test_plan_refuses_gpu_options_without_an_ort_cuda_runner(exported):
    path, _, _ = exported("resnet50")
    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("reason: onnxruntime-gpu is installed, so an ONNX Runtime CUDA runner exists here")
    with pytest.raises(UserError, match="--cuda-graph: CUDA graphs are for ONNX Runtime on CUDA"):
        plan_runners([path], "auto", None, None, True, False)
    with pytest.raises(UserError, match="--cuda-ep-option: this run has no ONNX Runtime CUDA runner"):
        plan_runners([path], "auto", None, None, False, False, {"prefer_nhwc": "1"})


def test_a_gpu_bench_plan_puts_the_compile_anchor_beside_eager(exported, monkeypatch):
    """Planning only (nothing runs): with a GPU, eager FP32, eager FP16 and torch.compile FP16 come first."""
    path, _, _ = exported("resnet50")  # exported before CUDA is faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    runners, skipped, _, _ = plan_runners([path], "cuda", None, None, False, False)
    labels = [(r.info.backend, r.device, r.precision) for r in runners[:3]]
    assert labels == [("pytorch", "cuda", "fp32"), ("pytorch", "cuda", "fp16"), ("torch.compile", "cuda", "fp16")]
    compiled = runners[2]
    assert isinstance(compiled, CompiledTorchRunner) and compiled.mode == "reduce-overhead"
    assert compiled.backend == "inductor" and compiled.model is runners[0].model
    if "CUDAExecutionProvider" not in available_providers():
        assert any("onnxruntime-cuda" in line for line in skipped)
    cpu_plan, _, _, _ = plan_runners([path], "cpu", None, None, False, False)
    assert not any(isinstance(r, CompiledTorchRunner) for r in cpu_plan)


@pytest.mark.parametrize("args,message", [
    (["--device", "cpu", "--cuda-graph"], "--cuda-graph: for ONNX Runtime on CUDA, not --device cpu"),
    (["--device", "cpu", "--cuda-ep-option", "prefer_nhwc=1"], "--cuda-ep-option: for ONNX Runtime on CUDA"),
    (["--cuda-ep-option", "gpu_mem_limit=1"], "KEY one of prefer_nhwc"),
])
def test_bench_refuses_gpu_options_it_cannot_use_with_exit_2(exported, args, message):
    path, _, _ = exported("resnet50")
    code, _, err = run_cli("bench", str(path), "--iters", "1", *args)
    assert code == 2 and message in err and "Traceback" not in err


NO_CUDA = "no CUDA GPU on this machine (CI and the developers' machines are CPU-only)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_reduce_overhead_fp16_on_the_gpu_agrees_with_eager_fp16(exported):
    _, _, model = exported("resnet50")
    feeds = [random_feed(1, 1, 64, seed=s) for s in range(4)]
    with TorchRunner(model, "cuda", "fp16") as eager:
        refs = [eager.infer(f) for f in feeds]
    with CompiledTorchRunner(model, "cuda", "fp16", "reduce-overhead") as runner:
        outs = [runner.infer(f) for f in feeds]  # calls 2+ replay the CUDA graph; outputs must not alias
    for out, ref in zip(outs, refs):
        assert np.abs(out["logits"] - ref["logits"]).max() <= 5e-2 * np.abs(ref["logits"]).max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_bench_reports_compile_time_and_device_io(exported, tmp_path):
    import json

    from hsnet_deploy.runtime.ort_runner import available_providers as providers

    path, _, _ = exported("resnet50")
    report = tmp_path / "bench.json"
    code, out, err = run_cli("bench", str(path), "--device", "cuda", "--iters", "3", "--json", str(report))
    assert code == 0, err
    results = {r["label"]: r for r in json.loads(report.read_text())["results"]}
    assert results["torch.compile-cuda fp16"]["compile_s"] > 0
    if "CUDAExecutionProvider" in providers():
        assert results["onnxruntime-cuda fp32"]["device_io_ms"]["p50"] > 0
        assert "host I/O vs device I/O" in out


def test_compile_time_is_the_first_call_of_each_shape_not_the_latest(monkeypatch):
    """The first call of a (B, K) compiles; later calls of that shape replay and must not overwrite its figure."""
    import types

    from hsnet_deploy.runtime import torch_compile

    now = [0.0]  # a clock that only the compiled model's calls move: 5 s, 0.5 s, 7 s, 0.25 s
    monkeypatch.setattr(torch_compile, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    durations = iter([5.0, 0.5, 7.0, 0.25])
    model = TinyHSNetShape().eval()
    with CompiledTorchRunner(model, "cpu", "fp32", "default", backend="eager") as runner:
        compiled = runner.compiled

        def timed(*args):
            now[0] += next(durations)
            return compiled(*args)

        runner.compiled = timed
        for b, k in ((1, 2), (1, 2), (2, 1), (2, 1)):
            runner.infer(random_feed(b, k, 16, seed=b))
        assert runner.compile_seconds == {(1, 2): 5.0, (2, 1): 7.0}
