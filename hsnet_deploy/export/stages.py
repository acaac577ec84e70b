"""Label every node of the exported graph with its HSNet stage, for per-stage profiles in any backend.

The dynamo exporter records each node's module scope (`pkg.torch.onnx.name_scopes`) and emits nodes in
program order. Module-scoped nodes name their stage directly; the unscoped glue between them (L2
normalisation and correlation MatMuls, the learner's adds and means, the K-shot vote) takes its stage
from where it sits in that order. The labels travel in the model's metadata (`hsnet.stages`: stage ->
node names), so ORT-optimised, FP16 and INT8 derivatives that copy the metadata keep them.
"""

from __future__ import annotations

import onnx

STAGES = ("backbone", "correlation", "learner", "decoder", "other")
_SCOPE_STAGE = (  # first match wins
    ("model.backbone", "backbone"),
    ("model.mask_resize", "correlation"),
    ("model.hpn_learner.decoder", "decoder"),
    ("model.output_resize", "decoder"),
    ("model.hpn_learner", "learner"),
)


def _scoped_stage(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            for prefix, stage in _SCOPE_STAGE:
                if f"'{prefix}" in prop.value:
                    return stage
    return None


def label_stages(proto: onnx.ModelProto, pyramid_outputs: tuple[str, ...], logits_output: str) -> dict[str, list[str]]:
    """Stage -> names of its nodes and of their first outputs, for the graph as exported.

    Unscoped nodes (e.g. the bottlenecks' ReLUs, called outside a module's forward) take the stage of
    the span they sit in: up to the last backbone node -> backbone; then until the pyramid is complete
    -> correlation; until the first decoder node -> learner; until the logits -> decoder; then other.
    """
    nodes = list(proto.graph.node)
    scoped = [_scoped_stage(n) for n in nodes]
    last_backbone = max((i for i, st in enumerate(scoped) if st == "backbone"), default=-1)
    pending = set(pyramid_outputs)
    seen_decoder = logits_done = False
    groups: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for i, (node, stage) in enumerate(zip(nodes, scoped)):
        seen_decoder = seen_decoder or stage == "decoder"
        if stage is None:
            if logits_done:
                stage = "other"
            elif i <= last_backbone:
                stage = "backbone"
            elif pending:
                stage = "correlation"
            else:
                stage = "decoder" if seen_decoder else "learner"
        pending.difference_update(node.output)
        logits_done = logits_done or logits_output in node.output
        groups[stage].append(node.name)
        # ONNX Runtime names some rewritten nodes after their output (`<output>_nchwc`): list those too.
        groups[stage].extend(o for o in node.output[:1] if o and o != node.name)
    return groups


def node_stages(proto: onnx.ModelProto, stage_of: dict[str, str]) -> dict[str, str]:
    """Node name -> stage for every node of `proto`, including nodes the stage map does not name.

    Derived graphs add and rename nodes (FP16 Casts, INT8 Q/DQ pairs, fused nodes): such a node takes the
    stage of the nearest labelled node that produces one of its inputs, else of one that consumes its
    outputs, else 'other'. Nodes are visited in graph (topological) order, so a chain of new nodes
    inherits through its own members.
    """
    nodes = list(proto.graph.node)
    stages: dict[str, str] = {}
    producer_stage: dict[str, str] = {}
    for node in nodes:
        stage = stage_of.get(node.name) or next((stage_of[o] for o in node.output[:1] if o in stage_of), None)
        if stage is None:
            stage = next((producer_stage[i] for i in node.input if i in producer_stage), None)
        if stage is None:
            continue
        stages[node.name] = stage
        for out in node.output:
            producer_stage[out] = stage
    consumer_stage: dict[str, str] = {}
    for node in reversed(nodes):  # consumers before producers
        if node.name not in stages:
            stages[node.name] = next((consumer_stage[o] for o in node.output if o in consumer_stage), "other")
        for inp in node.input:
            consumer_stage.setdefault(inp, stages[node.name])
    return stages
