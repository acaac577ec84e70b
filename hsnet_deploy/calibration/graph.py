"""Graph facts the precision variants need: node stages, the support-mask path, BatchNorm folding.

Node names are the exporter's; `hsnet.stages` in the metadata maps each to its HSNet stage. Nothing
here renames a node, so the stage map stays valid for every derivative.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from hsnet_deploy.artifacts import props_to_meta, stage_of_node
from hsnet_deploy.export.graph_index import GraphIndex

STAGES = ("backbone", "correlation", "learner", "decoder")


def model_meta(proto: onnx.ModelProto) -> dict:
    return props_to_meta({p.key: p.value for p in proto.metadata_props})


def node_stages(proto: onnx.ModelProto) -> dict[str, str]:
    """Node name -> stage; a model without the map (not ours) is an error the caller should not reach."""
    stages = stage_of_node(model_meta(proto))
    if not stages:
        raise ValueError("the model has no hsnet.stages metadata (export it with `hsnet-deploy export`)")
    return stages


def mask_path_nodes(proto: onnx.ModelProto, mask_input: str = "support_masks") -> list[str]:
    """Nodes computing the resized support masks and the Mul that applies them to the support features.

    Found by data flow from the `support_masks` input, stopping at the masking Mul (its other input is a
    feature map, not mask-derived), so it does not depend on node naming. These nodes decide, via
    residues down to 6e-11, which support positions count at all: they must stay exact FP32.
    """
    derived = {mask_input}
    path = []
    for node in proto.graph.node:  # the exported graph is topologically sorted
        mask_inputs = [i for i in node.input if i in derived]
        if not mask_inputs:
            continue
        path.append(node.name)
        if node.op_type == "Mul" and len(mask_inputs) < len([i for i in node.input if i]):
            continue  # the masking Mul: its output is a masked feature map, no longer a mask
        if node.op_type == "Shape":
            continue
        derived.update(node.output)
    return path


def weighted_nodes(proto: onnx.ModelProto, stages: set[str]) -> list[str]:
    """The Conv and correlation-MatMul nodes of the chosen stages: what INT8 quantises.

    MatMuls outside the correlation are resizes by constant interpolation matrices (support masks,
    learner upsampling, output): cheap, exactness-critical for the masks, never quantised. Nor is the
    last Conv (64 -> 2 channels): its output is the logits, which a quantiser would round to 8 bits
    (figure: docs/benchmarks.md, "INT8: which stages by default"), for well under 1% of the time.
    """
    stage_of = node_stages(proto)
    on_mask_path = set(mask_path_nodes(proto))
    on_mask_path.update(n.name for n in [n for n in proto.graph.node if n.op_type == "Conv"][-1:])
    inits = {i.name for i in proto.graph.initializer}
    chosen = []
    for node in proto.graph.node:
        stage = stage_of.get(node.name)
        if stage not in stages or node.name in on_mask_path:
            continue
        if node.op_type == "Conv" or node.op_type == "MatMul" and stage == "correlation" and not any(i in inits for i in node.input):
            chosen.append(node.name)
    return chosen


# Ops between the weighted ones that ONNX Runtime's CPU EP runs on uint8 when Q/DQ surround them
# (QLinearAdd, QLinearConcat, MaxPool / Reshape / Transpose on uint8, Relu folded into the Q scale):
# quantising them keeps consecutive int8 kernels chained instead of dequantising to float in between.
CHAINABLE_OPS = ("Add", "Relu", "MaxPool", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze")


def chain_nodes(proto: onnx.ModelProto, stages: set[str]) -> list[str]:
    """The non-weighted nodes of the chosen stages that sit between quantised ops: residual Adds, ReLUs,
    pooling, the correlation's Concats and layout ops. Chosen by op type and data flow, not by name.

    Left out: the support-mask path (exact FP32, see mask_path_nodes), and Adds / Concats with a constant
    input (the L2 norm's epsilon: quantising it would round the norm it protects, and the tensors are
    tiny).
    """
    stage_of = node_stages(proto)
    on_mask_path = set(mask_path_nodes(proto))
    consts = GraphIndex.of(proto).constants
    chosen = []
    for node in proto.graph.node:
        if stage_of.get(node.name) not in stages or node.name in on_mask_path or node.op_type not in CHAINABLE_OPS:
            continue
        if node.op_type in ("Add", "Concat") and any(i in consts for i in node.input):
            continue
        chosen.append(node.name)
    return chosen


def fold_batchnorm(proto: onnx.ModelProto) -> int:
    """Fold every inference BatchNormalization that follows a Conv into the Conv's weights, in place.

    Quantisers place Q/DQ around the Conv; a BatchNorm left between the Conv and its ReLU keeps the
    activation in float and stops ONNX Runtime from fusing a QLinearConv. The Conv keeps its name (the
    stage map stays valid); returns how many were folded.
    """
    graph = proto.graph
    index = GraphIndex.of(graph)
    inits, producer = index.initializers, index.producer
    graph_outputs = {o.name for o in graph.output}
    removed, folded = set(), 0
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(index.readers(conv.output[0])) != 1:
            continue
        if conv.output[0] in graph_outputs or not all(n in inits for n in bn.input[1:5]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        w_init = inits[conv.input[1]]
        w = numpy_helper.to_array(w_init).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else 0.0
        factor = scale / np.sqrt(var + eps)
        new_w = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((b - mean) * factor + bias).astype(np.float32)
        w_name = f"{conv.name}.folded_weight"
        b_name = f"{conv.name}.folded_bias"
        graph.initializer.append(numpy_helper.from_array(new_w, w_name))
        graph.initializer.append(numpy_helper.from_array(new_b, b_name))
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        folded += 1
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    return folded
