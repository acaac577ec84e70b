"""`build-engine --backend onnxruntime`: an ONNX Runtime-optimised model, saved with its metadata.

ONNX Runtime applies its graph optimisations (constant folding, Conv+BN+ReLU fusion, layout changes)
once here instead of at every session start. The saved graph may hold provider-specific fused ops,
so the metadata records the ONNX Runtime version and device it was optimised for, and the runner
refuses it elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hsnet_deploy.artifacts import atomic_path, check_output_path, meta_to_props, props_to_meta, tool_versions
from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.artifact import read_onnx_meta
from hsnet_deploy.runtime.ort_options import session_options


def build_ort_model(onnx_path: str | os.PathLike, out_path: str | os.PathLike, device: str = "cpu",
                    level: str = "extended") -> dict:
    """Optimise with ONNX Runtime and write the result atomically; returns the artifact's metadata.

    `extended` (not `all`) by default: the `all` level adds NCHWc layout transforms that ONNX Runtime
    re-derives at load time anyway and that tie the file to one CPU's vector width.
    """
    import onnx
    import onnxruntime as ort

    src = Path(onnx_path)
    meta = read_onnx_meta(src)
    out = check_output_path(out_path)
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--device cuda: ONNX Runtime has no CUDA provider here (pip install onnxruntime-gpu)")
    with tempfile.TemporaryDirectory(prefix="hsnet-ort-") as tmp:
        optimised = Path(tmp) / "optimised.onnx"
        opts = session_options(level, optimized_path=str(optimised))
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        ort.InferenceSession(str(src), opts, providers=providers)
        proto = onnx.load(str(optimised))
    meta.update({
        "format": "hsnet-deploy/ort-optimised-v1",
        "source_model": src.name,
        "ort_version": ort.__version__,
        "ort_device": device,
        "ort_optimization": level,
        "versions": tool_versions(),
    })
    existing = props_to_meta({p.key: p.value for p in proto.metadata_props})
    existing.update(meta)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta_to_props(existing))
    with atomic_path(out) as tmp_out:
        onnx.save(proto, str(tmp_out))
    return existing
