"""INT8: explicit QuantizeLinear/DequantizeLinear on the weighted ops of the chosen stages, calibrated
on episodes. One scheme per backend, because the fast one differs:

- `tensorrt`: ModelOpt's `modelopt.onnx.quantization` (NVIDIA's path for strongly typed TensorRT):
  symmetric int8 activations and weights, zero-points 0, Q/DQ only on the inputs of the weighted ops,
  which is what TensorRT fuses into int8 kernels. The rest of the graph stays FP32.
- `onnxruntime`: onnxruntime's `quantize_static` in QDQ format with uint8 asymmetric activations and
  per-channel symmetric int8 weights: ONNX Runtime's x86 kernels (QLinearConv, QLinearMatMul) are
  u8s8 (VNNI); with symmetric int8 activations the same placement ran slower than FP32 (measured).
  The non-weighted ops between them (graph.chain_nodes) get Q/DQ as well, so ONNX Runtime's optimised
  graph chains QLinear kernels instead of going back to float at every residual Add and ReLU;
  `requantise_breaks` reports any DQ -> op -> Q left in the graph ONNX Runtime actually runs.

Both start from the FP32 export with BatchNorm folded into the Convs (graph.fold_batchnorm), so each
quantised Conv is followed directly by its ReLU. Stages to quantise are a user's choice
(`DEFAULT_STAGES` were measured with benchmarks/precision.py); the support-mask resize and the learner's
and decoder's resize MatMuls are never quantised (see graph.weighted_nodes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from hsnet_deploy.calibration.graph import CHAINABLE_OPS, STAGES, chain_nodes, fold_batchnorm, weighted_nodes
from hsnet_deploy.errors import UserError
from hsnet_deploy.export.graph_index import GraphIndex

# Stages quantised by default: backbone + correlation keep the masks' agreement with FP32; the learner
# loses as much as a broken calibration (figures: docs/benchmarks.md, "INT8: which stages by default").
# Users with trained weights and ground truth can opt in (`quantize=`) and let the gate decide.
DEFAULT_STAGES = {
    "onnxruntime": ("backbone", "correlation"),
    "tensorrt": ("backbone", "correlation"),
}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearConcat",
                "QLinearGlobalAveragePool", "QGemm", "DynamicQuantizeMatMul", "FusedConv", "NhwcQLinearConv")


@contextlib.contextmanager
def quiet_quantisers():
    """Silence ONNX Runtime's "run pre-processing" hint and ModelOpt's INFO/NVML chatter for one call;
    failures still raise."""
    names = ("", "modelopt", "modelopt.onnx", "modelopt.onnx.autocast")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def check_stages(stages: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(stages))
    bad = [s for s in chosen if s not in STAGES]
    if bad or not chosen:
        raise UserError(f"--quantize {','.join(chosen) or '(empty)'}: expected one or more of {', '.join(STAGES)}")
    return chosen


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over prepared feeds, with a callback."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], on_feed: Callable[[], None] | None = None) -> None:
        self.feeds = feeds
        self.on_feed = on_feed
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.feeds):
            return None
        if self.on_feed and self.pos:
            self.on_feed()
        self.pos += 1
        return self.feeds[self.pos - 1]

    def get_first(self) -> dict[str, np.ndarray]:
        """ModelOpt's extension: a test run's feed, without advancing."""
        return self.feeds[0]

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.feeds)


def prepare(src_path: str | os.PathLike, work: Path) -> tuple[Path, onnx.ModelProto]:
    """The FP32 model with BatchNorm folded, written to `work` (quantisers read files)."""
    proto = onnx.load(str(src_path))
    fold_batchnorm(proto)
    path = work / "folded.onnx"
    onnx.save(proto, str(path))
    return path, proto


def quantize_onnxruntime(
    src_path: str | os.PathLike,
    feeds: list[dict[str, np.ndarray]],
    stages: Iterable[str],
    method: str = "minmax",
    on_feed: Callable[[], None] | None = None,
    chain: bool = True,
) -> tuple[onnx.ModelProto, list[str]]:
    """uint8-activation QDQ model for ONNX Runtime's CPU kernels; returns it and the quantised weighted nodes.

    chain: also quantise the ops between them (graph.chain_nodes) so ONNX Runtime chains QLinear kernels;
    False gives the older placement (Q/DQ on the weighted ops only), kept for comparison.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="hsnet-int8-") as tmp, quiet_quantisers():
        folded, proto = prepare(src_path, Path(tmp))
        nodes = weighted_nodes(proto, set(stages))
        chained = chain_nodes(proto, set(stages)) if chain else []
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(folded), str(out), _Reader(feeds, on_feed), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", *CHAINABLE_OPS], nodes_to_quantize=nodes + chained,
            per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        return onnx.load(str(out)), nodes


def quantize_tensorrt(
    src_path: str | os.PathLike,
    feeds: list[dict[str, np.ndarray]],
    stages: Iterable[str],
    method: str = "minmax",
    on_feed: Callable[[], None] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """Symmetric int8 Q/DQ (zero-point 0) on weighted-op inputs, by ModelOpt, for TensorRT.

    ModelOpt monkeypatches onnxruntime.quantization when it runs, which breaks a later `quantize_static`
    in the same process (measured: "Quantization parameters are not specified for param query_img"), so
    it runs in a child process that reads the folded model and the feeds from a temporary directory.
    """
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="hsnet-int8-") as tmp:
        _, proto = prepare(src_path, Path(tmp))
        nodes = weighted_nodes(proto, set(stages))
        for i, feed in enumerate(feeds):
            np.savez(Path(tmp) / f"feed{i:05d}.npz", **feed)
        (Path(tmp) / "job.json").write_text(json.dumps({"nodes": nodes, "method": method}))
        import hsnet_deploy

        env = dict(os.environ)  # the child imports this very copy of hsnet_deploy
        package_root = str(Path(hsnet_deploy.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "hsnet_deploy.calibration.int8", tmp],
                              capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"ModelOpt INT8 quantisation failed: {' / '.join(tail)}")
        if on_feed:
            for _ in feeds[1:]:
                on_feed()
        return onnx.load(str(Path(tmp) / "int8.onnx")), nodes


def _modelopt_job(tmp: str) -> None:
    """Child-process side of quantize_tensorrt."""
    import json
    import re

    from modelopt.onnx.quantization import quantize

    work = Path(tmp)
    job = json.loads((work / "job.json").read_text())
    feeds = []
    for path in sorted(work.glob("feed*.npz")):
        with np.load(path) as data:
            feeds.append({k: data[k] for k in data.files})
    methods = {"minmax": "max", "entropy": "entropy", "percentile": "max"}
    with quiet_quantisers():
        quantize(
            str(work / "folded.onnx"), quantize_mode="int8", calibration_data_reader=_Reader(feeds),
            calibration_method=methods[job["method"]], calibration_eps=["cpu"],
            op_types_to_quantize=["Conv", "MatMul"], nodes_to_quantize=[f"^{re.escape(n)}$" for n in job["nodes"]],
            high_precision_dtype="fp32", use_zero_point=False, output_path=str(work / "int8.onnx"),
            log_level="CRITICAL",
        )


def qdq_summary(proto: onnx.ModelProto) -> dict:
    """Which ops take Q/DQ inputs, the integer types used, and whether every zero-point is 0."""
    index = GraphIndex.of(proto)
    inits = index.initializers
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    quantised, zero_points, types = Counter(), [], set()
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zp = _const(node.input[2], inits, consts)
            if zp is not None:
                zero_points.append(zp)
                types.add(str(zp.dtype))
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            continue
        if any(index.made_by(i, "DequantizeLinear") for i in node.input):
            quantised[node.op_type] += 1
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            types.add(str(numpy_helper.to_array(inits[node.input[0]]).dtype))
    return {"quantised_ops": dict(quantised), "int_types": sorted(types),
            "zero_points_all_zero": all(not np.any(z) for z in zero_points),
            "qdq_nodes": sum(1 for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))}


def _const(name: str, inits: dict, consts: dict) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        return numpy_helper.to_array(consts[name].attribute[0].t)
    return None


def quantised_inputs(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes that consume a DequantizeLinear output: where the Q/DQ pairs actually sit."""
    index = GraphIndex.of(proto)
    return [n.name for n in proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(index.made_by(i, "DequantizeLinear") for i in n.input)]


def ort_optimised_graph(model_path: str | os.PathLike, threads: int | None = None) -> onnx.ModelProto:
    """The graph ONNX Runtime's CPU EP actually runs (extended optimisations: Q/DQ fused into QLinear ops)."""
    import onnxruntime as ort

    from hsnet_deploy.runtime.ort_options import session_options

    with tempfile.TemporaryDirectory(prefix="hsnet-ortopt-") as tmp:
        opts = session_options("extended", threads, optimized_path=str(Path(tmp) / "opt.onnx"))
        ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(str(Path(tmp) / "opt.onnx"))


def ort_int8_kernels(model_path: str | os.PathLike, threads: int | None = None) -> dict[str, int]:
    """Op counts of ONNX Runtime's optimised graph for the CPU: proof that Q/DQ became int8 kernels.

    ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv (and MatMul into QLinearMatMul / MatMulInteger);
    DequantizeLinear nodes left over mark where the graph goes back to float.
    """
    counts = Counter(n.op_type for n in ort_optimised_graph(model_path, threads).graph.node)
    keep = (*INT8_KERNELS, "QuantizeLinear", "DequantizeLinear", "Conv", "MatMul")
    return {op: counts[op] for op in keep if counts.get(op)}


def requantise_breaks(optimised: onnx.ModelProto) -> dict[str, int]:
    """Where an int8 chain is broken in an optimised graph: DequantizeLinear -> Q directly ("DQ->Q"), or
    DequantizeLinear -> op -> QuantizeLinear around an op ONNX Runtime could have run on uint8
    (graph.CHAINABLE_OPS), counted by that op's type. An empty dict means every such op stayed in int8.
    """
    index = GraphIndex.of(optimised)
    broken: dict[tuple[str, ...], str] = {}  # each op once (by its outputs), however many inputs DQs write
    for dq in optimised.graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        for node in index.readers(dq.output[0]):
            if node.op_type == "QuantizeLinear":
                broken[tuple(node.output)] = "DQ->Q"
            elif node.op_type in CHAINABLE_OPS and any(
                    c.op_type == "QuantizeLinear" for out in node.output for c in index.readers(out)):
                broken[tuple(node.output)] = node.op_type
    return dict(Counter(broken.values()))


if __name__ == "__main__":
    import sys

    _modelopt_job(sys.argv[1])
