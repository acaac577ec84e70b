"""The one runner interface every backend implements (Polygraphy's shape): bench, eval and predict
never branch on the backend and never name a runner class; `open_artifact` makes every runner.

    with open_artifact(path) as runner:
        outputs = runner.infer({"query_img": q, "support_imgs": s, "support_masks": m})
        outputs["logits"], outputs["mask"], runner.inference_times[-1]

Subclasses implement `activate_impl`, `infer_impl`, `deactivate_impl` (and optionally
`profile_stages_impl`, `flop_model`); the public methods check the state and never change signature.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from hsnet_deploy.artifacts import INPUT_NAMES, OUTPUT_NAMES

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "Runner", "RunnerInfo", "input_shapes"]
STAGES = ("backbone", "correlation", "learner", "decoder", "other")
AUTHORS_IMG_SIZE = 400  # an eager checkpoint takes any valid size; the authors evaluate at 400


def input_shapes(batch, shots, height: int, width: int) -> dict[str, tuple]:
    """The contract's input shapes for B episodes of K shots at H x W."""
    return {"query_img": (batch, 3, height, width), "support_imgs": (batch, shots, 3, height, width),
            "support_masks": (batch, shots, height, width)}


@dataclass
class RunnerInfo:
    """What a runner is, for tables and JSON: e.g. backend 'onnxruntime', device 'cpu', precision 'fp32'.

    `img_size` is the artifact's fixed H = W (an eager checkpoint: the authors' 400), `backbone` its backbone,
    `authors_weights` whether it was made from the authors' released weights (paper figures apply),
    `metadata` what the artifact file says of itself (source weights, seed, profile, versions)."""

    backend: str
    device: str
    precision: str
    artifact: str = ""
    details: dict = field(default_factory=dict)
    img_size: int = AUTHORS_IMG_SIZE
    backbone: str | None = None
    authors_weights: bool = False
    metadata: dict = field(default_factory=dict)  # the artifact's own metadata (empty for an in-memory model)

    @classmethod
    def from_metadata(cls, backend: str, device: str, meta: dict, artifact: str, details: dict,
                      default_precision: str = "fp32") -> RunnerInfo:
        """An artifact runner's facts, all read off the artifact's own metadata."""
        return cls(backend, device, str(meta.get("precision", default_precision)), artifact, details,
                   img_size=int(meta.get("img_size", 0)), backbone=meta.get("backbone"),
                   authors_weights=meta.get("checkpoint_format") == "authors", metadata=dict(meta))

    def profile_max(self, axis: str) -> int | None:
        """The largest B ('batch') or K ('shots') a TensorRT plan's optimisation profile admits; None: no cap."""
        dims = (self.metadata.get("profile") or {}).get(axis)
        return int(dims[-1]) if dims else None

    @property
    def label(self) -> str:
        return f"{self.backend}-{self.device} {self.precision}"


class Runner(ABC):
    """Context manager that owns its resources (sessions, engines, device buffers) between enter and exit.

    `infer` takes and returns host numpy arrays keyed by the contract's names, and appends its
    wall time (seconds, including host<->device copies) to `inference_times`.
    """

    info: RunnerInfo
    supports_device_io = False

    def __init__(self) -> None:
        self.inference_times: list[float] = []
        self.active = False

    @property
    def meta(self) -> dict:
        """The artifact's own metadata (empty for an in-memory model)."""
        return self.info.metadata

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Allocate: load the model, create sessions or contexts."""
        if self.active:
            raise RuntimeError(f"{type(self).__name__} is already active")
        self.activate_impl()
        self.active = True

    def deactivate(self) -> None:
        """Free what activate allocated; a no-op when not active."""
        if not self.active:
            return
        self.active = False
        self.deactivate_impl()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.active:
            raise RuntimeError(f"{type(self).__name__}.infer called outside its `with` block")
        start = time.perf_counter()
        out = self.infer_impl(feed)
        self.inference_times.append(time.perf_counter() - start)
        return out

    def profile_stages(self, feed: dict[str, np.ndarray]) -> dict[str, float] | None:
        """Seconds per stage (STAGES) for one call on `feed`, or None where the backend cannot tell."""
        if not self.active:
            raise RuntimeError(f"{type(self).__name__}.profile_stages called outside its `with` block")
        return self.profile_stages_impl(feed)

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    @abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def profile_stages_impl(self, feed: dict[str, np.ndarray]) -> dict[str, float] | None:
        return None

    def flop_model(self):
        """A PyTorch module with HSNet's forward signature to count FLOPs with, or None."""
        return

    def infer_device(self, feed: dict) -> dict:
        """Device I/O: inputs already on the GPU (torch tensors or DLPack), outputs left there as torch tensors.
        Only runners with `supports_device_io` have it (ONNX Runtime on CUDA); the others refuse it, and
        `bench` asks `supports_device_io` before calling it. Their `infer` stays the host-I/O path."""
        raise RuntimeError(f"{type(self).__name__} has no device I/O (supports_device_io is False); "
                           "use infer() with host arrays")

    def device_memory_bytes(self) -> int | None:
        """Peak device memory this runner used, or None on the CPU (bench then reports process RSS)."""
        return None
