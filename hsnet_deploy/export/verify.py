"""Export-time verification: the ONNX graph against the eager PyTorch model, on logits AND intermediates.

A logits-only check with a loose tolerance passes a graph whose C2 is wrong (random-weight logits move
by a few percent), so the verification graph also exposes the three hypercorrelation tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from hsnet_deploy.artifacts import INPUT_NAMES
from hsnet_deploy.model import HSNet
from hsnet_deploy.runtime.ort_options import session_options

PYRAMID_NAMES = ("corr_c4", "corr_c3", "corr_c2")
FP32_REL_TOL = 1e-4  # max |diff| at most this fraction of max |reference|


@dataclass
class TensorError:
    name: str
    max_abs: float
    mean_abs: float
    ref_max: float

    @property
    def rel(self) -> float:
        return self.max_abs / max(self.ref_max, 1e-30)


@dataclass
class EpisodeCheck:
    """One verification episode: errors per tensor and the agreement of the K-shot masks."""

    batch: int
    shots: int
    masks: str
    errors: list[TensorError]
    mask_agreement: float

    def worst_rel(self) -> float:
        return max(e.rel for e in self.errors)

    def to_dict(self) -> dict:
        d = asdict(self)
        for e, src in zip(d["errors"], self.errors):
            e["rel"] = src.rel
        return d


def verification_episodes(img_size: int, seed: int = 0) -> list[tuple[int, int, str, tuple[torch.Tensor, ...]]]:
    """B=2 with K=1 and K=3, filled-ellipse masks and pixel-noise masks (the hard case for trap 1)."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for b, k, kind in ((2, 1, "ellipses"), (2, 3, "noise"), (1, 2, "ellipses")):
        q = torch.randn(b, 3, img_size, img_size, generator=g)
        s = torch.randn(b, k, 3, img_size, img_size, generator=g)
        if kind == "noise":
            m = (torch.rand(b, k, img_size, img_size, generator=g) > 0.5).float()
        else:
            yy, xx = torch.meshgrid(torch.arange(img_size), torch.arange(img_size), indexing="ij")
            centre = torch.rand(b, k, 2, generator=g) * 0.5 + 0.25
            radius = torch.rand(b, k, 2, generator=g) * 0.25 + 0.1
            cy, cx = (centre[..., 0, None, None] * img_size), (centre[..., 1, None, None] * img_size)
            ry, rx = (radius[..., 0, None, None] * img_size), (radius[..., 1, None, None] * img_size)
            m = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).float()
        episodes.append((b, k, kind, (q, s, m)))
    return episodes


def reference_outputs(model: HSNet, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """Eager PyTorch with the authors' numerics: logits, mask and the pyramid, keyed like the ONNX outputs."""
    q, s, m = inputs
    b, k = s.shape[:2]
    with torch.no_grad():
        logits, pyramid = model.support_logits(q, s, m)
        logits = logits.reshape(b, k, 2, *q.shape[-2:])
        from hsnet_deploy.model import kshot_vote

        out = {"logits": logits.numpy(), "mask": kshot_vote(logits).numpy()}
    out.update({name: t.numpy() for name, t in zip(PYRAMID_NAMES, pyramid)})
    return out


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], names: tuple[str, ...]) -> list[TensorError]:
    errors = []
    for name in names:
        ref = reference[name].astype(np.float64)
        diff = np.abs(got[name].astype(np.float64) - ref)
        errors.append(TensorError(name, float(diff.max()), float(diff.mean()), float(np.abs(ref).max())))
    return errors


def verify_onnx(onnx_path: str, model: HSNet, img_size: int, tolerance: float = FP32_REL_TOL) -> list[EpisodeCheck]:
    """Run the verification graph in ONNX Runtime (CPU) and compare with eager PyTorch per episode."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, session_options(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    checks = []
    for b, k, kind, inputs in verification_episodes(img_size):
        feed = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs)))
        got = dict(zip(out_names, session.run(None, feed)))
        ref = reference_outputs(model, inputs)
        errors = compare(ref, got, ("logits", *[n for n in PYRAMID_NAMES if n in got]))
        agreement = float((got["mask"] == ref["mask"]).mean())
        checks.append(EpisodeCheck(b, k, kind, errors, agreement))
    return checks
