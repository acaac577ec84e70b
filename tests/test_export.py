import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import EXPORT_SIZE, random_episode

from hsnet_deploy.artifacts import props_to_meta, stage_of_node
from hsnet_deploy.export.verify import PYRAMID_NAMES, reference_outputs


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_every_conv_is_2d_and_no_custom_ops(exported, backbone):
    path, _report, _ = exported(backbone)
    proto = onnx.load(str(path))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs
    for node in convs:
        weight = next(i for i in proto.graph.initializer if i.name == node.input[1])
        assert len(weight.dims) == 4, f"{node.name} has a kernel of rank {len(weight.dims) - 2}"
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert not {"Loop", "If", "Scan", "Resize"} & {n.op_type for n in proto.graph.node}
    # BatchNormalization only as the learner's GroupNorm (its mean and variance the computed group statistics,
    # one per GroupNorm); the backbone's BatchNorms are folded into its convs (constant statistics would show)
    inits = {i.name for i in proto.graph.initializer}
    norms = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == 15 and not any(n.input[3] in inits or n.input[4] in inits for n in norms)
    # the correlation's ReLUs are Relu nodes, which ONNX Runtime's INT8 graph folds into the QLinearMatMul
    stage_of = stage_of_node(props_to_meta({p.key: p.value for p in proto.metadata_props}))
    correlation_ops = [n.op_type for n in proto.graph.node if stage_of.get(n.name) == "correlation"]
    assert correlation_ops.count("Relu") >= 3 and "Max" not in correlation_ops
    # one bias per center-pivot block (single_bias): each block's conv1 has none, every other Conv has one
    assert sum(len(n.input) < 3 or not n.input[2] for n in convs) == 15
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
@pytest.mark.parametrize("b,k,noise", [(1, 1, False), (2, 3, True), (2, 1, False), (1, 3, True)])
def test_onnx_runtime_equals_pytorch_for_dynamic_b_and_k(exported, backbone, b, k, noise):
    path, _, model = exported(backbone)
    q, s, m = random_episode(b, k, EXPORT_SIZE, seed=10 * b + k, noise_masks=noise)
    got = dict(zip(["logits", "mask"], _session(path).run(None, {
        "query_img": q.numpy(), "support_imgs": s.numpy(), "support_masks": m.numpy()})))
    with torch.no_grad():
        ref_logits, ref_mask = model(q, s, m)
    assert got["logits"].shape == (b, k, 2, EXPORT_SIZE, EXPORT_SIZE)
    assert np.abs(got["logits"] - ref_logits.numpy()).max() <= 1e-4 * np.abs(ref_logits.numpy()).max()
    assert (got["mask"] == ref_mask.numpy()).mean() >= 0.999


def test_each_groupnorm_is_two_reductions_a_few_small_ops_and_one_batchnorm(exported):
    """On a GPU every node is a kernel: a GroupNorm is two reductions over its grouped input, at most 9 small
    ops on (N, G) statistics (second-stage means, E[x^2] - E[x]^2 clamped, the per-row Expands) and the one
    BatchNormalization that normalises; no small ops turn the statistics into a scale and a shift."""
    from hsnet_deploy.calibration.fp16 import groupnorm_nodes

    path, _report, _ = exported("resnet50")
    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    names = set(groupnorm_nodes(proto))
    statistics = [n for n in proto.graph.node if n.name in names and n.op_type != "Reshape"]
    first_stage = [n for n in statistics if n.op_type in ("ReduceMean", "ReduceL2")
                   and producer[n.input[0]].op_type == "Reshape"]
    assert len(first_stage) == 30  # E[x] and the squared norms, each reading a GroupNorm's grouped input once
    assert len(statistics) - len(first_stage) <= 15 * 9
    assert not {"Sqrt", "Reciprocal"} & {n.op_type for n in statistics}


def test_the_mask_vote_takes_its_image_maximum_one_axis_at_a_time(exported):
    """ONNX Runtime's CUDA ReduceMax (cuDNN) spent 9.5 ms of a 72 ms B = 8 episode on one (B, H*W) -> (B)
    maximum on an H200; per row and then over the rows it is two short reductions."""
    path, _report, _ = exported("resnet50")
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    maxima = [n for n in proto.graph.node if n.op_type == "ReduceMax"]
    assert len(maxima) == 2
    for node in maxima:
        axes = inits[node.input[1]].reshape(-1).tolist() if len(node.input) > 1 else None
        assert axes is not None and len(axes) == 1
        assert shapes[node.input[0]][axes[0]] in (EXPORT_SIZE, None)  # one image axis, not H*W


def test_verification_compares_the_pyramid_not_only_logits(exported):
    _, report, _ = exported("resnet50")
    assert report.passed
    for check in report.checks:
        assert {e.name for e in check.errors} == {"logits", *PYRAMID_NAMES}
        assert check.worst_rel() <= 1e-4
    assert {(c.batch, c.shots) for c in report.checks} >= {(2, 1), (2, 3)}
    assert {c.masks for c in report.checks} == {"ellipses", "noise"}


def test_verification_catches_a_wrong_c2(exported, monkeypatch):
    """A graph whose C2 is off by 2% must fail the pyramid comparison even if logits barely move."""
    from hsnet_deploy.export import verify

    _path, _, model = exported("resnet50")
    real = verify.reference_outputs

    def skewed(m, inputs):
        out = real(m, inputs)
        out["corr_c2"] = out["corr_c2"] * 1.02
        return out

    monkeypatch.setattr(verify, "reference_outputs", skewed)
    # The written model has no pyramid outputs; rebuild a verification graph by re-exporting would be slow,
    # so check the comparison function on the tensors directly.
    q, s, m = random_episode(1, 1, EXPORT_SIZE)
    ref = real(model, (q, s, m))
    errors = verify.compare(skewed(model, (q, s, m)), ref, ("logits", "corr_c2"))
    by_name = {e.name: e.rel for e in errors}
    assert by_name["logits"] == 0 and by_name["corr_c2"] > 1e-2


def test_verification_fails_on_one_bad_episode_and_judges_relative_to_the_reference():
    """Every episode must pass, not one; the error is max |diff| / max |reference| (1e-4 of 1000 is 0.1)."""
    from hsnet_deploy.export import ExportReport
    from hsnet_deploy.export.verify import EpisodeCheck, TensorError

    def check(max_abs, ref_max):
        return EpisodeCheck(1, 1, "noise", [TensorError("logits", max_abs, max_abs / 10, ref_max)], 1.0)

    assert check(0.05, 1000.0).worst_rel() == pytest.approx(5e-5) and check(0.05, 1.0).worst_rel() == pytest.approx(0.05)
    good, bad = check(0.05, 1000.0), check(0.05, 100.0)  # 5e-5 and 5e-4 relative
    assert ExportReport("m.onnx", "resnet50", 64, 20, checks=[good, good]).passed
    assert not ExportReport("m.onnx", "resnet50", 64, 20, checks=[good, bad, good]).passed


def test_metadata_round_trips(exported):
    path, report, _ = exported("resnet50")
    meta = props_to_meta({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})
    assert meta["backbone"] == "resnet50" and meta["img_size"] == EXPORT_SIZE and meta["precision"] == "fp32"
    assert meta["opset"] == 20 and meta["weights"] == "seeded-random" and meta["seed"] == 0
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert "torch" in meta["versions"] and "onnx" in meta["versions"]
    assert meta["verification"]["worst_rel"] <= 1e-4
    worst = max(c.worst_rel() for c in report.checks)  # the worst episode's, as `info` shows it
    assert meta["verification"]["worst_rel"] == pytest.approx(worst, rel=1e-6)
    assert worst > min(c.worst_rel() for c in report.checks)


def test_stage_map_covers_the_graph_in_program_order(exported):
    path, _, _ = exported("resnet50")
    proto = onnx.load(str(path), load_external_data=False)
    stage_of = stage_of_node(props_to_meta({p.key: p.value for p in proto.metadata_props}))
    stages = [stage_of[n.name] for n in proto.graph.node]
    convs = [stage_of[n.name] for n in proto.graph.node if n.op_type == "Conv"]
    assert convs.count("backbone") == 53  # resnet50's 53 convs, once: queries and supports share one pass
    assert convs.count("learner") == 2 * 15 and convs.count("decoder") == 4
    # Data-dependent nodes keep program order through onnxslim's topological sort.
    # (The mask-resize MatMuls depend on the inputs only and may come first; the L2 norms need features.)
    nodes = list(proto.graph.node)
    firsts = [next(i for i, n in enumerate(nodes) if n.op_type == op and stage_of[n.name] == stage)
              for stage, op in (("backbone", "Conv"), ("correlation", "ReduceL2"), ("learner", "Conv"),
                                ("decoder", "Conv"))]
    assert firsts == sorted(firsts)
    assert set(stages) <= {"backbone", "correlation", "learner", "decoder", "other"}
    assert {stage_of[n.name] for n in proto.graph.node if n.op_type == "MatMul"} >= {"correlation"}


def test_reference_outputs_expose_three_pyramid_levels(exported):
    _, _, model = exported("resnet50")
    out = reference_outputs(model, random_episode(1, 2, EXPORT_SIZE))
    assert [out[n].shape[1] for n in PYRAMID_NAMES] == [3, 6, 4]


@pytest.mark.parametrize("rank,ok", [(3, False), (4, True), (5, False), (6, False)])
def test_structure_check_refuses_a_conv_that_is_not_2d(rank, ok):
    """check_onnx_structure's promise (only 2D convs) holds: a 1D, 3D or 4D Conv left in the graph is an error."""
    from onnx import TensorProto, helper, numpy_helper

    from hsnet_deploy.export.onnx_export import check_onnx_structure

    w = numpy_helper.from_array(np.zeros((2, 1) + (3,) * (rank - 2), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv_under_test")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph)
    if ok:
        check_onnx_structure(model)
    else:
        with pytest.raises(RuntimeError, match=f"conv_under_test: a {rank - 2}D Conv"):
            check_onnx_structure(model)
