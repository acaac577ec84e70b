"""torch -> ONNX for HSNet: dynamic B and K, fixed H and W, verified against PyTorch before anything is written.

Exporter choice: torch.onnx's dynamo exporter (torch.export + onnxscript), opset 20 by default.
- It keeps B and K symbolic through every reshape of the 6D center-pivot decomposition, where the
  TorchScript exporter bakes traced sizes into Reshape constants unless each view is rewritten.
- It emits no custom ops, no Loop/If and no 3D/4D Conv: each center-pivot conv is two 2D Convs
  between Transposes/Reshapes, which ONNX Runtime and TensorRT's parser (10.x, 11.x) both take.
- Opset 20 is the exporter's default and within what ONNX Runtime 1.31 and TensorRT 10/11 parse;
  GroupNorm is written out by the model (two-stage ReduceMean), so GroupNormalization-21, which fails
  to build in some TensorRT 10 releases, never appears.
- torch.export specialises a dynamic dim whose example size is 1, so examples use B = K = 2.
- onnxslim then folds BatchNorm into the convs and cancels transpose pairs: 808 -> 741 nodes for resnet50
  with the same ONNX Runtime latency (ORT fuses these itself at load) but a smaller graph for TensorRT's
  parser and for people reading it. It runs before verification, so what is verified is what ships.
  (The model runs queries and supports through one backbone pass, so the folded weights exist once.)
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from hsnet_deploy.artifacts import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    PREPROCESSING,
    atomic_path,
    check_output_path,
    meta_to_props,
    tool_versions,
)
from hsnet_deploy.errors import UserError
from hsnet_deploy.export.stages import label_stages
from hsnet_deploy.export.verify import FP32_REL_TOL, PYRAMID_NAMES, EpisodeCheck, verify_onnx
from hsnet_deploy.model import ExportLayout, HSNet, check_image_size, kshot_vote

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the dynamo exporter's floor


class _WithPyramid(nn.Module):
    """The exported graph plus the three hypercorrelation tensors as extra outputs, for verification.

    The written model is this same graph with those outputs dropped, so what was verified is what ships.
    """

    def __init__(self, model: HSNet):
        super().__init__()
        self.model = model

    def forward(self, query_img, support_imgs, support_masks):
        b, k = support_imgs.shape[:2]
        h, w = query_img.shape[-2:]
        logits, pyramid = self.model.support_logits(query_img, support_imgs, support_masks)
        logits = logits.reshape(b, k, 2, h, w)
        return (logits, kshot_vote(logits), *pyramid)


@dataclass
class ExportReport:
    path: str
    backbone: str
    img_size: int
    opset: int
    seconds: float = 0.0
    file_bytes: int = 0
    nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    checks: list[EpisodeCheck] = field(default_factory=list)
    tolerance: float = FP32_REL_TOL
    stage_nodes: dict[str, int] = field(default_factory=dict)
    nodes_traced: int = 0

    @property
    def passed(self) -> bool:
        return all(c.worst_rel() <= self.tolerance for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "path": self.path, "backbone": self.backbone, "img_size": self.img_size, "opset": self.opset,
            "seconds": round(self.seconds, 2), "file_bytes": self.file_bytes, "nodes": self.nodes,
            "nodes_traced": self.nodes_traced,
            "op_counts": self.op_counts, "stage_nodes": self.stage_nodes, "tolerance": self.tolerance, "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks],
        }


def check_opset(opset: int) -> None:
    """Refuse an opset this torch cannot export (checked before any work: the CLI calls it before loading weights)."""
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: the exporter needs opset {MIN_OPSET} or newer")
    newest = newest_opset()
    if newest is not None and opset > newest:
        raise UserError(f"--opset {opset}: this torch {torch.__version__} exports opset {newest} at the newest")


def newest_opset() -> int | None:
    """The newest opset this torch's exporter writes, or None where torch does not say (a private constant, read
    defensively; the opset of the traced graph is checked after tracing in any case)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def _trace(model: HSNet, path: Path, img_size: int, opset: int) -> None:
    wrapper = _WithPyramid(model).eval()  # a new Module starts in training mode; the exporter warns on it
    example = (
        torch.randn(2, 3, img_size, img_size),
        torch.randn(2, 2, 3, img_size, img_size),
        torch.ones(2, 2, img_size, img_size),
    )
    batch = torch.export.Dim("B", min=1, max=1024)
    shots = torch.export.Dim("K", min=1, max=1024)
    dynamic = {"query_img": {0: batch}, "support_imgs": {0: batch, 1: shots}, "support_masks": {0: batch, 1: shots}}
    torch.onnx.export(
        wrapper, example, str(path), dynamo=True, opset_version=opset, input_names=list(INPUT_NAMES),
        output_names=[*OUTPUT_NAMES, *PYRAMID_NAMES], dynamic_shapes=dynamic, external_data=False,
        optimize=True, verbose=False,
    )


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    slim = onnxslim.slim(proto)
    onnx.checker.check_model(slim, full_check=True)
    return slim


def _drop_outputs(model_proto: onnx.ModelProto, names: tuple[str, ...]) -> None:
    """Drop the verification-only outputs, and the nodes and initializers only they needed.

    The export-mode learner reads the correlation in its own layouts, so the plain C4/C3/C2 tensors are
    views made for verification alone; the shipped graph must not compute them.
    """
    graph = model_proto.graph
    keep = [o for o in graph.output if o.name not in names]
    del graph.output[:]
    graph.output.extend(keep)
    needed = {o.name for o in keep}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    dead = len(graph.node) - len(live)
    if dead:
        del graph.node[:]
        graph.node.extend(reversed(live))
        inits = [i for i in graph.initializer if i.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(inits)


def check_onnx_structure(model_proto: onnx.ModelProto) -> None:
    """What the decomposition promises: only 2D convs, no loops, no custom domains."""
    weight_rank = {init.name: len(init.dims) for init in model_proto.graph.initializer}
    for node in model_proto.graph.node:
        if node.op_type == "Conv" and weight_rank.get(node.input[1], 4) != 4:
            raise RuntimeError(f"{node.name}: a {weight_rank[node.input[1]] - 2}D Conv in the exported graph "
                               "(every center-pivot 4D conv must be decomposed into 2D convs)")
        if node.domain not in ("", "ai.onnx"):
            raise RuntimeError(f"custom op {node.domain}::{node.op_type} in the exported graph")
        if node.op_type in ("Loop", "If", "Scan"):
            raise RuntimeError(f"control flow ({node.op_type}) in the exported graph")


def export_onnx(
    model: HSNet,
    out_path: str | os.PathLike,
    img_size: int = 400,
    opset: int = DEFAULT_OPSET,
    source: dict | None = None,
    tolerance: float = FP32_REL_TOL,
    simplify: bool = True,
    step: Callable[[str], None] = lambda _msg: None,
    layout: ExportLayout | None = None,
) -> ExportReport:
    """Export, check, verify against eager PyTorch, then write `out_path` atomically with its metadata.

    `source` describes the weights for the metadata: {"checkpoint_sha256": ...} or {"seed": N}.
    Raises UserError for bad arguments and RuntimeError for a graph that breaks the decomposition's
    promises; when verification fails it writes nothing and returns the report with `passed` False.
    """
    start = time.perf_counter()
    out = check_output_path(out_path)
    check_image_size(model.backbone_name, img_size, img_size)
    check_opset(opset)
    report = ExportReport(str(out), model.backbone_name, img_size, opset, tolerance=tolerance)
    layout = layout or ExportLayout()
    export_model = copy.deepcopy(model).eval().prepare_export(img_size, img_size, layout)

    with tempfile.TemporaryDirectory(prefix="hsnet-export-") as tmp:
        traced = Path(tmp) / "verify.onnx"
        step(f"tracing {model.backbone_name} at {img_size}x{img_size} (torch.export, opset {opset})")
        _trace(export_model, traced, img_size, opset)
        proto = onnx.load(str(traced))
        written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if written != opset:  # the exporter falls back without a word (e.g. --opset 30 gave opset 18)
            raise UserError(f"--opset {opset}: the exporter wrote opset {written} instead; choose {MIN_OPSET}.."
                            f"{newest_opset() or written}")

        step("checking the graph (onnx.checker full check, shape inference)")
        check_onnx_structure(proto)
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        stages = label_stages(proto, PYRAMID_NAMES, "logits")  # needs the exporter's node scopes
        report.nodes_traced = len(proto.graph.node)
        if simplify:
            proto = _simplify(proto)
        onnx.save(proto, str(traced))

        step("verifying against eager PyTorch in ONNX Runtime (logits, mask, C4, C3, C2)")
        report.checks = verify_onnx(str(traced), model, img_size, tolerance)
        if not report.passed:
            return report  # the caller reports the numbers; nothing is written

        _drop_outputs(proto, PYRAMID_NAMES)
        present = {n.name for n in proto.graph.node} | {o for n in proto.graph.node for o in n.output}
        stages = {stage: [n for n in names if n in present] for stage, names in stages.items()}
        node_names = {n.name for n in proto.graph.node}  # the map lists outputs too: count nodes only
        report.stage_nodes = {stage: sum(n in node_names for n in names) for stage, names in stages.items()}
        meta = {
            "format": "hsnet-deploy/onnx-v1",
            "backbone": model.backbone_name,
            "img_size": img_size,
            "precision": "fp32",
            "opset": opset,
            "simplified": "onnxslim" if simplify else "no",
            "layout": layout.label(),
            "mask_support": model.mask_support,
            "versions": tool_versions(),
            "preprocessing": PREPROCESSING,
            "verification": {"tolerance": tolerance, "worst_rel": max(c.worst_rel() for c in report.checks)},
            "stages": stages,
            **(source or {}),
        }
        onnx.helper.set_model_props(proto, meta_to_props(meta))
        proto.producer_name = "hsnet-deploy"
        step(f"writing {out}")
        with atomic_path(out) as tmp_out:
            onnx.save(proto, str(tmp_out))
    report.file_bytes = out.stat().st_size
    report.nodes = len(proto.graph.node)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    report.op_counts = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    report.seconds = time.perf_counter() - start
    return report
