"""The one runner interface every backend implements (Polygraphy's shape): bench, eval and predict
never branch on the backend.

    with open_artifact(path) as runner:
        outputs = runner.infer({"query_img": q, "support_imgs": s, "support_masks": m})
        outputs["logits"], outputs["mask"], runner.inference_times[-1]
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

INPUT_NAMES = ("query_img", "support_imgs", "support_masks")
OUTPUT_NAMES = ("logits", "mask")


@dataclass
class RunnerInfo:
    """What a runner is, for tables and JSON: e.g. backend 'onnxruntime', device 'cpu', precision 'fp32'."""

    backend: str
    device: str
    precision: str
    artifact: str = ""
    details: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.device} {self.precision}"


class Runner(ABC):
    """Context manager that owns its resources (sessions, engines, device buffers) between enter and exit.

    `infer` takes and returns host numpy arrays keyed by the contract's names, and appends its
    wall time (seconds, including host<->device copies) to `inference_times`.
    """

    info: RunnerInfo

    def __init__(self) -> None:
        self.inference_times: list[float] = []
        self.active = False

    def __enter__(self):
        self.activate()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        self.deactivate()

    def activate(self) -> None:
        """Allocate: load the model, create sessions or contexts. Called once by __enter__."""

    def deactivate(self) -> None:
        """Free what activate allocated."""

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"{type(self).__name__}.infer called outside its `with` block")
        start = time.perf_counter()
        out = self.infer_impl(feed)
        self.inference_times.append(time.perf_counter() - start)
        return out

    @abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    supports_device_io = False

    def infer_device(self, feed: dict) -> dict:
        """Device I/O: inputs already on the GPU (torch tensors or DLPack), outputs left there as torch tensors.
        Only runners with `supports_device_io` have it; their `infer` stays the host-I/O path."""
        raise NotImplementedError(f"{type(self).__name__} takes host arrays only; use infer()")

    def device_memory_bytes(self) -> int | None:
        """Peak device memory this runner used, or None on the CPU (bench then reports process RSS)."""
        return None
