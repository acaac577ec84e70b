"""ONNX Runtime runner: CPU EP, or CUDA EP with I/O binding when onnxruntime-gpu is installed."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import numpy as np

from hsnet_deploy.artifacts import stage_of_node
from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import OUTPUT_NAMES, Runner, RunnerInfo, input_shapes
from hsnet_deploy.runtime.ort_cuda import (
    FixedIoBinding,
    capture_refusal,
    check_cuda_graph_request,
    cuda_provider_options,
    nodes_off_cuda,
)
from hsnet_deploy.runtime.ort_options import session_options

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
        ep_options: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model_path = model_path
        self.device = device
        self.threads = threads
        self.cuda_graph = cuda_graph
        self.ep_options = dict(ep_options or {})
        if cuda_graph:
            check_cuda_graph_request(device, available_providers(), model_path)
        cuda_options = cuda_provider_options(self.ep_options)  # refuses a bad option now, not at activate
        self.session = None
        self.fixed_io: FixedIoBinding | None = None
        self.info = RunnerInfo.from_metadata("onnxruntime", device, meta, model_path,
                                             {"backbone": meta.get("backbone"), "threads": threads})
        if device == "cuda":
            self.info.details.update({"cuda_graph": cuda_graph, "cuda_ep": cuda_options})

    def _providers(self, cuda_graph: bool) -> list:
        have = available_providers()
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in have:
                raise UserError(f"{self.model_path}: ONNX Runtime has no CUDA provider here; {GPU_INSTALL}")
            return [("CUDAExecutionProvider", cuda_provider_options(self.ep_options, cuda_graph)),
                    "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _open_session(self, profile_prefix: str | None = None, cuda_graph: bool | None = None):
        """A session with this runner's options; `cuda_graph` False opens it without capture (profiles)."""
        import onnxruntime as ort

        graph = self.cuda_graph if cuda_graph is None else cuda_graph
        opts = session_options("all", self.threads, profile_prefix=profile_prefix)
        try:
            return ort.InferenceSession(self.model_path, opts, providers=self._providers(graph))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for bad files
            if graph and "graph" in str(exc).lower():
                raise capture_refusal(self.model_path, exc, self._nodes_off_cuda()) from None
            raise UserError(f"{self.model_path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None

    def _profiled_events(self, feed: dict[str, np.ndarray], runs: int) -> list[dict]:
        """ONNX Runtime's profile of `runs` calls on `feed`, in a separate session without graph capture (a
        replayed graph has no per-node events); the trace goes to a temporary folder, removed after."""
        with tempfile.TemporaryDirectory(prefix="hsnet-ort-profile-") as tmp:
            session = self._open_session(profile_prefix=os.path.join(tmp, "ort"), cuda_graph=False)
            fixed_io = FixedIoBinding(session, False, what=self.model_path) if self.device == "cuda" else None
            for _ in range(runs):
                if fixed_io is None:
                    session.run(list(OUTPUT_NAMES), feed)
                else:
                    fixed_io.run_host(feed)
            with open(session.end_profiling()) as fh:
                return json.load(fh)

    def _nodes_off_cuda(self) -> list[str]:
        """The nodes this model runs outside the CUDA EP with these EP options, for the capture refusal: the
        profile of one run of an all-zero B = K = 1 episode ([] if that fails too; the refusal then says what
        ONNX Runtime said)."""
        size = int(self.info.img_size)
        zeros = {n: np.zeros(s, np.float32) for n, s in input_shapes(1, 1, size, size).items()}
        try:
            return nodes_off_cuda(self._profiled_events(zeros, 1))
        except Exception:  # noqa: BLE001 - a diagnosis that fails must not hide the refusal itself
            return []

    def activate_impl(self) -> None:
        self.session = self._open_session()
        if self.device == "cuda":
            self.fixed_io = FixedIoBinding(self.session, self.cuda_graph, what=self.model_path)

    def deactivate_impl(self) -> None:
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

    def profile_stages_impl(self, feed: dict[str, np.ndarray], runs: int = 3) -> dict[str, float] | None:
        """Seconds per stage per episode, from ONNX Runtime's own profiler in a separate session (its
        trace goes to a temporary folder, removed after). A replayed CUDA graph has no per-node times."""
        stage_of = stage_of_node(self.meta)
        if self.cuda_graph or not stage_of:
            return None
        events = self._profiled_events(feed, runs + 1)
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


# Prefixes ONNX Runtime puts before the names of nodes it rewrites: the CPU EP's FP16 fallback wraps a node that
# has no FP16 kernel in Casts and renames it (an FP16 variant's convs: `InsertedPrecisionFreeCast_relu_44_nchwc`).
ORT_NAME_PREFIXES = ("InsertedPrecisionFreeCast_",)


def _fused_stage(node: str, stage_of: dict[str, str]) -> str:
    """ORT renames the nodes it rewrites (`<output>_nchwc`, `<node>_token_N`, `InsertedPrecisionFreeCast_<node>`):
    strip the known prefix and suffix, else match the longest known prefix."""
    for prefix in ORT_NAME_PREFIXES:
        if node.startswith(prefix) and node[len(prefix):]:
            node = node[len(prefix):]
            if node in stage_of:
                return stage_of[node]
    for suffix in ("_nchwc",):
        if node.endswith(suffix) and node[: -len(suffix)] in stage_of:
            return stage_of[node[: -len(suffix)]]
    best = ""
    for name in stage_of:
        if node.startswith(name) and len(name) > len(best):
            best = name
    return stage_of.get(best, "other")
