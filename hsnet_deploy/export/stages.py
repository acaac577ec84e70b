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
    """Stage -> names of its nodes, for the graph as exported (before any optimiser renames nodes)."""
    pending_pyramid = set(pyramid_outputs)
    logits_done = False
    current = "backbone"
    groups: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for node in proto.graph.node:
        stage = _scoped_stage(node)
        if stage is None:
            if logits_done:
                stage = "other"
            elif pending_pyramid and current in ("backbone", "correlation"):
                stage = "correlation"
            elif current == "decoder":
                stage = "decoder"
            else:
                stage = "learner"
        else:
            current = stage
        pending_pyramid.difference_update(node.output)
        logits_done = logits_done or logits_output in node.output
        groups[stage].append(node.name)
    return groups
