"""PyTorch eager runner: the reference every other backend is compared with and timed against."""

from __future__ import annotations

import time

import numpy as np
import torch

from hsnet_deploy.errors import UserError
from hsnet_deploy.model import HSNet
from hsnet_deploy.runtime.base import INPUT_NAMES, Runner, RunnerInfo


class TorchRunner(Runner):
    """Eager HSNet on the CPU or CUDA; `precision="fp16"` is autocast on CUDA (weights stay FP32)."""

    fixed_image_size = False

    def __init__(self, model: HSNet, device: str = "cpu", precision: str = "fp32", artifact: str = "") -> None:
        super().__init__()
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda: this PyTorch has no CUDA device (torch.cuda.is_available() is False)")
        if precision not in ("fp32", "fp16"):
            raise UserError(f"precision {precision!r}: PyTorch eager runs fp32, or fp16 autocast on CUDA")
        if precision == "fp16" and device != "cuda":
            raise UserError("precision fp16: PyTorch autocast FP16 is for CUDA; on the CPU use fp32")
        self.model = model
        self.device = device
        self.precision = precision
        self.info = RunnerInfo("pytorch", device, precision, artifact, {"backbone": model.backbone_name},
                               backbone=model.backbone_name,
                               authors_weights=getattr(model, "source_format", "") == "authors")

    def activate_impl(self) -> None:
        self.model.to(self.device).eval()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def deactivate_impl(self) -> None:
        if self.device == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def _inputs(self, feed: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.from_numpy(np.ascontiguousarray(feed[n])).to(self.device, non_blocking=True)
            for n in INPUT_NAMES
        )

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q, s, m = self._inputs(feed)
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.precision == "fp16"):
            logits, mask = self.model(q, s, m)
        return {"logits": logits.float().cpu().numpy(), "mask": mask.float().cpu().numpy()}

    def flop_model(self) -> HSNet:
        return self.model

    def profile_stages_impl(self, feed: dict[str, np.ndarray]) -> dict[str, float] | None:
        """Seconds per stage from marks the model sets between its stages (synchronised on CUDA)."""
        q, s, m = self._inputs(feed)
        times: dict[str, float] = {}
        self._sync()
        last = [time.perf_counter()]

        def mark(stage: str) -> None:
            self._sync()
            now = time.perf_counter()
            times[stage] = times.get(stage, 0.0) + now - last[0]
            last[0] = now

        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=self.precision == "fp16"):
            b, k = s.shape[:2]
            logits, _ = self.model.support_logits(q, s, m, mark=mark)
            from hsnet_deploy.model import kshot_vote

            kshot_vote(logits.reshape(b, k, 2, *q.shape[-2:]))
            mark("other")
        return times

    def device_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else None
