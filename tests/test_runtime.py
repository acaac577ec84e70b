import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import EXPORT_SIZE, ort_model_from_another_version, run_cli

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.artifact import open_artifact
from hsnet_deploy.runtime.bench import random_feed
from hsnet_deploy.runtime.ort_build import build_ort_model
from hsnet_deploy.runtime.ort_runner import OrtRunner, available_providers
from hsnet_deploy.runtime.torch_runner import TorchRunner

NO_CUDA = "no CUDA GPU on this machine (CI and the developers' machines are CPU-only)"
NO_ORT_CUDA = "onnxruntime-gpu's CUDAExecutionProvider is not installed here"


def _agrees(out, ref):
    scale = np.abs(ref["logits"]).max()
    assert out["logits"].shape == ref["logits"].shape and out["mask"].shape == ref["mask"].shape
    assert np.abs(out["logits"] - ref["logits"]).max() <= 1e-4 * scale
    assert (out["mask"] == ref["mask"]).mean() >= 0.999


@pytest.fixture(scope="module")
def feed():
    return random_feed(2, 2, EXPORT_SIZE, seed=3)


@pytest.fixture(scope="module")
def reference(exported, feed):
    _, _, model = exported("resnet50")
    with TorchRunner(model) as runner:
        return runner.infer(feed)


def test_ort_cpu_runner_agrees_with_pytorch(exported, feed, reference):
    path, _, _ = exported("resnet50")
    with open_artifact(path, "cpu") as runner:
        assert isinstance(runner, OrtRunner)
        _agrees(runner.infer(feed), reference)
        assert len(runner.inference_times) == 1 and runner.inference_times[0] > 0


def test_ort_optimised_model_keeps_metadata_and_agrees(exported, feed, reference, tmp_path):
    path, _, _ = exported("resnet50")
    out = tmp_path / "opt.onnx"
    meta = build_ort_model(path, out, "cpu")
    assert meta["ort_device"] == "cpu" and meta["backbone"] == "resnet50"
    with open_artifact(out) as runner:
        _agrees(runner.infer(feed), reference)


def test_checkpoint_artifact_runs_eagerly(exported, feed, reference, tmp_path):
    from hsnet_deploy.model import save_checkpoint

    _, _, model = exported("resnet50")
    ckpt = tmp_path / "own.pt"
    save_checkpoint(model, ckpt)
    with open_artifact(ckpt, "cpu") as runner:
        assert runner.info.backend == "pytorch"
        _agrees(runner.infer(feed), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_runner_agrees(exported, feed, reference, precision):
    _, _, model = exported("resnet50")
    with TorchRunner(model, "cuda", precision) as runner:
        out = runner.infer(feed)
    tol = 1e-4 if precision == "fp32" else 5e-2
    assert np.abs(out["logits"] - reference["logits"]).max() <= tol * np.abs(reference["logits"]).max()
    TorchRunner(model, "cpu")  # and the model still works on the CPU


@pytest.mark.skipif("CUDAExecutionProvider" not in available_providers(), reason=NO_ORT_CUDA)
def test_ort_cuda_runner_with_io_binding_agrees(exported, feed, reference):
    path, _, _ = exported("resnet50")
    with open_artifact(path, "cuda") as runner:
        _agrees(runner.infer(feed), reference)


def test_cuda_requests_fail_clearly_without_a_gpu(exported):
    if torch.cuda.is_available():
        pytest.skip("reason: this machine has a GPU; the CPU-only error path cannot be shown here")
    _, _, model = exported("resnet50")
    with pytest.raises(UserError, match="no CUDA device"):
        TorchRunner(model, "cuda")
    if "CUDAExecutionProvider" not in available_providers():
        path, _, _ = exported("resnet50")
        with pytest.raises(UserError, match="pip install onnxruntime-gpu"), open_artifact(path, "cuda"):
            pass


def test_truncated_onnx_is_refused(exported, tmp_path):
    path, _, _ = exported("resnet50")
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.onnx: not a readable ONNX model"):
        open_artifact(cut)


def test_wrong_image_size_and_foreign_onnx_are_refused(exported, tmp_path):
    path, _, _ = exported("resnet50")
    with pytest.raises(UserError, match=f"built for {EXPORT_SIZE}x{EXPORT_SIZE} images, not 400x400"):
        open_artifact(path, img_size=400)
    foreign = tmp_path / "foreign.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), foreign)
    with pytest.raises(UserError, match="without hsnet-deploy metadata"):
        open_artifact(foreign)


def test_ort_model_optimised_by_another_version_is_refused(exported, tmp_path):
    path, _, _ = exported("resnet50")
    out = ort_model_from_another_version(path, tmp_path / "opt.onnx")
    with pytest.raises(UserError, match="optimised by ONNX Runtime 0.0.1"):
        open_artifact(out)


def test_engine_without_sidecar_is_refused(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match="without its metadata file model.plan.json"):
        open_artifact(plan)


def test_bench_json_has_every_field(exported, tmp_path):
    path, _, _ = exported("resnet50")
    report = tmp_path / "bench.json"
    code, out, err = run_cli("bench", str(path), "--iters", "3", "--warmup", "1", "--json", str(report))
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["batch"] == 1 and data["shots"] == 1 and data["img_size"] == EXPORT_SIZE
    assert data["episode_gflop"] > 0 and data["matmul_gflop_per_s"] > 0
    labels = [r["label"] for r in data["results"]]
    assert labels[0] == "pytorch-cpu fp32" and "onnxruntime-cpu fp32" in labels
    for r in data["results"]:
        assert set(r["latency_ms"]) == {"min", "mean", "p50", "p90", "p95", "p99", "max"}
        assert r["latency_ms"]["min"] <= r["latency_ms"]["p50"] <= r["latency_ms"]["max"]
        assert r["iters"] == 3 and r["cold_ms"] > 0 and r["episodes_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["speedup_vs_eager"] > 0 and r["gflop_per_s"] > 0
        assert set(r["stages_ms"]) >= {"backbone", "correlation", "learner", "decoder"}
    assert data["results"][0]["speedup_vs_eager"] == pytest.approx(1.0)
    assert "vs eager" in out and "per-stage" in out
    # --device auto (the default) is kept as asked; the devices the runners ran on are recorded beside it
    assert data["settings"]["device"] == "auto" and data["devices"] == sorted({r["device"] for r in data["results"]})
    assert data["devices"] == (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])


def test_heavy_backends_are_imported_lazily():
    code = (
        "import sys, hsnet_deploy, hsnet_deploy.cli, hsnet_deploy.runtime.artifact, hsnet_deploy.runtime.suite,"
        " hsnet_deploy.runtime.trt_runner, hsnet_deploy.runtime.trt_build\n"
        "heavy = [m for m in ('tensorrt', 'tensorrt_lean', 'cuda', 'modelopt', 'onnxconverter_common')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # The command line alone (what `--help` loads) imports no torch either: torch imports cuda-python where that
    # is installed (a TensorRT machine), and took 1.5 s of `--help`'s 1.9 s.
    cli_only = ("import sys, hsnet_deploy.cli\n"
                "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'ray', 'tensorrt', 'cuda', 'modelopt')"
                " if m in sys.modules]\n"
                "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", cli_only], check=True)
    help_run = subprocess.run([sys.executable, "-m", "hsnet_deploy", "--help"], capture_output=True, text=True,
                              check=False)
    assert help_run.returncode == 0 and "build-engine" in help_run.stdout


def test_profile_names_onnx_runtime_rewrote_map_to_their_stage():
    """The CPU EP's FP16 fallback renames the convs it wraps in Casts (`InsertedPrecisionFreeCast_<output>_nchwc`):
    they counted as `other`, which put an FP16 variant's backbone at 2 ms and `other` at 114 ms in `bench`."""
    from hsnet_deploy.runtime.ort_runner import _fused_stage

    stage_of = {"relu_44": "backbone", "node_mul_620": "correlation", "conv2d_66": "learner"}
    assert _fused_stage("InsertedPrecisionFreeCast_relu_44_nchwc", stage_of) == "backbone"
    assert _fused_stage("InsertedPrecisionFreeCast_node_mul_620", stage_of) == "correlation"
    assert _fused_stage("conv2d_66_nchwc", stage_of) == "learner"
    assert _fused_stage("Reorder_token_7", stage_of) == "other"
    # a rewritten name that two known names begin with takes the longer one's stage, whatever the map's order
    for order in (("conv2d_6", "conv2d_66"), ("conv2d_66", "conv2d_6")):
        overlapping = {name: {"conv2d_6": "backbone", "conv2d_66": "learner"}[name] for name in order}
        assert _fused_stage("conv2d_66_token_3", overlapping) == "learner"


def test_latency_summary_matches_plain_arithmetic():
    """Milliseconds from seconds; percentiles by linear interpolation between the closest ranks, worked out here
    without numpy."""
    from hsnet_deploy.runtime.bench import PERCENTILES, latency_summary

    seconds = [0.010, 0.030, 0.020, 0.100, 0.040]
    summary = latency_summary(seconds)
    ranked = sorted(s * 1e3 for s in seconds)

    def percentile(p):
        rank = p / 100 * (len(ranked) - 1)
        low = int(rank)
        high = min(low + 1, len(ranked) - 1)
        return ranked[low] + (rank - low) * (ranked[high] - ranked[low])

    assert summary["min"] == pytest.approx(10.0) and summary["max"] == pytest.approx(100.0)
    assert summary["mean"] == pytest.approx(40.0)  # the median is 30: the mean must not be it
    for p in PERCENTILES:
        assert summary[f"p{p}"] == pytest.approx(percentile(p))
    assert summary["p50"] == pytest.approx(30.0)


def _stat(busy_ticks: dict[int, tuple[int, ...]]) -> str:
    """A /proc/stat text: the total line, then one line per CPU (user nice system idle iowait irq softirq steal guest
    guest_nice), plus a line that is not a CPU."""
    total = [sum(v[i] for v in busy_ticks.values()) for i in range(10)]
    lines = ["cpu  " + " ".join(map(str, total))]
    lines += [f"cpu{n} " + " ".join(map(str, v)) for n, v in sorted(busy_ticks.items())]
    return "\n".join(lines + ["intr 12345 0 0", "ctxt 999"]) + "\n"


def test_other_cpu_use_counts_busy_ticks_on_its_own_cores_less_its_own_time(tmp_path, monkeypatch):
    """Worked by hand: over 2 s, the process's cores 0 and 1 gain 300 busy ticks (user 100 + system 50 + irq 10 +
    softirq 20 + steal 20 on cpu0, user 100 on cpu1; idle, iowait and guest, which user already holds, do not count;
    cpu2 is not the process's), 3.0 s at 100 ticks/s; the process itself used 1.0 s: other work kept 1.0 core busy."""
    from hsnet_deploy import machine

    stat = tmp_path / "stat"
    zeros = (0,) * 10
    stat.write_text(_stat({0: zeros, 1: zeros, 2: zeros}))
    clock = {"wall": 100.0, "own": 5.0}
    monkeypatch.setattr(machine, "STAT", stat)
    monkeypatch.setattr(machine, "_cpus", lambda: frozenset({0, 1}))
    monkeypatch.setattr(machine.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(machine.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(machine.time, "process_time", lambda: clock["own"])
    use = machine.OtherCpuUse()
    stat.write_text(_stat({0: (100, 0, 50, 500, 40, 10, 20, 20, 30, 0), 1: (100, 0, 0, 100, 0, 0, 0, 0, 0, 0),
                           2: (900, 0, 0, 0, 0, 0, 0, 0, 0, 0)}))
    clock.update(wall=102.0, own=6.0)
    assert use.cores() == pytest.approx(1.0)
    clock.update(wall=100.3)  # too short a span to tell a quarter of a core apart
    assert use.cores() is None
    monkeypatch.setattr(machine, "STAT", tmp_path / "missing")  # not Linux
    assert machine.OtherCpuUse().cores() is None


def test_bench_reports_other_work_per_runner_and_notes_a_busy_one(exported, tmp_path, monkeypatch):
    """Through `bench` itself: the figure reaches --json per runner, and a busy runner gets its note."""
    from hsnet_deploy import machine

    path, _, _ = exported("resnet50")
    monkeypatch.setattr(machine.OtherCpuUse, "cores", lambda self: 1.0)
    report = tmp_path / "b.json"
    code, _, err = run_cli("bench", str(path), "--iters", "1", "--warmup", "0", "--no-stages", "--device", "cpu",
                           "--json", str(report))
    assert code == 0, err
    results = json.loads(report.read_text())["results"]
    assert results and all(r["other_cpu_cores"] == 1.0 for r in results)
    flat = " ".join(err.split())
    assert flat.count("other work kept 1.00 of") == len(results) and str(path) in flat


def test_a_runner_timed_on_a_busy_machine_gets_a_note():
    from hsnet_deploy.runtime.bench import BenchResult
    from hsnet_deploy.runtime.suite import busy_machine_notes

    quiet = BenchResult("onnxruntime-cpu fp32", "onnxruntime", "cpu", "fp32", "m.onnx", 1, 1, other_cpu_cores=0.1)
    busy = BenchResult("pytorch-cpu fp32", "pytorch", "cpu", "fp32", "eager", 1, 1, other_cpu_cores=1.0)
    unknown = BenchResult("x", "onnxruntime", "cpu", "fp32", "m.onnx", 1, 1)
    notes = busy_machine_notes([quiet, busy, unknown])
    assert len(notes) == 1 and "kept 1.00 of" in notes[0] and "pytorch-cpu fp32" in notes[0]


def test_ort_stage_profile_leaves_out_the_warm_up_run_and_averages_the_rest():
    """ONNX Runtime's trace lists each run's node events before that run's model_run event: the first run (it warms
    up: allocations, algorithm searches) is left out and the other runs averaged."""
    from types import SimpleNamespace

    from hsnet_deploy.runtime.ort_runner import OrtRunner

    def node(name, us):
        return {"cat": "Node", "name": f"{name}_kernel_time", "dur": us}

    events = [node("conv_a", 900_000), node("conv_b", 900_000), {"cat": "Session", "name": "model_run"}]
    for _ in range(3):
        events += [node("conv_a", 1000), node("conv_b", 3000), {"cat": "Session", "name": "model_run"}]
    runner = object.__new__(OrtRunner)
    runner.cuda_graph = False
    runner.info = SimpleNamespace(metadata={"stages": {"backbone": ["conv_a"], "learner": ["conv_b"]}})
    runner._profiled_events = lambda feed, runs: events if runs == 4 else []
    stages = runner.profile_stages_impl({}, runs=3)
    assert stages == pytest.approx({"backbone": 1e-3, "learner": 3e-3})


def test_session_options_map_each_level_threads_and_profiling():
    import onnxruntime as ort

    from hsnet_deploy.runtime.ort_options import session_options

    levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    for name, level in levels.items():
        assert session_options(name).graph_optimization_level == level
    opts = session_options("basic", threads=3, optimized_path="/tmp/x.onnx", profile_prefix="/tmp/prof")
    assert opts.intra_op_num_threads == 3 and opts.optimized_model_filepath == "/tmp/x.onnx"
    assert opts.enable_profiling and opts.profile_file_prefix == "/tmp/prof"
    assert not session_options().enable_profiling and session_options().intra_op_num_threads == 0
    with pytest.raises(ValueError, match="optimisation level 'max'"):
        session_options("max")
