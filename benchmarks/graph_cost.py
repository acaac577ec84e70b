"""Bytes moved by the layout and elementwise nodes of exported graphs, per HSNet stage, with no GPU.

For each ONNX artifact (default: the embedded resnet50 at --size) and each batch size: node counts by kind
(compute = convs and MatMuls, view = Reshape-like aliases, memory = everything else) and the MB read plus
written by the memory nodes, from shape inference at K = --shots. On a GPU these nodes are each a kernel
over the large 4D tensors, so their traffic is what a graph restructuring has to cut.

    python benchmarks/graph_cost.py [MODEL.onnx ...] [--batches 1 8] [--record NAME --title TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx
from record import md_table, record

from hsnet_deploy.artifacts import props_to_meta, stage_of_node
from hsnet_deploy.export.cost import node_costs, summarise

MB = 1e6
FOCUS = ("correlation", "learner")  # the stages the 4D restructuring is about


def measure(path: Path, batches: list[int], shots: int) -> dict:
    proto = onnx.load(str(path))
    meta = props_to_meta({p.key: p.value for p in proto.metadata_props})
    out = {"path": str(path), "precision": meta.get("precision", "fp32"), "img_size": meta.get("img_size"),
           "backbone": meta.get("backbone"), "shots": shots, "batches": {}}
    for batch in batches:
        summary = summarise(node_costs(proto, batch, shots, stage_of_node(meta)))
        out["batches"][str(batch)] = {stage: cost.to_dict() for stage, cost in summary.items()}
    return out


def rows(result: dict) -> list[list[object]]:
    table = []
    name = Path(result["path"]).name
    for batch, stages in result["batches"].items():
        focus = sum(stages[s]["memory_bytes"] for s in FOCUS if s in stages)
        for stage, cost in stages.items():
            top = ", ".join(f"{op} {b / MB:.0f}" for op, b in list(cost["memory_bytes_by_op"].items())[:3])
            table.append([name, result["precision"], batch, stage, cost["nodes"]["memory"], cost["nodes"]["view"],
                          cost["nodes"]["compute"], round(cost["memory_bytes"] / MB, 1), top])
        table.append([name, result["precision"], batch, "correlation+learner", "", "", "", round(focus / MB, 1), ""])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="ONNX artifacts [default: the embedded resnet50].")
    parser.add_argument("--size", type=int, default=400, help="Image size of the default model.")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--json", type=Path, help="Write the full per-stage, per-op figures here.")
    parser.add_argument("--record", help="Section name in docs/benchmarks.md to write the table into.")
    parser.add_argument("--title", default="Graph cost: bytes moved by non-conv, non-MatMul nodes")
    parser.add_argument("--note", default="", help="Text under the table in docs/benchmarks.md.")
    args = parser.parse_args()
    if not args.models:
        from hsnet_deploy.defaults import default_artifact

        args.models = [default_artifact(args.size)]
    results = [measure(p, args.batches, args.shots) for p in args.models]
    header = ["model", "precision", "B", "stage", "memory nodes", "views", "convs+matmuls", "MB moved",
              "top ops (MB)"]
    table = md_table(header, [r for res in results for r in rows(res)])
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.record:
        body = (f"{table}\n\nK = {args.shots}. MB moved = bytes read + written by memory nodes (not convs, MatMuls or "
                f"views), from ONNX shape inference. {args.note}")
        record(args.record, args.title, body)


if __name__ == "__main__":
    main()
