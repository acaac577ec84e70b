"""Precision variants behind an accuracy gate: FP16 (mixed-precision ONNX) and INT8 (explicit Q/DQ).

Entry point: `make_variant` (variant.py). Modules: episodes.py (calibration / gate episodes from a
directory), fp16.py, int8.py, gate.py, graph.py (stages, mask path, BatchNorm folding), synthetic.py.
ModelOpt and ONNX Runtime's quantiser are imported inside the functions that use them.
"""

from hsnet_deploy.calibration.gate import GateReport, GateThresholds
from hsnet_deploy.calibration.variant import BACKENDS, PRECISIONS, make_variant

__all__ = ["BACKENDS", "PRECISIONS", "GateReport", "GateThresholds", "make_variant"]
