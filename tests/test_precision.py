"""FP16 and INT8 variants of a small exported HSNet: what stays FP32, where Q/DQ sit, the gate, the writes.

One balanced seeded resnet50 (final decoder bias shifted so about half the pixels are foreground; see
calibration/synthetic.py) is exported once at 96x96 for the module; every variant is made from it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from hsnet_deploy.artifacts import props_to_meta, stage_of_node
from hsnet_deploy.calibration import variant as variant_module
from hsnet_deploy.calibration.gate import GateThresholds, run_gate
from hsnet_deploy.calibration.int8 import (
    ort_int8_kernels,
    ort_optimised_graph,
    quantised_inputs,
    requantise_breaks,
)
from hsnet_deploy.calibration.synthetic import balance_decoder_bias, synthetic_samples, write_simple_layout
from hsnet_deploy.calibration.variant import make_variant
from hsnet_deploy.errors import GateFailure, UserError
from hsnet_deploy.export import export_onnx
from hsnet_deploy.model import seeded_model
from hsnet_deploy.runtime.artifact import open_artifact

SIZE = 96
# Seeded weights: the ground truth of the synthetic episodes says nothing, so agreement with FP32 decides.
AGREEMENT = {"min_mean_agreement": 0.95, "min_sign_agreement": 0.999}
try:
    import modelopt.onnx.quantization  # noqa: F401

    HAVE_MODELOPT = True
except ImportError:
    HAVE_MODELOPT = False
needs_modelopt = pytest.mark.skipif(not HAVE_MODELOPT, reason="needs the `quant` extra (nvidia-modelopt and its ONNX tools)")


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    model = seeded_model("resnet50", 0)
    shift = balance_decoder_bias(model, synthetic_samples(3, SIZE, seed=100))
    path = tmp_path_factory.mktemp("model") / "balanced.onnx"
    report = export_onnx(model, path, SIZE, source={"weights": "seeded-random-balanced", "seed": 0, "bias_shift": shift})
    assert report.passed
    return path


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    write_simple_layout(root, episodes=10, size=SIZE, seed=2)
    return root


@pytest.fixture(scope="module")
def int8_ort(fp32_model, calib_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "int8.onnx"
    meta, report = make_variant(fp32_model, out, "int8", calib_dir=calib_dir, calib_episodes=4, gate_episodes=4,
                                backend="onnxruntime", quantize=["backbone", "correlation"], thresholds=AGREEMENT,
                                progress=False)
    return out, meta, report


def _expected_quantised(proto: onnx.ModelProto, stages: set[str]) -> set[str]:
    """Independently of graph.weighted_nodes: Convs of the stages, and correlation MatMuls, i.e. those
    whose inputs are both computed (the mask and learner resizes multiply by constant matrices)."""
    stage_of = stage_of_node(props_to_meta({p.key: p.value for p in proto.metadata_props}))
    inits = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    names = set()
    for node in proto.graph.node:
        stage = stage_of.get(node.name)
        if stage not in stages:
            continue
        if node.op_type == "Conv" and node is not convs[-1]:
            names.add(node.name)
        if node.op_type == "MatMul" and stage == "correlation" and not inits & set(node.input):
            names.add(node.name)
    return names


def _types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def test_int8_qdq_sits_exactly_on_the_chosen_stages(fp32_model, int8_ort):
    path, meta, _report = int8_ort
    proto = onnx.load(str(path))
    expected = _expected_quantised(onnx.load(str(fp32_model)), {"backbone", "correlation"})
    assert len(expected) >= 53 + 3  # resnet50 backbone convs (one pass for queries and supports) + one MatMul per stage
    ops = {n.name: n.op_type for n in proto.graph.node}
    # ONNX Runtime's QDQ scheme also re-quantises outputs (so it can fuse QLinearConv): Relu/Add/MaxPool may
    # read a DequantizeLinear too; the weighted ops reading one must be exactly the chosen ones.
    assert {n for n in quantised_inputs(proto) if ops[n] in ("Conv", "MatMul")} == expected
    assert meta["variant"]["quantized_stages"] == ["backbone", "correlation"]
    assert meta["variant"]["qdq"]["int_types"] == ["int32", "int8", "uint8"]  # biases, weights, activations
    assert meta["variant"]["qdq"]["zero_points_all_zero"] is False  # uint8 activations sit around 128, not 0


def test_the_logits_conv_is_never_quantised_even_in_the_decoder_stage(fp32_model):
    """Quantising the last Conv (64 -> 2, the logits) rounds them to 8 bits for well under 1% of the time."""
    from hsnet_deploy.calibration.graph import node_stages, weighted_nodes

    proto = onnx.load(str(fp32_model))
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    stage_of = node_stages(proto)
    decoder = weighted_nodes(proto, {"decoder"})
    assert decoder and convs[-1] not in decoder
    assert set(decoder) == {c for c in convs[:-1] if stage_of.get(c) == "decoder"}


def test_int8_onnxruntime_variant_becomes_int8_kernels(int8_ort):
    path, meta, _ = int8_ort
    kernels = ort_int8_kernels(path)
    assert kernels.get("QLinearConv", 0) >= 50, kernels  # the 53 backbone convs, less any ORT fused otherwise
    assert kernels.get("QLinearMatMul", 0) + kernels.get("MatMulInteger", 0) >= 3, kernels  # one per stage
    assert meta["variant"]["ort_int8_kernels"] == kernels


def test_int8_variant_is_written_with_its_gate_report_and_runs_like_fp32(fp32_model, int8_ort, calib_dir):
    path, meta, report = int8_ort
    assert report.passed and meta["gate"]["passed"]
    written = props_to_meta({p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props})
    assert written["precision"] == "int8" and written["gate"]["mean_agreement"] == meta["gate"]["mean_agreement"]
    assert written["calibration"]["calib_episodes"] == 4 and written["calibration"]["gate_episodes"] == 4
    assert written["backbone"] == "resnet50" and written["img_size"] == SIZE
    assert report.miou_fp32 is not None  # the simple layout has query masks: mIoU is measured for both
    feed = synthetic_samples(1, SIZE, seed=5, shots=2)[0].feed
    with open_artifact(fp32_model, device="cpu") as ref, open_artifact(path, device="cpu") as var:
        a, b = ref.infer(feed), var.infer(feed)
    assert var.info.precision == "int8"
    for name in ("logits", "mask"):
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape


def test_gate_refuses_absurd_calibration_ranges_and_writes_nothing(fp32_model, calib_dir, tmp_path, monkeypatch):
    real = variant_module.quantize_onnxruntime

    def absurd(*args, **kwargs):
        proto, nodes = real(*args, **kwargs)
        acts = {n.input[1] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        for init in proto.graph.initializer:
            if init.name in acts:  # activation ranges 1000x too narrow: everything saturates
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1e-3), init.name))
        return proto, nodes

    monkeypatch.setattr(variant_module, "quantize_onnxruntime", absurd)
    out = tmp_path / "broken.onnx"
    with pytest.raises(GateFailure, match="failed the accuracy gate") as info:
        make_variant(fp32_model, out, "int8", calib_dir=calib_dir, calib_episodes=2, gate_episodes=4,
                     quantize=["backbone"], thresholds=AGREEMENT, progress=False)
    assert not info.value.report.passed
    assert info.value.report.mean_agreement < 0.95 or info.value.report.sign_agreement < 0.999
    assert not out.exists() and list(tmp_path.iterdir()) == []


@needs_modelopt
def test_tensorrt_int8_is_symmetric_with_zero_points_of_zero(fp32_model, calib_dir, tmp_path):
    out = tmp_path / "trt.onnx"
    meta, report = make_variant(fp32_model, out, "int8", calib_dir=calib_dir, calib_episodes=2, gate_episodes=3,
                                backend="tensorrt", quantize=["backbone", "correlation"], thresholds=AGREEMENT,
                                progress=False)
    proto = onnx.load(str(out))
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = numpy_helper.to_array(inits[node.input[2]])
            assert zp.dtype == np.int8 and not zp.any(), node.name
    quantised = set(quantised_inputs(proto))
    ops = {n.name: n.op_type for n in proto.graph.node}
    assert {ops[n] for n in quantised} <= {"Conv", "MatMul", "Add"}  # weighted ops (+ residual Adds ModelOpt fuses)
    expected = _expected_quantised(onnx.load(str(fp32_model)), {"backbone", "correlation"})
    assert {n for n in quantised if ops[n] != "Add"} <= expected
    assert meta["variant"]["qdq"]["zero_points_all_zero"] and report.passed


@needs_modelopt
def test_fp16_keeps_mask_l2norm_groupnorm_in_fp32(fp32_model, tmp_path):
    out = tmp_path / "fp16.onnx"
    meta, report = make_variant(fp32_model, out, "fp16", gate_episodes=3, progress=False)
    assert report.passed, report.failures()
    proto = onnx.load(str(out))
    types = _types(proto)
    src = onnx.load(str(fp32_model))
    # the support-mask resize MatMuls (constant matrix x mask) and their consumers, found from the FP32 graph
    first = [n for n in src.graph.node if n.op_type == "MatMul" and any("mask_resize" in i for i in n.input)]
    mask_matmuls = first + [n for n in src.graph.node if n.op_type == "MatMul"
                            and any(i in {f.output[0] for f in first} for i in n.input)]
    assert len(mask_matmuls) == 6
    nodes = {n.name: n for n in proto.graph.node}
    for node in mask_matmuls:
        assert types[nodes[node.name].output[0]] == TensorProto.FLOAT, node.name
    reduce_l2 = [n for n in proto.graph.node if n.op_type == "ReduceL2"]
    assert reduce_l2 and all(types[n.output[0]] == TensorProto.FLOAT and types[n.input[0]] == TensorProto.FLOAT
                             for n in reduce_l2)
    producer = {o: n for n in proto.graph.node for o in n.output}
    # GroupNorm's variance E[x^2] - E[x]^2, clamped at 0 (Max after Sub): computed in FP32 for every GroupNorm
    variances = [n for n in proto.graph.node if n.op_type == "Max" and n.input[0] in producer
                 and producer[n.input[0]].op_type == "Sub"]
    assert len(variances) == 15 and all(types[n.output[0]] == TensorProto.FLOAT for n in variances)
    means = [n for n in proto.graph.node if n.op_type == "ReduceMean"]  # GroupNorm's statistics: all but one
    assert sum(types[n.output[0]] == TensorProto.FLOAT for n in means) >= len(means) - 1 >= 45
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert sum(types[n.output[0]] == TensorProto.FLOAT16 for n in convs) == len(convs)
    assert types["logits"] == TensorProto.FLOAT and types["mask"] == TensorProto.FLOAT
    assert set(meta["variant"]["kept_fp32"]) == {"mask", "l2norm", "groupnorm", "vote"}
    assert meta["calibration"]["layout"] == "synthetic" and meta["precision"] == "fp16"
    # ... but the passes over the large tensors that apply those FP32 results run in FP16: the mask/L2 factor
    # (an FP32 Div) times the stacked features, and GroupNorm's BatchNormalization
    factor_products = [n for n in proto.graph.node if n.op_type == "Mul" and any(
        i in producer and producer[i].op_type == "Cast" and producer[producer[i].input[0]].op_type == "Div"
        for i in n.input if i in producer and producer[i].input and producer[i].input[0] in producer)]
    assert len(factor_products) == 3 and all(types[n.output[0]] == TensorProto.FLOAT16 for n in factor_products)
    norms = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(norms) == 15 and all(types[n.output[0]] == TensorProto.FLOAT16 for n in norms)


def test_fp16_masking_in_fp16_would_change_the_correlation():
    """Why the mask path stays FP32: PyTorch's 400 -> 50 resize leaves residues FP16 cannot hold."""
    from hsnet_deploy.model.resize import interpolation_matrix

    m = interpolation_matrix(400, 50)  # (50, 400): a few rows give a source pixel a weight ~4e-6
    _row, col = [int(i) for i in torch.nonzero((m > 0) & (m < 1e-4))[0]]
    mask = torch.zeros(400, 400)
    mask[col:300, col:300] = 1  # an object whose edge falls on that pixel: output (row, row) = weight^2
    resized = m @ mask @ m.t()
    tiny = (resized > 0) & (resized < 6e-8)
    assert tiny.any()  # positions that count in FP32 ...
    assert (resized.half()[tiny] == 0).all()  # ... and vanish in FP16


def test_bad_requests_are_user_errors(fp32_model, calib_dir, tmp_path):
    with pytest.raises(UserError, match="--int8 needs --calib-data"):
        make_variant(fp32_model, tmp_path / "x.onnx", "int8", progress=False)
    with pytest.raises(UserError, match="--quantize"):
        make_variant(fp32_model, tmp_path / "x.onnx", "int8", calib_dir=calib_dir, quantize=["head"], progress=False)
    with pytest.raises(UserError, match="fewer than"):
        make_variant(fp32_model, tmp_path / "x.onnx", "int8", calib_dir=calib_dir, calib_episodes=8,
                     gate_episodes=8, progress=False)
    assert not (tmp_path / "x.onnx").exists()


def test_run_gate_against_itself_is_perfect(fp32_model):
    samples = synthetic_samples(2, SIZE, seed=9)
    report = run_gate(fp32_model, fp32_model, samples, "fp32", GateThresholds(min_worst_agreement=1.0))
    assert report.passed and report.logit_error == 0.0 and report.sign_agreement == 1.0


def test_gate_measures_miou_over_the_episodes_that_have_a_query_mask(fp32_model):
    """Two of three episodes carry a query mask: mIoU is measured over those two (it was dropped for all),
    equal to the foreground IoU counted by hand from the FP32 masks, and a note names the share."""
    from dataclasses import replace

    from hsnet_deploy.calibration.gate import fp32_outputs

    samples = synthetic_samples(3, SIZE, seed=9)
    truth = {0: samples[0].feed["support_masks"][0, 0], 2: 1.0 - samples[2].feed["support_masks"][0, 0]}
    samples = [replace(s, query_mask=truth.get(i)) for i, s in enumerate(samples)]
    reference = fp32_outputs(fp32_model, samples)
    report = run_gate(fp32_model, fp32_model, samples, "fp32", GateThresholds(), reference=reference)
    inter = sum(np.count_nonzero((reference[i]["mask"][0] >= 0.5) & (truth[i] >= 0.5)) for i in truth)
    union = sum(np.count_nonzero((reference[i]["mask"][0] >= 0.5) | (truth[i] >= 0.5)) for i in truth)
    assert 0 < inter < union
    assert report.miou_fp32 == pytest.approx(100 * inter / union, abs=1e-4)
    assert report.miou_variant == report.miou_fp32 and len(report.episodes) == 3
    assert any("mIoU over the 2 of 3 gate episodes" in note for note in report.notes)


def test_missing_modelopt_says_how_to_install_it(fp32_model, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # import now raises ImportError
    with pytest.raises(UserError, match="pip install nvidia-modelopt onnx-graphsurgeon"):
        make_variant(fp32_model, tmp_path / "x.onnx", "fp16", progress=False)


def _feature_taps(proto: onnx.ModelProto) -> int:
    """Backbone residual Adds whose pre-ReLU output also leaves for the correlation (HSNet's hypercolumn
    taps): there the ReLU has to be a uint8 requantisation (zero point 0), not a removed node."""
    stage_of = stage_of_node(props_to_meta({p.key: p.value for p in proto.metadata_props}))
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return sum(1 for n in proto.graph.node if n.op_type == "Add" and stage_of.get(n.name) == "backbone"
               and uses.get(n.output[0], 0) > 1)


def test_int8_onnxruntime_keeps_consecutive_quantised_ops_in_int8(fp32_model, int8_ort):
    path, meta, _ = int8_ort
    proto = onnx.load(str(fp32_model))
    stage_of = stage_of_node(props_to_meta({p.key: p.value for p in proto.metadata_props}))
    consts = {i.name for i in proto.graph.initializer}
    residual = [n for n in proto.graph.node if n.op_type == "Add" and stage_of.get(n.name) == "backbone"
                and not consts & set(n.input)]
    assert len(residual) >= 12  # resnet50's bottleneck sums
    optimised = ort_optimised_graph(path)
    ops = [n.op_type for n in optimised.graph.node]
    assert ops.count("QLinearAdd") >= len(residual)
    breaks = requantise_breaks(optimised)
    assert not set(breaks) - {"DQ->Q"}, breaks
    assert breaks.get("DQ->Q", 0) <= _feature_taps(proto)
    assert meta["variant"]["ort_requantise_breaks"] == breaks
    # the correlation's ReLU is folded into its QLinearMatMul's requantisation (zero point 0), not a float
    # pass over the dequantised correlation (as a Max(x, 0) was: 42 ms of 1.26 s at 400x400, profile 2026-11-27)
    producer = {o: n for n in optimised.graph.node for o in n.output}

    def dequantised_correlation(name: str) -> bool:
        dq = producer.get(name)
        return dq is not None and dq.op_type == "DequantizeLinear" and getattr(
            producer.get(dq.input[0]), "op_type", None) == "QLinearMatMul"

    assert ops.count("QLinearMatMul") >= 3  # C4, C3, C2
    assert not [n.name for n in optimised.graph.node if n.op_type in ("Relu", "Max", "Clip")
                and dequantised_correlation(n.input[0])]


def test_requantise_breaks_finds_the_older_placement(fp32_model, calib_dir):
    """Q/DQ on the weighted ops only (the placement before chaining): float Adds between QLinearConvs."""
    from hsnet_deploy.calibration.episodes import load_sample, one_shot_feeds, split_episodes
    from hsnet_deploy.calibration.int8 import quantize_onnxruntime

    split = split_episodes(calib_dir, 2, 2, 0)
    feeds = [f for e in split.calib for f in one_shot_feeds(load_sample(e, SIZE))]
    proto, _ = quantize_onnxruntime(fp32_model, feeds, ["backbone", "correlation"], chain=False)
    path = fp32_model.parent / "unchained.onnx"
    onnx.save(proto, str(path))
    breaks = requantise_breaks(ort_optimised_graph(path))
    assert breaks.get("Add", 0) >= 8 and breaks.get("DQ->Q", 0) > _feature_taps(onnx.load(str(fp32_model)))


def test_gate_figures_are_shown_on_their_side_of_the_threshold():
    """Rounded to 3-4 digits, 0.99894 read as 0.999 in a row marked `failed` against >= 0.999."""
    from hsnet_deploy.console import versus

    assert versus(0.99894, 0.999) == "0.9989"
    assert float(versus(0.9999993, 0.9999995)) < 0.9999995
    assert float(versus(0.99045, 0.99046)) < 0.99046 < float(versus(0.99047, 0.99046))
    assert versus(0.9905, 0.95) == "0.9905" and versus(1.5, 1.0) == "1.5000" and versus(None, 0.5) == "-"


@needs_modelopt
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_int8_without_quantize_takes_the_documented_default_stages(fp32_model, calib_dir, backend):
    """README: INT8 quantises the backbone and the correlation unless --quantize says otherwise (measured in
    docs/benchmarks.md, "INT8: which stages by default"); the learner stays FP32."""
    _meta, stages = variant_module._check_request(fp32_model, "int8", backend, "minmax", calib_dir, None)
    assert tuple(stages) == ("backbone", "correlation")
    _meta, stages = variant_module._check_request(fp32_model, "int8", backend, "minmax", calib_dir, ["learner"])
    assert tuple(stages) == ("learner",)


# --------------------------------------------------------------------------- graph passes on hand-made graphs


def _graph(nodes, inputs, outputs, inits=(), props=None):
    f32 = TensorProto.FLOAT
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info(n, f32, s) for n, s in inputs],
                                   [onnx.helper.make_tensor_value_info(n, f32, None) for n in outputs],
                                   initializer=list(inits))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    if props:
        onnx.helper.set_model_props(model, props)
    return model


def _run(model, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_mask_path_stops_at_a_shape_read_of_the_mask():
    """A Shape of the mask is on the path, but what it yields is a shape, not a mask: the Reshape of a feature
    map by it is not part of the path (nor, then, kept FP32)."""
    from hsnet_deploy.calibration.graph import mask_path_nodes

    h = onnx.helper
    model = _graph([h.make_node("Shape", ["support_masks"], ["s"], name="shape"),
                    h.make_node("Reshape", ["feat", "s"], ["r"], name="reshape"),
                    h.make_node("Mul", ["support_masks", "support_masks"], ["m2"], name="square")],
                   [("support_masks", [1, 4]), ("feat", [4])], ["r", "m2"])
    assert mask_path_nodes(model) == ["shape", "square"]


def test_fp16_mask_nodes_drop_only_a_factor_product_with_one_side_outside_the_path():
    """Div(mask) x feature: the factor product, run in FP16. Div(mask) x (mask + eps): both sides are computed
    on the mask path, so it stays in the FP32 mask group."""
    from hsnet_deploy.calibration.fp16 import mask_nodes

    h = onnx.helper
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    model = _graph([h.make_node("Add", ["support_masks", "eps"], ["den"], name="den"),
                    h.make_node("Div", ["support_masks", "den"], ["factor"], name="factor"),
                    h.make_node("Mul", ["factor", "feat"], ["masked"], name="apply"),
                    h.make_node("Mul", ["factor", "den"], ["self"], name="self_product")],
                   [("support_masks", [1, 4]), ("feat", [1, 4])], ["masked", "self"], inits=[eps])
    assert mask_nodes(model) == ["den", "factor", "self_product"]


def test_fp32_groups_are_checked_by_name():
    from hsnet_deploy.calibration.fp16 import fp32_nodes

    model = _graph([onnx.helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2])], ["y"])
    with pytest.raises(ValueError, match=r"unknown FP32 groups \['masks'\]"):
        fp32_nodes(model, ("masks",))


def test_strongly_typed_check_refuses_a_cast_to_its_own_type():
    from hsnet_deploy.calibration.fp16 import check_strongly_typed

    h = onnx.helper
    same = _graph([h.make_node("Cast", ["x"], ["y"], name="noop_cast", to=TensorProto.FLOAT)], [("x", [2])], ["y"])
    with pytest.raises(RuntimeError, match="Cast noop_cast casts x to its own type"):
        check_strongly_typed(same)
    other = _graph([h.make_node("Cast", ["x"], ["h"], name="to_half", to=TensorProto.FLOAT16),
                    h.make_node("Cast", ["h"], ["y"], name="back", to=TensorProto.FLOAT)], [("x", [2])], ["y"])
    check_strongly_typed(other)


def _conv_bn(var, extra_reader=False):
    h = onnx.helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w", rng.standard_normal((2, 3, 1, 1))), ("b", rng.standard_normal(2)), ("scale", np.array([1.5, 0.5])),
        ("shift", np.array([0.1, -0.2])), ("mean", np.array([0.3, -0.1])), ("var", np.asarray(var))]]
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             h.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], name="bn", epsilon=1e-5)]
    outputs = ["y"]
    if extra_reader:
        nodes.append(h.make_node("Relu", ["c"], ["raw"], name="relu"))
        outputs.append("raw")
    return _graph(nodes, [("x", [1, 3, 4, 4])], outputs, inits=inits)


def test_fold_batchnorm_matches_the_unfolded_graph_for_small_variances():
    """ONNX BatchNormalization divides by sqrt(var + eps); with var ~ eps where the eps goes shows."""
    from hsnet_deploy.calibration.graph import fold_batchnorm

    model = _conv_bn([1e-5, 4e-5])
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = _run(model, {"x": x})[0]
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_batchnorm(folded) == 1 and [n.op_type for n in folded.graph.node] == ["Conv"]
    np.testing.assert_allclose(_run(folded, {"x": x})[0], want, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_a_conv_whose_output_is_read_elsewhere():
    from hsnet_deploy.calibration.graph import fold_batchnorm

    model = _conv_bn([0.5, 2.0], extra_reader=True)
    x = np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = _run(model, {"x": x})
    assert fold_batchnorm(model) == 0
    for got, expected in zip(_run(model, {"x": x}), want, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_requantise_breaks_counts_only_dq_op_q_and_dq_q():
    from hsnet_deploy.calibration.int8 import requantise_breaks

    h = onnx.helper
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "zp")
    nodes = [h.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], name="q"),
             h.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"], name="dq"),
             h.make_node("Relu", ["dq"], ["relu_float"], name="relu_to_float"),  # ends in float: no break
             h.make_node("Add", ["dq", "x"], ["sum"], name="add"),
             h.make_node("QuantizeLinear", ["sum", "scale", "zp"], ["q2"], name="requant"),  # DQ -> Add -> Q
             h.make_node("QuantizeLinear", ["dq", "scale", "zp"], ["q3"], name="dq_q")]  # DQ -> Q
    model = _graph(nodes, [("x", [4])], ["relu_float", "q2", "q3"], inits=[scale, zp])
    assert requantise_breaks(model) == {"Add": 1, "DQ->Q": 1}
    # an op that reads dequantised tensors on two inputs is one break, not two
    twice = [*nodes[:2], h.make_node("Add", ["dq", "dq"], ["sq"], name="double"),
             h.make_node("QuantizeLinear", ["sq", "scale", "zp"], ["q4"], name="requant_sq")]
    model = _graph(twice, [("x", [4])], ["q4"], inits=[scale, zp])
    assert requantise_breaks(model) == {"Add": 1}


def test_calibration_reader_reports_each_feed_after_the_first_and_rewinds():
    """The caller advances its bar once itself; the reader reports the feeds after the first: N calls in all."""
    from hsnet_deploy.calibration.int8 import _Reader

    calls = []
    feeds = [{"x": np.full(1, i, np.float32)} for i in range(3)]
    reader = _Reader(feeds, on_feed=lambda: calls.append(1))
    assert reader.get_first() is feeds[0] and calls == []
    got = []
    while (feed := reader.get_next()) is not None:
        got.append(int(feed["x"][0]))
    assert got == [0, 1, 2] and len(calls) == 2 and len(reader) == 3
    reader.rewind()
    assert reader.get_next() is feeds[0]


def test_an_empty_stage_list_is_refused():
    from hsnet_deploy.calibration.int8 import check_stages

    with pytest.raises(UserError, match=r"--quantize \(empty\): expected one or more of backbone"):
        check_stages([])
    assert check_stages(["correlation", "backbone", "correlation"]) == ("correlation", "backbone")


def test_a_variant_is_not_made_from_a_variant(tmp_path):
    """The library refuses it too, not only the CLI: an FP16 or INT8 model is no FP32 source."""
    h = onnx.helper
    inputs = [("query_img", ["B", 3, 16, 16]), ("support_imgs", ["B", "K", 3, 16, 16]), ("support_masks", ["B", "K", 16, 16])]
    model = _graph([h.make_node("Identity", ["support_masks"], ["logits"], name="l"),
                    h.make_node("Identity", ["query_img"], ["mask"], name="m")], inputs, ["logits", "mask"],
                   props={"hsnet.backbone": "resnet50", "hsnet.img_size": "16", "hsnet.precision": "fp16"})
    onnx.save(model, str(tmp_path / "fp16.onnx"))
    with pytest.raises(UserError, match="fp16.onnx: is already a fp16 variant; make variants from the FP32 export"):
        make_variant(tmp_path / "fp16.onnx", tmp_path / "int8.onnx", "int8", calib_dir=tmp_path, progress=False)
    assert not (tmp_path / "int8.onnx").exists()


def test_tensorrt_quantiser_reports_the_feeds_after_the_first_like_the_onnxruntime_one(tmp_path, monkeypatch):
    """The ModelOpt child reads every feed at once; the parent then reports N - 1 of them (the caller's bar
    counts the last), as _Reader does for onnxruntime. The child is faked: it copies the folded model."""
    import json
    import shutil
    import subprocess

    from hsnet_deploy.calibration.int8 import quantize_tensorrt

    model = _conv_bn([0.5, 2.0])
    onnx.helper.set_model_props(model, {"hsnet.stages": json.dumps({"backbone": ["conv", "bn"]})})
    onnx.save(model, str(tmp_path / "m.onnx"))

    def child(cmd, **kwargs):
        work = cmd[-1]
        shutil.copy(f"{work}/folded.onnx", f"{work}/int8.onnx")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", child)
    calls = []
    feeds = [{"x": np.zeros((1, 3, 4, 4), np.float32)} for _ in range(3)]
    _proto, nodes = quantize_tensorrt(tmp_path / "m.onnx", feeds, ["backbone"], on_feed=lambda: calls.append(1))
    assert nodes == [] and len(calls) == 2  # its one Conv is the last (the logits'): never quantised
