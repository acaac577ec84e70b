"""benchmarks/gpu.py's dry run on the CPU: the plan, the JSON a GPU session brings back, skips with reasons."""

import json
import os
import re
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
    assert {"prefer_nhwc": "1"} in sweep and {"use_tf32": "0"} in sweep  # use_tf32=0: the strict-FP32 parity row
    assert {"cudnn_conv_algo_search": "EXHAUSTIVE"} in sweep and {"cudnn_conv_use_max_workspace": "0"} in sweep
    assert not any("fuse_conv_bias" in o for o in sweep)
    assert all(len(o) == 1 and CUDA_EP_DEFAULTS[k] != v for o in sweep for k, v in o.items())


def _kit():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_kit

    return gpu_kit


def test_gpu_kit_parts_reassemble_into_the_files_and_the_site_folder(tmp_path):
    """The parts a GPU session carries, cat'ed and untarred as the last call does, give back every file byte
    for byte, and the xz site tarball unpacks into importable package folders without the wheel's .data/."""
    import hashlib
    import tarfile
    import zipfile

    kit = _kit()
    wheel = tmp_path / "pkg-1.0-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "VALUE = 7\n")
        z.writestr("pkg/capi/libpkg.so.1", os.urandom(3000))
        z.writestr("pkg-1.0.dist-info/METADATA", "Name: pkg\n")
        z.writestr("pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    site = tmp_path / "site.tar.xz"
    kit.pack_site([wheel], site, preset=1)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(os.urandom(25_000))
    parts, sha = kit.split_bundle([site, onnx], tmp_path / "parts", part_bytes=7_000)
    assert len(parts) >= 4 and all(p.stat().st_size <= 7_000 for p in parts)
    joined = b"".join(p.read_bytes() for p in sorted(parts))
    assert hashlib.sha256(joined).hexdigest() == sha
    (tmp_path / "bundle.tar").write_bytes(joined)
    stage = tmp_path / "stage"
    with tarfile.open(tmp_path / "bundle.tar") as tar:
        tar.extractall(stage, filter="data")
    assert (stage / "m.onnx").read_bytes() == onnx.read_bytes()
    with tarfile.open(stage / "site.tar.xz") as tar:
        tar.extractall(tmp_path / "site", filter="data")
    names = {str(p.relative_to(tmp_path / "site")) for p in (tmp_path / "site").rglob("*") if p.is_file()}
    assert names == {"pkg/__init__.py", "pkg/capi/libpkg.so.1", "pkg-1.0.dist-info/METADATA"}
    run = subprocess.run([sys.executable, "-c", "import pkg; print(pkg.VALUE)"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, check=True)
    assert run.stdout.strip() == "7"


def test_gpu_kit_calls_carry_one_part_each_and_fit_the_device_tool():
    kit = _kit()
    parts = [f".gpu/parts/part{i:02d}" for i in range(6)]
    calls = kit.device_calls(parts, "f" * 64, "a.onnx", "a-fp16.onnx", ("b-fp16.onnx",))
    assert [c["carry"] for c in calls] == [[p] for p in parts] + [[], []]
    assert all(len(c["command"]) <= 2000 and c["timeout_s"] <= 600 for c in calls)
    assert "--part torch" in calls[0]["command"] and "/tmp/torch.pid" in calls[0]["command"]
    last_part = calls[-3]["command"]
    # waits on the torch half by its pid (a pattern match would also match this very shell's command line)
    assert "kill -0 $(cat /tmp/torch.pid)" in last_part and "pgrep" not in last_part
    # the headline first, once the torch half has left the GPU: the product's own bench at B = 1 and 8
    assert "f" * 64 in last_part and last_part.index("hsnet_deploy bench") > last_part.index("kill -0")
    assert "--cuda-graph" in last_part and "for b in 1 8" in last_part
    assert not any("hsnet_deploy bench" in c["command"] for c in calls[:-3] + calls[-2:])
    assert "--part ort" in calls[-2]["command"] and not any("--part ort" in c["command"] for c in calls[:-2])
    # then the layouts: all three files, kernels at B = 8 and 1, stopped by its own timeout inside the call's
    layouts = calls[-1]["command"]
    assert "gpu_layouts.py" in layouts and "--kernel-batches 8 1" in layouts and "--batches 8 1" in layouts
    assert all(f"/tmp/stage/{f}" in layouts for f in ("a.onnx", "a-fp16.onnx", "b-fp16.onnx"))
    inner = int(re.search(r"timeout (\d+) python3 benchmarks/gpu_layouts", layouts).group(1))
    assert inner < calls[-1]["timeout_s"]
    # every Python run finds the project (the first kit's torch half did not: ModuleNotFoundError on the H200)
    for call in calls:
        for run in re.findall(r"(\S*)\s+(?:setsid nohup |timeout (?:-s INT )?\d+ )?python3 (?:benchmarks|-m hsnet_deploy)",
                              call["command"]):
            assert run.startswith("PYTHONPATH=") and "$PWD" in run, call["command"]


def test_gpu_layouts_dry_run_times_each_export_and_checks_parity(exported, tmp_path):
    path, _, _ = exported("resnet50")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_layouts.py"), "--device", "cpu", "--batches", "1",
         "--iters", "2", "--warmup", "0", "--out", str(tmp_path), str(path)],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-layouts.json").read_text())
    [row] = data["rows"]
    assert row["layout"] == "all" and row["precision"] == "fp32" and row["B"] == 1
    assert row["max_rel_logit_err"] < 1e-4 and row["latency_ms"]["p50"] > 0
    assert "kernels" not in data  # CUPTI kernels only on a GPU
    assert f"| {path.name} [all, fp32] | 1 |" in (tmp_path / "gpu-layouts.md").read_text()


def test_gpu_layouts_sorts_kernels_into_kinds():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_layouts import kernel_kind
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert kernel_kind("sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw_tilesize256x64x8") == "convolution"
    assert kernel_kind("void cudnn::cnn::conv2d_grouped_direct_kernel<false, true>") == "convolution"
    assert kernel_kind("void implicit_convolve_sgemm<__half, __half, 128, 6, 7>") == "convolution"
    assert kernel_kind("void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nn_align1>") == "gemm"
    assert kernel_kind("void reduce_tensor_kernel_free<float, 8, 16, 1, 1>") == "other"


def test_gpu_layouts_refuses_kernel_batches_it_does_not_time(exported):
    path, _, _ = exported("resnet50")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_layouts.py"), "--device", "cpu", "--batches", "1",
         "--kernel-batches", "8", "--out", "/nonexistent/never-written", str(path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=False)
    assert run.returncode != 0 and "Error: --kernel-batches [8] must be among --batches [1]" in run.stderr
