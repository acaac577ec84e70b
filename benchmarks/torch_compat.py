"""Export every backbone with B and K dynamic under each torch of the supported range, one venv per torch.

Each venv needs torch, onnx, onnxscript, onnxruntime, onnxslim, click, rich, pillow and pytest (the
project itself runs from this checkout through PYTHONPATH). For each: `hsnet-deploy export` of every
backbone at --size (verification included) and tests/test_export_dynamic.py.

    python benchmarks/torch_compat.py /path/venv211/bin/python /path/venv212/bin/python python3 --record
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from record import md_table, record

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("resnet50", "vgg16", "resnet101")


def run(python: str, *args: str) -> tuple[int, str, float]:
    """Exit code, last line of output, seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([python, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines() or [""]
    return proc.returncode, lines[-1], time.perf_counter() - start


def torch_version(python: str) -> str:
    return subprocess.run([python, "-c", "import torch; print(torch.__version__)"], check=False, capture_output=True,
                          text=True).stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pythons", nargs="+", help="Python interpreters, one per torch version.")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--record", action="store_true", help="Write the table into docs/benchmarks.md.")
    parser.add_argument("--section", default="torch_compat",
                        help="docs/benchmarks.md section to (re)write; one per image size keeps both.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for python in args.pythons:
            version = torch_version(python)
            for backbone in args.backbones:
                out = Path(tmp) / f"{backbone}.onnx"
                code, last, secs = run(python, "-m", "hsnet_deploy", "export", "--backbone", backbone,
                                       "--img-size", str(args.size), "--json", str(out) + ".json", "-o", str(out))
                worst = ""
                if code == 0:
                    checks = json.loads(Path(str(out) + ".json").read_text())["checks"]
                    worst = f"worst rel. error {max(e['rel'] for c in checks for e in c['errors']):.1e}"
                rows.append([version, f"export {backbone}", "ok" if code == 0 else f"FAILED: {last[:60]}",
                             worst, round(secs)])
                print(rows[-1], flush=True)
            code, last, secs = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "tests/test_export_dynamic.py")
            rows.append([version, "tests/test_export_dynamic.py", "ok" if code == 0 else "FAILED", last, round(secs)])
            print(rows[-1], flush=True)
    table = md_table(["torch", "check", "result", "detail", "seconds"], rows)
    print(table)
    if args.record:
        record(args.section, f"Export across the supported torch range at {args.size}x{args.size}",
               f"{table}\n\nImage size {args.size}, B and K dynamic, export verification at 1e-4 included.")


if __name__ == "__main__":
    main()
