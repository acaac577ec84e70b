"""The anchor: the project's own HSNet under torch.compile, what a user gets with one line and no toolkit.

Every GPU `bench` table carries it beside eager, so a deployed artifact is always compared with the best
a plain PyTorch user has: `torch.compile(model, mode="reduce-overhead")` (Inductor kernels replayed as
CUDA graphs) under FP16 autocast. Compilation happens on the first call of each (B, K); that call's time
is recorded as the compile time.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from hsnet_deploy.runtime.base import RunnerInfo
from hsnet_deploy.runtime.torch_runner import TorchRunner

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledTorchRunner(TorchRunner):
    """torch.compile'd HSNet; `backend` other than inductor is for tests (e.g. "eager" checks the wiring)."""

    def __init__(self, model, device: str = "cuda", precision: str = "fp16", mode: str = "reduce-overhead",
                 backend: str = "inductor", artifact: str = "") -> None:
        super().__init__(model, device, precision, artifact)
        if mode not in COMPILE_MODES:
            raise ValueError(f"torch.compile mode {mode!r}: one of {', '.join(COMPILE_MODES)}")
        self.mode, self.backend = mode, backend
        self.compiled = None
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self.info = RunnerInfo("torch.compile", device, precision, artifact,
                               {"backbone": model.backbone_name, "mode": mode, "backend": backend,
                                "compile_s": self.compile_seconds}, backbone=model.backbone_name,
                               authors_weights=getattr(model, "source_format", "") == "authors")

    def activate_impl(self) -> None:
        super().activate_impl()
        torch._dynamo.reset()  # a fresh compile per `with` block, so the compile time is measured, not cached
        options = {"mode": self.mode} if self.backend == "inductor" else {}
        self.compiled = torch.compile(self.model, backend=self.backend, dynamic=False, **options)

    def deactivate_impl(self) -> None:
        self.compiled = None
        super().deactivate_impl()

    def profile_stages_impl(self, feed: dict[str, np.ndarray]) -> dict[str, float] | None:
        return None  # compiled kernels fuse across the stage marks

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q, s, m = self._inputs(feed)
        key = tuple(int(d) for d in s.shape[:2])
        start = time.perf_counter()
        if self.mode == "reduce-overhead" and self.device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs were copied out already
        with torch.no_grad(), torch.autocast("cuda", torch.float16, enabled=self.precision == "fp16"):
            logits, mask = self.compiled(q, s, m)
        out = {"logits": logits.float().cpu().numpy(), "mask": mask.float().cpu().numpy()}
        if key not in self.compile_seconds:
            self.compile_seconds[key] = time.perf_counter() - start
        return out
