"""ONNX Runtime runner: CPU EP, or CUDA EP with I/O binding when onnxruntime-gpu is installed."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import numpy as np

from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import OUTPUT_NAMES, Runner, RunnerInfo

GPU_INSTALL = "pip install onnxruntime-gpu  (after `pip uninstall onnxruntime`: the two wheels share a module)"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtRunner(Runner):
    """One InferenceSession per `with` block.

    device "cpu": intra-op threads default to the physical cores (ONNX Runtime's own default).
    device "cuda": CUDA EP; inputs are bound once per call and outputs are bound to device memory
    and copied back once, so no per-node host round trips (I/O binding).
    """

    def __init__(
        self,
        model_path: str,
        meta: dict,
        device: str = "cpu",
        threads: int | None = None,
        cuda_graph: bool = False,
        optimization: str = "all",
    ) -> None:
        super().__init__()
        self.model_path = model_path
        self.meta = meta
        self.device = device
        self.threads = threads
        self.cuda_graph = cuda_graph
        self.optimization = optimization
        self.session = None
        self.profile_dir: str | None = None
        self.info = RunnerInfo("onnxruntime", device, str(meta.get("precision", "fp32")), model_path,
                               {"backbone": meta.get("backbone"), "threads": threads})

    def _providers(self) -> list:
        have = available_providers()
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in have:
                raise UserError(f"{self.model_path}: ONNX Runtime has no CUDA provider here; {GPU_INSTALL}")
            opts = {"enable_cuda_graph": "1"} if self.cuda_graph else {}
            return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
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
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for bad files
            raise UserError(f"{self.model_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None

    def deactivate(self) -> None:
        self.session = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device != "cuda":
            outputs = self.session.run(list(OUTPUT_NAMES), feed)
            return dict(zip(OUTPUT_NAMES, outputs))
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in OUTPUT_NAMES:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(OUTPUT_NAMES, binding.copy_outputs_to_cpu()))

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
