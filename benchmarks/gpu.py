"""The GPU matrix (issue: measured on a real GPU): resnet50 and resnet101, 400x400, B = 1 and 8, K = 1 and 5,
PyTorch CUDA FP32 / FP16 autocast and ONNX Runtime CUDA (FP32, plus any variant ONNX given), with per-stage
breakdown; optionally ONNX Runtime CUDA graphs for B = 1. Writes one JSON per configuration to --out (the
device tool brings back $OUT) and a markdown section to docs/benchmarks.md when --record is given.

Run on the GPU machine from source, e.g.
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu.py --out $OUT --iters 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from record import md_table, record

from hsnet_deploy.cli import _quiet_exporters
from hsnet_deploy.export import export_onnx
from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.suite import run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--variants", nargs="*", type=Path, default=[], help="Extra ONNX (e.g. FP16) per backbone.")
    parser.add_argument("--cuda-graph", action="store_true", help="Also ONNX Runtime CUDA graphs at B = 1.")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark is for the GPU machine")
    _quiet_exporters()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for backbone in args.backbones:
        onnx_path = args.out.parent / f".{backbone}-400.onnx"
        if not onnx_path.exists():
            export_onnx(seeded_model(backbone), onnx_path, 400, source={"weights": "seeded-random", "seed": 0})
        paths = [onnx_path, *[v for v in args.variants if backbone in v.name]]
        for batch in (1, 8):
            for shots in (1, 5):
                for graph in ([False, True] if args.cuda_graph and batch == 1 else [False]):
                    suite = run_suite(paths, batch=batch, shots=shots, iters=args.iters, warmup=5, device="cuda",
                                      threads=None, backbone=None, stages=True, cuda_graph=graph, default=False)
                    name = f"{backbone}-b{batch}-k{shots}{'-graph' if graph else ''}.json"
                    (args.out / name).write_text(json.dumps(suite.to_dict(), indent=1, default=str))
                    for r in suite.results:
                        lat = r.latency_ms
                        rows.append([backbone, batch, shots, r.label + (" graph" if graph else ""), lat["mean"],
                                     lat["p50"], lat["p99"], r.episodes_per_s, r.device_mem_mb,
                                     r.speedup_vs_eager, r.stages_ms.get("learner")])
                    print(rows[-1], flush=True)
    body = md_table(["backbone", "B", "K", "runner", "mean ms", "p50", "p99", "episodes/s", "device MB",
                     "vs eager FP32", "learner ms"], rows)
    body += f"\n\nGPU: {torch.cuda.get_device_name(0)}"
    (args.out / "gpu.md").write_text(body)
    if args.record:
        record("gpu", "GPU: PyTorch CUDA vs ONNX Runtime CUDA", body)


if __name__ == "__main__":
    main()
