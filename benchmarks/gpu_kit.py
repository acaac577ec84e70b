"""Pack what a session lent a GPU carries to it, and print the device calls in order (../shared/docs/gpu.md).

The lent machine has no registry and each call carries at most 64 MiB, so onnxruntime-gpu and the ONNX files
travel as numbered parts, one per call; the torch half of `benchmarks/gpu.py` starts in the first call and runs
while the other parts travel; the call with the last part runs the ONNX Runtime half, one more call `bench`. Everything goes under .gpu/ (git-ignored):

    .gpu/resnet50-400.onnx, .gpu/resnet50-400-fp16.onnx   the FP32 export and its gated FP16 variant (seed 0)
    .gpu/resnet50-400-nodil-fp16.onnx   the FP16 variant of the export with conv1 not dilated (NODIL_LAYOUT)
    .gpu/site.tar.xz     the package folders of onnxruntime-gpu and onnxslim for the machine's Python
    .gpu/parts/partNN    one tar of the four, split into pieces of --part-mb
    .gpu/kit.json        the commit it was built at, the bundle's sha256, the calls

    python benchmarks/gpu_kit.py            # build (reuses ONNX files built at the same model code)
    python benchmarks/gpu_kit.py --calls    # print the calls of the kit already built

Written here, not taken from a tool: the steps are this project's own transfer limits (gpu.md), a few lines each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / ".gpu"
WHEELS = ("onnxruntime-gpu==1.31.1", "onnxslim")
MACHINE_PYTHON = "3.12"  # the lent machine's Python (gpu.md)
MODEL_CODE = ("hsnet_deploy/model", "hsnet_deploy/export", "hsnet_deploy/calibration")


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def model_code_commit() -> str:
    """The last commit that changed the code an export depends on, or 'dirty' when that code has edits."""
    if sh("git", "status", "--porcelain", "--", *MODEL_CODE):
        return "dirty"
    return sh("git", "log", "-1", "--format=%H", "--", *MODEL_CODE)


def package_members(wheel: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """A wheel's files minus its scripts and data folders: what a site-packages folder holds."""
    return [i for i in wheel.infolist() if not i.is_dir() and ".data/" not in i.filename]


def pack_site(wheels: list[Path], out: Path, preset: int = 6) -> None:
    """The wheels' package files as one xz tarball that unpacks into a folder for PYTHONPATH."""
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=preset) as tar:
        for path in wheels:
            with zipfile.ZipFile(path) as wheel:
                for info in package_members(wheel):
                    entry = tarfile.TarInfo(info.filename)
                    entry.size = info.file_size
                    entry.mode = 0o755 if info.filename.endswith(".so") or ".so." in info.filename else 0o644
                    with wheel.open(info) as data:
                        tar.addfile(entry, data)
    tmp.replace(out)


def split_bundle(files: list[Path], parts_dir: Path, part_bytes: int) -> tuple[list[Path], str]:
    """One uncompressed tar of `files` (flat names), cut into parts of at most part_bytes; its sha256."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob("part*"):
        old.unlink()
    bundle = parts_dir / "bundle.tar"
    with tarfile.open(bundle, "w") as tar:
        for path in files:
            tar.add(path, arcname=path.name)
    digest = hashlib.sha256()
    parts: list[Path] = []
    with open(bundle, "rb") as src:
        while chunk := src.read(part_bytes):
            digest.update(chunk)
            part = parts_dir / f"part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    bundle.unlink()
    return parts, digest.hexdigest()


def device_calls(parts: list[str], sha256: str, onnx: str, fp16: str, layout_files: tuple[str, ...] = ()) -> list[dict]:
    """The `run` calls in order: each copies its part to /tmp/parts; the first starts the torch half in the
    background; the one with the last part checks and unpacks the bundle, waits for the torch half and runs the
    product's own `bench` at B = 1 and 8 (the headline figures, first because a session's device time may end
    before the last call); the next runs the ONNX Runtime half of gpu.py (the CUDA EP options, prefer_nhwc) and a
    last one `gpu_layouts.py` on both files and `layout_files` (other export layouts), with the GPU kernels at
    B = 8 and 1. Everything lands in $OUT; no call needs more than its own limit if an earlier one ran long."""
    keep = "mkdir -p /tmp/parts; cp {p} /tmp/parts/"
    calls = []
    for i, part in enumerate(parts):
        cmd = keep.format(p=part)
        if i == 0:
            # PYTHONPATH: `python3 benchmarks/gpu.py` puts benchmarks/ on the path, not the project root
            cmd += ("; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; PYTHONPATH=$PWD setsid nohup python3 "
                    "benchmarks/gpu.py --part torch --out /tmp/gpu-out > /tmp/gpu-torch.log 2>&1 < /dev/null &"
                    " echo $! > /tmp/torch.pid; sleep 1; ls -l /tmp/parts")
        elif i < len(parts) - 1:
            cmd += "; ls -l /tmp/parts; tail -n 2 /tmp/gpu-torch.log"
        calls.append({"carry": [part], "command": cmd, "timeout_s": 120})
    stage = "/tmp/stage"
    calls[-1]["command"] += (
        f"; mkdir -p {stage} /tmp/site; cat /tmp/parts/part* > /tmp/bundle.tar"
        f"; sha256sum /tmp/bundle.tar | grep -q {sha256} && echo 'bundle sha256 ok' || echo 'BUNDLE SHA256 MISMATCH'"
        f"; tar -xf /tmp/bundle.tar -C {stage}"
        f"; python3 -c \"import tarfile; tarfile.open('{stage}/site.tar.xz').extractall('/tmp/site')\""
        "; while kill -0 $(cat /tmp/torch.pid) 2> /dev/null; do sleep 3; done"  # the torch half, started in call 1
        "; cp /tmp/gpu-out/gpu-torch.* /tmp/gpu-torch.log $OUT/"
        # SIGINT: bench prints and writes what it measured so far
        f"; for b in 1 8; do PYTHONPATH=/tmp/site:$PWD timeout -s INT 140 python3 -m hsnet_deploy bench"
        f" {stage}/{onnx} {stage}/{fp16} --device cuda --cuda-graph --no-stages -b $b -n 30"
        " --json $OUT/bench-b$b.json > $OUT/bench-b$b.txt 2>&1; done; grep -hv 'Fallback\\|━' $OUT/bench-b*.txt"
    )
    calls[-1]["timeout_s"] = 590
    calls.append({"carry": [], "timeout_s": 400, "command": (
        # 120 s: the matrix ran in full on 2026-11-27; what is new there is the prefer_nhwc rows and the defaults
        f"PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --part ort --out $OUT --onnx {stage}/{onnx}"
        f" --fp16-onnx {stage}/{fp16} --budget-s 120")})
    # the GPU kernels at B = 8 (where the bytes are) and B = 1 (where the time is not in the bytes: docs, run 4)
    files = " ".join(f"{stage}/{f}" for f in (onnx, fp16, *layout_files))
    calls.append({"carry": [], "timeout_s": 330, "command": (
        f"PYTHONPATH=/tmp/site:$PWD timeout 310 python3 benchmarks/gpu_layouts.py --out $OUT --batches 8 1"
        f" --kernel-batches 8 1 --iters 20 --budget-s 240 {files} 2>&1 | grep -v Fallback | tail -n 120")})
    return calls


def build_onnx(onnx: Path, fp16: Path, layout: str = "all") -> None:
    """The FP32 export at `layout` (--layout) and its gated FP16 variant."""
    cli = [sys.executable, "-m", "hsnet_deploy"]
    subprocess.run([*cli, "export", "--backbone", "resnet50", "--img-size", "400", "--seed", "0", "--layout", layout,
                    "-o", str(onnx)], check=True, cwd=ROOT)
    subprocess.run([*cli, "build-engine", str(onnx), "--backend", "onnxruntime", "--fp16", "-o", str(fp16)],
                   check=True, cwd=ROOT)


# The FP16 variant of an export whose conv1 is not dilated: cuDNN ran the FP16 variant's convolutions on SIMT
# kernels, not tensor cores (H200 profile, docs/benchmarks.md); whether the dilation by Hs'*Ws' is the reason
# is what the kernels of the two FP16 files answer.
NODIL_LAYOUT = "halo,support_major_mixing,single_bias"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part-mb", type=float, default=62.0, help="Part size in MB (the carry limit is 64 MiB "
                        "with the working tree).")
    parser.add_argument("--calls", action="store_true", help="Only print the calls of the kit already built.")
    args = parser.parse_args()
    manifest_path = KIT / "kit.json"
    if args.calls:
        print(json.dumps(json.loads(manifest_path.read_text())["calls"], indent=1))
        return
    KIT.mkdir(exist_ok=True)
    (KIT / ".gitignore").write_text("*\n")  # keeps the kit out of git status and of what a call carries
    onnx, fp16 = KIT / "resnet50-400.onnx", KIT / "resnet50-400-fp16.onnx"
    nodil16 = KIT / "resnet50-400-nodil-fp16.onnx"
    commit = model_code_commit()
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if commit == "dirty" or old.get("model_code_commit") != commit or not all(p.exists() for p in (onnx, fp16, nodil16)):
        build_onnx(onnx, fp16)
        nodil = KIT / "nodil.tmp.onnx"
        build_onnx(nodil, nodil16, NODIL_LAYOUT)
        nodil.unlink()
    site = KIT / "site.tar.xz"
    if not site.exists():
        dl = KIT / "dl"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--python-version", MACHINE_PYTHON, "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "-d", str(dl), *WHEELS], check=True)
        print("packing the wheels (xz, a few minutes on 2 cores)", flush=True)
        pack_site(sorted(dl.glob("*.whl")), site)
    parts, sha256 = split_bundle([site, onnx, fp16, nodil16], KIT / "parts", int(args.part_mb * 1e6))
    rel = [str(p.relative_to(ROOT)) for p in parts]
    calls = device_calls(rel, sha256, onnx.name, fp16.name, (nodil16.name,))
    manifest = {"model_code_commit": commit, "bundle_sha256": sha256, "parts": rel,
                "bytes": {p.name: p.stat().st_size for p in (site, onnx, fp16, nodil16)}, "calls": calls}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(f"{len(parts)} parts under {KIT / 'parts'}; calls:")
    print(json.dumps(calls, indent=1))


if __name__ == "__main__":
    main()
