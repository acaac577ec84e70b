"""ONNX Runtime runner: CPU EP, or CUDA EP with I/O binding when onnxruntime-gpu is installed."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import numpy as np

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import OUTPUT_NAMES, Runner, RunnerInfo
from hsnet_deploy.runtime.ort_cuda import (
    FixedIoBinding,
    capture_refusal,
    check_cuda_graph_request,
    cuda_provider_options,
)

GPU_INSTALL = "pip install onnxruntime-gpu  (after `pip uninstall onnxruntime`: the two wheels share a module)"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtRunner(Runner):
    """One InferenceSession per `with` block.

    device "cpu": intra-op threads default to the physical cores (ONNX Runtime's own default).
    device "cuda": CUDA EP; inputs and outputs bound once per (B, K) to fixed device buffers
    (runtime/ort_cuda.py), new inputs copied into them in place; `cuda_graph` captures one CUDA graph per
    shape; `infer_device` takes CUDA tensors without a host round trip; `ep_options` sets CUDA EP options.
    """

    def __init__(
        self,
        model_path: str,
        meta: dict,
        device: str = "cpu",
        threads: int | None = None,
        cuda_graph: bool = False,
        optimization: str = "all",
        ep_options: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model_path = model_path
        self.meta = meta
        self.device = device
        self.threads = threads
        self.cuda_graph = cuda_graph
        self.optimization = optimization
        self.ep_options = dict(ep_options or {})
        if cuda_graph:
            check_cuda_graph_request(device, available_providers(), model_path)
        cuda_provider_options(self.ep_options)  # refuses a bad option now, not at activate
        self.session = None
        self.fixed_io: FixedIoBinding | None = None
        self.profile_dir: str | None = None
        self.info = RunnerInfo("onnxruntime", device, str(meta.get("precision", "fp32")), model_path,
                               {"backbone": meta.get("backbone"), "threads": threads})
        if device == "cuda":
            self.info.details.update({"cuda_graph": cuda_graph, "cuda_ep": cuda_provider_options(self.ep_options)})

    def _providers(self) -> list:
        have = available_providers()
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in have:
                raise UserError(f"{self.model_path}: ONNX Runtime has no CUDA provider here; {GPU_INSTALL}")
            return [("CUDAExecutionProvider", cuda_provider_options(self.ep_options, self.cuda_graph)),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def session_options(self, profile: bool = False):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.optimization]
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if profile:
            self.profile_dir = tempfile.mkdtemp(prefix="hsnet-ort-profile-")
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(self.profile_dir, "ort")
        return opts

    def activate(self, profile: bool = False) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(self.model_path, self.session_options(profile), providers=self._providers())
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for bad files
            if self.cuda_graph and "graph" in str(exc).lower():
                raise capture_refusal(self.model_path, exc) from None
            raise UserError(f"{self.model_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        if self.device == "cuda":
            self.fixed_io = FixedIoBinding(self.session, self.cuda_graph, what=self.model_path)

    def deactivate(self) -> None:
        self.fixed_io = None
        self.session = None

    @property
    def supports_device_io(self) -> bool:  # type: ignore[override]
        return self.device == "cuda"

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device != "cuda":
            outputs = self.session.run(list(OUTPUT_NAMES), feed)
            return dict(zip(OUTPUT_NAMES, outputs))
        return self.fixed_io.run_host(feed)

    def infer_device(self, feed: dict) -> dict:
        if not self.active or self.fixed_io is None:
            raise RuntimeError("OrtRunner.infer_device needs device cuda and an open `with` block")
        return self.fixed_io.run_device(feed)

    def profile_stages(self, feed: dict[str, np.ndarray], stage_of: dict[str, str], runs: int = 3) -> dict[str, float]:
        """Seconds per stage per episode, from ONNX Runtime's own profiler (a separate profiling session)."""
        self.activate(profile=True)
        try:
            for _ in range(runs + 1):
                self.infer_impl(feed)
            trace = self.session.end_profiling()
        finally:
            self.activate(profile=False)
        with open(trace) as fh:
            events = json.load(fh)
        per_stage: dict[str, float] = defaultdict(float)
        run_index = -1
        for event in events:
            if event.get("cat") == "Session" and event.get("name") == "model_run":
                run_index += 1
            if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
                continue
            if run_index < 0:  # nodes of the first run (it warms up) come before its model_run event
                continue
            node = event["name"][: -len("_kernel_time")]
            per_stage[stage_of.get(node, _fused_stage(node, stage_of))] += event["dur"] * 1e-6
        return {k: v / runs for k, v in per_stage.items()}


def _fused_stage(node: str, stage_of: dict[str, str]) -> str:
    """ORT renames the nodes it rewrites (`<output>_nchwc`, `<node>_token_N`, ...): strip the known suffix,
    else match the longest known prefix."""
    for suffix in ("_nchwc",):
        if node.endswith(suffix) and node[: -len(suffix)] in stage_of:
            return stage_of[node[: -len(suffix)]]
    best = ""
    for name in stage_of:
        if node.startswith(name) and len(name) > len(best):
            best = name
    return stage_of.get(best, "other")
