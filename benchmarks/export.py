"""Export time, file size and node count per backbone at 400x400 (verification included in the time)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from record import md_table, record

from hsnet_deploy.defaults import quiet_exporters
from hsnet_deploy.export import export_onnx
from hsnet_deploy.model import seeded_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=400)
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50", "resnet101"])
    parser.add_argument("--keep", type=Path, help="Directory to keep the exported models in.")
    args = parser.parse_args()
    quiet_exporters()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for backbone in args.backbones:
            start = time.perf_counter()
            report = export_onnx(seeded_model(backbone), folder / f"{backbone}-{args.size}.onnx", args.size)
            worst = max(c.worst_rel() for c in report.checks)
            rows.append([backbone, time.perf_counter() - start, report.file_bytes / 2**20, report.nodes,
                         report.op_counts.get("Conv", 0), report.op_counts.get("MatMul", 0), f"{worst:.1e}"])
            print(rows[-1], flush=True)
    body = md_table(["backbone", "export s (incl. verification)", "file MiB", "nodes", "Conv", "MatMul",
                     "worst rel. error (logits, C4, C3, C2)"], rows)
    record("export", f"ONNX export at {args.size}x{args.size} (issue: ONNX export)", body)


if __name__ == "__main__":
    main()
