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
from hsnet_deploy.errors import UserError

__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "Runner", "RunnerInfo", "input_shapes"]
STAGES = ("backbone", "correlation", "learner", "decoder", "other")
AUTHORS_IMG_SIZE = 400  # an eager checkpoint takes any valid size; the authors evaluate at 400


def input_shapes(batch, shots, height: int, width: int) -> dict[str, tuple]:
    """The contract's input shapes for B episodes of K shots at H x W."""
    return {"query_img": (batch, 3, height, width), "support_imgs": (batch, shots, 3, height, width),
            "support_masks": (batch, shots, height, width)}


def check_feed(feed: object, img_size: int | None = None, device_io: bool = False) -> None:
    """Refuse, naming the input, what the contract's inputs are not: float32 numpy arrays (B, 3, H, W),
    (B, K, 3, H, W), (B, K, H, W) with one B >= 1, K >= 1, H and W (`img_size` where the artifact fixes it) and
    masks within [0, 1]. Without it each backend failed its own way, or ran: PyTorch took uint8 images
    unnormalised, and ONNX Runtime and PyTorch gave different answers for masks of -1 / 1."""
    if not isinstance(feed, dict):
        raise UserError(f"infer takes a dict of numpy arrays keyed {', '.join(INPUT_NAMES)}, not a "
                        f"{type(feed).__name__}")
    missing, extra = [n for n in INPUT_NAMES if n not in feed], [k for k in feed if k not in INPUT_NAMES]
    if missing or extra:
        what = "; ".join(filter(None, [f"missing {', '.join(missing)}" if missing else "",
                                       f"unknown {', '.join(map(str, extra))}" if extra else ""]))
        raise UserError(f"inputs: {what} (the model takes {', '.join(INPUT_NAMES)})")
    for name in INPUT_NAMES:
        value = feed[name]
        if not isinstance(value, np.ndarray):
            where = "CUDA tensors go to infer_device" if device_io else "convert a tensor with .cpu().numpy()"
            raise UserError(f"{name}: a {type(value).__name__}; infer takes numpy arrays ({where})")
        if value.dtype != np.float32:
            raise UserError(f"{name}: dtype {value.dtype}, the model takes float32 (images normalised as "
                            "hsnet_deploy.data.preprocess does, masks 0 / 1)")
    shapes = {n: tuple(feed[n].shape) for n in INPUT_NAMES}
    supports, query = shapes["support_imgs"], shapes["query_img"]
    expected = input_shapes(*supports[:2], *query[-2:]) if len(supports) == 5 and len(query) == 4 else None
    if expected != shapes:
        raise UserError(f"input shapes {', '.join(f'{n} {s}' for n, s in shapes.items())} do not fit query_img "
                        "(B, 3, H, W), support_imgs (B, K, 3, H, W), support_masks (B, K, H, W) with one B, K, H, W")
    if 0 in supports[:2] + query[-2:]:
        raise UserError(f"B = {supports[0]}, K = {supports[1]}, H x W = {query[-2]} x {query[-1]}: an episode needs a "
                        "query and at least one support, of at least one pixel")
    if img_size and query[-2:] != (img_size, img_size):
        raise UserError(f"images are {query[-2]}x{query[-1]}, the model takes {img_size}x{img_size} (H and W are "
                        "fixed at export; predict and eval resize for you)")
    masks = feed["support_masks"]
    low, high = float(masks.min()), float(masks.max())
    if not 0.0 <= low <= high <= 1.0:  # NaN fails too
        raise UserError(f"support_masks: values from {low:g} to {high:g}; a mask is 0 (background) and 1 "
                        "(foreground)")


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
    fixed_image_size = True  # an exported graph fixes H and W; eager PyTorch takes any valid size

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
        check_feed(feed, self.info.img_size if self.fixed_image_size else None, self.supports_device_io)
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
