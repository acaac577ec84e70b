"""benchmarks/gpu.py's dry run on the CPU: the plan, the JSON a GPU session brings back, skips with reasons."""

import json
import os
import subprocess
import sys

from conftest import EXPORT_SIZE, ROOT


def test_gpu_matrix_dry_run_writes_the_json_a_gpu_session_brings_back(exported, tmp_path):
    path, _, _ = exported("resnet50")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--size", str(EXPORT_SIZE),
         "--batches", "1", "2", "--iters", "2", "--warmup", "0", "--compile-backend", "eager", "--onnx", str(path),
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-all.json").read_text())
    assert data["errors"] == []
    rows = {(r["runner"], r["B"]): r for r in data["rows"]}
    assert set(rows) == {(name, b) for b in (1, 2) for name in (
        "pytorch eager fp32", "torch.compile reduce-overhead fp32", "onnxruntime-cpu fp32")}
    for r in rows.values():
        assert 0 < r["latency_ms"]["min"] <= r["latency_ms"]["p50"] <= r["latency_ms"]["max"]
        assert r["episodes_per_s"] > 0 and r["cold_ms"] > 0
    for b in (1, 2):
        assert rows[("torch.compile reduce-overhead fp32", b)]["compile_s"] > 0
        ort = rows[("onnxruntime-cpu fp32", b)]
        assert ort["max_rel_logit_err"] < 1e-4 and ort["mask_agreement"] > 0.999  # parity vs eager, TF32 off
    skipped = " ".join(f"{s['runner']}: {s['reason']}" for s in data["skipped"])
    assert "onnxruntime-cuda (host I/O, device I/O, CUDA graphs, EP options): no CUDA GPU" in skipped
    assert "fp16 autocast: FP16 autocast is for CUDA" in skipped
    assert data["config"]["batches"] == [1, 2] and data["machine"]["torch"]
    table = (tmp_path / "gpu-all.md").read_text()
    assert "| onnxruntime-cpu fp32 | 2 |" in table


def test_ep_sweep_changes_one_option_at_a_time_from_the_defaults():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu import ep_sweep
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from hsnet_deploy.runtime.ort_cuda import CUDA_EP_DEFAULTS

    sweep = ep_sweep()
    assert {"prefer_nhwc": "1"} in sweep and {"use_tf32": "1"} in sweep
    assert {"cudnn_conv_algo_search": "HEURISTIC"} in sweep and {"cudnn_conv_use_max_workspace": "0"} in sweep
    assert all(len(o) == 1 and CUDA_EP_DEFAULTS[k] != v for o in sweep for k, v in o.items())
