"""FP16: a mixed-precision ONNX model made with ModelOpt AutoCast, with named parts kept in FP32.

AutoCast is NVIDIA's documented path to strongly typed FP16 for TensorRT (no builder flags in
TensorRT 11): it rewrites initializers and inserts the Casts at FP16/FP32 boundaries so that every
tensor has one type. onnxconverter-common's `float16` was the alternative; it leaves Cast nodes whose
input is already the target type, which TensorRT 11's strongly typed parser rejects.

What stays FP32 (groups of `KEEP_FP32`, all on by default; `keep` changes them). Measured with
benchmarks/precision.py (balanced seeded resnet50, ONNX Runtime CPU):
- `mask`: the support-mask resize MatMuls and the mask factor (`mask_nodes`). Required by the spec: the
  exact zero pattern of PyTorch's resize decides which support positions count, and its residues go
  down to ~1e-11 (products of two ~4e-6 interpolation weights at an object's edge), below FP16's
  smallest subnormal 6e-8, so FP16 turns them into zeros (tests/test_precision.py builds such a mask).
  Such residues are rare (1 in ~50 random ellipse masks at 400 -> 50) and cost little when they flip,
  but keeping these small nodes FP32 costs nothing either. The Mul applying the factor to the stacked
  features runs in FP16 (see mask_nodes: the factor of a residue is well inside FP16's range).
- `l2norm`: ReduceL2 + Add(eps) + Div of the correlation. A precaution: the sum of squares over up to
  2048 pre-ReLU channels must not be accumulated in FP16 (max 65504). Measured on seeded weights it peaks
  at ~80, so the need could not be shown here; trained layer4 activations are far larger, and ONNX Runtime's
  CPU kernels compute in FP32 anyway, so only a GPU run with trained weights can tell.
- `groupnorm`: the learner's two-stage GroupNorm statistics (E[x], E[x^2], the variance); the
  BatchNormalization that normalises the large tensor with them runs in FP16. Also a precaution
  (variance of ~1.7M values per group at 400x400); seeded weights peak at centred squares ~37.
On the seeded model, FP16 with none of the groups kept scored the same mean mask agreement (0.9976 at
128x128) as with all of them: the groups are kept for exactness (mask) and for trained weights' ranges.
The K-shot vote and the graph inputs/outputs stay FP32 too (keep_io_types): the contract's dtypes.
"""

from __future__ import annotations

import re

import onnx

from hsnet_deploy.calibration.graph import mask_path_nodes
from hsnet_deploy.export.graph_index import GraphIndex

KEEP_FP32 = {
    "mask": "support-mask resize and masking: residues down to ~1e-11 decide which support positions count "
            "(the spec's exact zero pattern); FP16 flushes values below 6e-8 to zero",
    "l2norm": "correlation L2 normalisation, a precaution: sums of squares over up to 2048 channels must not "
              "accumulate in FP16 (max 65504); seeded weights peak at ~80, trained ones are larger",
    "groupnorm": "learner GroupNorm, a precaution: statistics over ~1.7M values per group at 400x400",
    "vote": "K-shot vote and outputs: the contract's float32 logits and {0,1} mask",
}


def mask_nodes(proto: onnx.ModelProto) -> list[str]:
    """The support-mask path (graph.mask_path_nodes) without the Mul that applies the folded factor
    m / (m * ||v|| + eps) to the stacked features (the export layouts): the factor is computed in FP32,
    where a resize residue m ~ 1e-11 gives a factor ~1e-6, which FP16 holds (its smallest subnormal is
    6e-8; exact zeros stay zero), so the product runs in FP16 on the FP16 features instead of casting
    every stacked feature map to FP32 and back (240 MB per episode at 400x400, B = 1). A graph that
    multiplies the features by the resized mask itself (older exports) keeps that Mul in FP32."""
    return _without_factor_products(GraphIndex.of(proto), mask_path_nodes(proto))


def _without_factor_products(index: GraphIndex, chain: list[str]) -> list[str]:
    """`chain` less each Mul that multiplies a Div of the chain (a per-position factor) by a tensor from
    outside it (the stacked features): the factor is small and computed in FP32, the product is large."""
    members = set(chain)
    nodes = {node.name: node for node in index.producer.values()}

    def applies_factor(node: onnx.NodeProto) -> bool:
        inside = [i for i in node.input if i in index.producer and index.producer[i].name in members]
        return node.op_type == "Mul" and len(node.input) == 2 and len(inside) == 1 and index.made_by(inside[0], "Div")

    return [name for name in chain if not applies_factor(nodes[name])]


def l2norm_nodes(proto: onnx.ModelProto) -> list[str]:
    """Each ReduceL2 and the elementwise chain after it up to the normalised features: (norm + eps) and
    v / norm, or, with the support mask folded in (export layouts), m * norm + eps and m / (...); the
    product v * factor over the stacked features runs in FP16 (`_without_factor_products`)."""
    index = GraphIndex.of(proto)
    names: list[str] = []
    for node in proto.graph.node:
        if node.op_type != "ReduceL2":
            continue
        stack, seen = [node], set()
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            names.append(current.name)
            stack.extend(c for c in index.readers(current.output[0]) if c.op_type in ("Mul", "Add", "Div"))
    return _without_factor_products(index, names)


STATISTICS_OPS = ("ReduceMean", "ReduceL2", "Pow", "Sub", "Mul", "Div", "Max", "Reshape", "Expand")


def groupnorm_nodes(proto: onnx.ModelProto) -> list[str]:
    """The two-stage GroupNorms' statistics, found by structure (the export's node names and scopes do not
    survive onnxslim). Current exports: from the mean and variance inputs of each learner
    BatchNormalization up through the small statistics ops and the two reductions to the grouping Reshape
    of the block output (the walk stops at that tensor's producer, the branch Add); the BatchNormalization
    itself, which reads and writes the large tensor, runs in FP16. Older exports (a scale and shift computed
    from the statistics, or a centred form): from each learner Sqrt up through the statistics and down
    through the small ops that turn them into the scale and shift."""
    from hsnet_deploy.calibration.graph import node_stages

    stages = node_stages(proto)
    index = GraphIndex.of(proto)
    producer = index.producer
    seen: set[str] = set()

    def walk_up(start: list[onnx.NodeProto], ops: tuple[str, ...], through_reshapes: bool) -> None:
        stack = list(start)
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type == "Reshape" and not through_reshapes:
                continue
            data = node.input[:1] if node.op_type in ("Reshape", "Expand") else node.input  # not their shapes
            stack.extend(p for i in data if (p := producer.get(i)) is not None and p.op_type in ops)

    for node in proto.graph.node:
        if stages.get(node.name) != "learner":
            continue
        if node.op_type == "BatchNormalization":
            walk_up([p for i in node.input[3:5] if (p := producer.get(i)) is not None and p.op_type in
                     STATISTICS_OPS], STATISTICS_OPS, through_reshapes=True)
        elif node.op_type == "Sqrt":
            walk_up([node], ("ReduceMean", "ReduceL2", "Pow", "Sub", "Mul", "Add", "Div", "Max", "Reshape"),
                    through_reshapes=False)
            down = [node]  # to the scale and shift (not into the BatchNormalization that applies them)
            while down:
                current = down.pop()
                for c in index.readers(current.output[0]):
                    if c.name not in seen and c.op_type in ("Reciprocal", "Div", "Mul", "Sub", "Add", "Reshape",
                                                            "Expand"):
                        seen.add(c.name)
                        down.append(c)
    return [n.name for n in proto.graph.node if n.name in seen]


def vote_nodes(proto: onnx.ModelProto) -> list[str]:
    from hsnet_deploy.calibration.graph import node_stages

    stages = node_stages(proto)
    return [n.name for n in proto.graph.node if stages.get(n.name) == "other"]


GROUP_FINDERS = {"mask": mask_nodes, "l2norm": l2norm_nodes, "groupnorm": groupnorm_nodes, "vote": vote_nodes}


def fp32_nodes(proto: onnx.ModelProto, keep: tuple[str, ...] = tuple(KEEP_FP32)) -> dict[str, list[str]]:
    """Group -> node names to keep in FP32."""
    unknown = set(keep) - set(GROUP_FINDERS)
    if unknown:
        raise ValueError(f"unknown FP32 groups {sorted(unknown)}; expected some of {sorted(GROUP_FINDERS)}")
    return {group: GROUP_FINDERS[group](proto) for group in keep}


def convert_fp16(src_path: str, keep: tuple[str, ...] = tuple(KEEP_FP32)) -> tuple[onnx.ModelProto, dict[str, list[str]]]:
    """The FP16 model (inputs and outputs float32) and the nodes kept in FP32, by group.

    AutoCast's own data-range rules are switched off (data_max = inf): what stays FP32 is exactly the
    named groups, so the variant does not depend on which random data AutoCast would have drawn.
    """
    import logging

    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.logging_config import configure_logging

    from hsnet_deploy.calibration.int8 import quiet_quantisers

    proto = onnx.load(src_path, load_external_data=False)
    kept = fp32_nodes(proto, keep)
    names = [n for group in kept.values() for n in group]
    patterns = [f"^{re.escape(n)}$" for n in names]
    configure_logging(logging.ERROR)  # AutoCast logs every node it skips at INFO
    with quiet_quantisers():
        converted = convert_to_mixed_precision(
            src_path, low_precision_type="fp16", nodes_to_exclude=patterns or None, keep_io_types=True,
            data_max=float("inf"), init_max=65504.0, opset=max(_opset(proto), 19),
        )
    clean_value_info(converted)
    check_strongly_typed(converted)
    return converted, kept


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 20)


def clean_value_info(proto: onnx.ModelProto) -> None:
    """Drop intermediate value_info: AutoCast 0.47 writes dim_param="unk" there, and ONNX Runtime then
    refuses shapes that disagree with the real ones. Types of graph inputs/outputs stay declared."""
    del proto.graph.value_info[:]


def check_strongly_typed(proto: onnx.ModelProto) -> None:
    """No Cast whose input already has the target type (TensorRT 11's strongly typed parser rejects them),
    and every tensor's type inferable: what a strongly typed network needs."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    for node in inferred.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if types.get(node.input[0]) == to:
                raise RuntimeError(f"Cast {node.name} casts {node.input[0]} to its own type")
