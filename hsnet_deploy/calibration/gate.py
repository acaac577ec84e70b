"""The accuracy gate: a precision variant against the FP32 model on held-out episodes.

Measures, per episode:
- mask agreement: IoU of the variant's foreground with the FP32 foreground (1 when both are empty);
- sign agreement: the share of pixels where the foreground-minus-background margin keeps its sign,
  each pixel weighted by the FP32 margin's magnitude. It works without trained weights (a seeded model
  predicts all background, making mask IoU trivially 1) and ignores flips at near-zero margins, which
  any rounding can cause and no user would see as a different segmentation;
- logit error: max |variant - FP32| / max |FP32| over the episode's logits (as `export`'s verification);
and, over the episodes that have ground truth (a query mask), mIoU of both models with the authors' metric.

Defaults (GateThresholds.defaults; the measurements behind them are in docs/benchmarks.md): mean mask
agreement >= 0.95 and sign agreement >= 0.999 always; with ground truth, also an mIoU drop of at most
1.0 point. Ground truth adds a check, it never replaces one: a variant that agrees poorly with FP32 fails
even when both score the same mIoU. A reference that scores (nearly) nothing on the episodes cannot judge
the variant by mIoU: that check is reported as "unable to judge" and never counts as passed; when the
user asked for it explicitly it fails the gate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from hsnet_deploy.calibration.episodes import EpisodeSample
from hsnet_deploy.console import versus


@dataclass
class GateThresholds:
    """A variant passes when every threshold holds; None switches a check off.

    Use `GateThresholds.defaults(has_ground_truth, **overrides)`: agreement with FP32 always applies
    (mean mask IoU >= 0.95 and margin-weighted sign agreement >= 0.999); with ground truth the mIoU drop
    (at most 1.0 point) applies too. `miou_required`: the mIoU check was asked for explicitly, so a
    reference that cannot be judged by mIoU fails the gate instead of leaving the verdict to agreement.
    """

    min_mean_agreement: float | None = 0.95
    min_worst_agreement: float | None = None
    min_sign_agreement: float | None = 0.999
    max_logit_error: float | None = None
    max_miou_drop: float | None = 1.0  # points of mIoU (0..100), only where ground truth exists
    miou_required: bool = False

    @classmethod
    def defaults(cls, has_ground_truth: bool, **overrides: float | None) -> GateThresholds:
        unknown = set(overrides) - set(cls.__dataclass_fields__) - {"miou_required"}
        if unknown:
            raise TypeError(f"unknown gate thresholds {sorted(unknown)}")
        base = cls()
        for key, value in overrides.items():
            setattr(base, key, value)
        if "max_miou_drop" in overrides and overrides["max_miou_drop"] is not None:
            base.miou_required = True
        return base


# Below this FP32 mIoU (points) on the gate episodes, the reference segments nothing there (seeded weights,
# data of another task): an mIoU drop measured against it says nothing about the variant.
MIN_JUDGING_MIOU = 5.0


@dataclass
class EpisodeGate:
    name: str
    agreement: float  # IoU against the FP32 mask
    sign_agreement: float
    logit_error: float
    fp32_foreground: float  # share of FP32 foreground pixels, to tell trivial masks apart

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class GateReport:
    precision: str
    thresholds: GateThresholds
    episodes: list[EpisodeGate] = field(default_factory=list)
    miou_fp32: float | None = None
    miou_variant: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mean_agreement(self) -> float:
        return float(np.mean([e.agreement for e in self.episodes])) if self.episodes else 0.0

    @property
    def worst_agreement(self) -> float:
        return float(min(e.agreement for e in self.episodes)) if self.episodes else 0.0

    @property
    def sign_agreement(self) -> float:
        return float(np.mean([e.sign_agreement for e in self.episodes])) if self.episodes else 0.0

    @property
    def logit_error(self) -> float:
        return float(max(e.logit_error for e in self.episodes)) if self.episodes else float("inf")

    @property
    def miou_drop(self) -> float | None:
        if self.miou_fp32 is None or self.miou_variant is None:
            return None
        return self.miou_fp32 - self.miou_variant

    @property
    def miou_judgeable(self) -> bool:
        """Whether the FP32 reference segments enough of the episodes for an mIoU drop to mean anything."""
        return self.miou_fp32 is not None and self.miou_fp32 >= MIN_JUDGING_MIOU

    def checks(self) -> list[dict]:
        """Every threshold in force, with its value and status: "passed", "failed" or "unable to judge"."""
        t = self.thresholds
        rows = (
            ("mean mask agreement", self.mean_agreement, t.min_mean_agreement, ">="),
            ("worst mask agreement", self.worst_agreement, t.min_worst_agreement, ">="),
            ("sign agreement", self.sign_agreement, t.min_sign_agreement, ">="),
            ("logit error", self.logit_error, t.max_logit_error, "<="),
            ("mIoU drop", self.miou_drop, t.max_miou_drop, "<="),
        )
        out = []
        for name, value, limit, op in rows:
            if limit is None or (value is None and name == "mIoU drop" and not t.miou_required):
                continue
            if name == "mIoU drop" and not self.miou_judgeable:
                fp32 = "no ground truth" if self.miou_fp32 is None else f"FP32 scores mIoU {self.miou_fp32:.1f}"
                out.append({"name": name, "value": value, "limit": limit, "op": op, "status": "unable to judge",
                            "reason": f"{fp32} on the gate episodes (needs >= {MIN_JUDGING_MIOU})"})
                continue
            ok = value >= limit if op == ">=" else value <= limit
            out.append({"name": name, "value": value, "limit": limit, "op": op, "status": "passed" if ok else "failed"})
        return out

    def failures(self) -> list[str]:
        """One line per threshold that does not hold; empty when the variant passes.

        An mIoU check that cannot be judged fails only when asked for explicitly (`miou_required`); else the
        agreement thresholds decide, and the report says the mIoU could not judge.
        """
        fails = []
        if not self.episodes:
            fails.append("no gate episodes were run")
        checks = self.checks()
        for c in checks:
            if c["status"] == "failed":
                fails.append(f"{c['name']} {versus(c['value'], c['limit'])} (needs {c['op']} {c['limit']})")
            elif c["status"] == "unable to judge" and self.thresholds.miou_required:
                fails.append(f"{c['name']}: unable to judge ({c['reason']})")
        if checks and all(c["status"] == "unable to judge" for c in checks):
            fails.append("no threshold could judge the variant")
        return fails

    @property
    def passed(self) -> bool:
        return not self.failures()

    def summary(self) -> dict:
        return {"mean_agreement": round(self.mean_agreement, 6), "worst_agreement": round(self.worst_agreement, 6),
                "sign_agreement": round(self.sign_agreement, 6), "logit_error": round(self.logit_error, 6),
                "miou_fp32": self.miou_fp32, "miou_variant": self.miou_variant, "miou_drop": self.miou_drop}

    def to_dict(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "failures": self.failures(),
                "checks": self.checks(), "thresholds": asdict(self.thresholds), **self.summary(),
                "notes": self.notes,
                "episodes": [e.to_dict() for e in self.episodes]}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two {0,1} masks; two empty masks agree fully."""
    a, b = a >= 0.5, b >= 0.5
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def sign_agreement(ref_logits: np.ndarray, var_logits: np.ndarray) -> float:
    """Margin-weighted share of pixels whose foreground-vs-background decision is unchanged.

    logits (..., 2, H, W). Weight = |FP32 margin|, so a flip costs in proportion to how sure FP32 was.
    """
    ref = (ref_logits[..., 1, :, :] - ref_logits[..., 0, :, :]).astype(np.float64)
    var = (var_logits[..., 1, :, :] - var_logits[..., 0, :, :]).astype(np.float64)
    weight = np.abs(ref)
    total = weight.sum()
    if total == 0:
        return 1.0
    return float(weight[(ref > 0) == (var > 0)].sum() / total)


def compare_outputs(name: str, ref: dict[str, np.ndarray], var: dict[str, np.ndarray]) -> EpisodeGate:
    if var["mask"].shape != ref["mask"].shape or var["mask"].dtype != ref["mask"].dtype:
        raise RuntimeError(f"variant mask {var['mask'].dtype}{var['mask'].shape} differs from FP32's "
                           f"{ref['mask'].dtype}{ref['mask'].shape}")
    ref_logits = ref["logits"].astype(np.float32)
    var_logits = var["logits"].astype(np.float32)
    scale = float(np.abs(ref_logits).max()) or 1.0
    return EpisodeGate(
        name=name,
        agreement=float(mask_iou(var["mask"], ref["mask"])),
        sign_agreement=sign_agreement(ref_logits, var_logits),
        logit_error=float(np.abs(var_logits - ref_logits).max() / scale),
        fp32_foreground=float(np.mean(ref["mask"] >= 0.5)),
    )


def run_gate(
    fp32_path: str | os.PathLike,
    variant_path: str | os.PathLike,
    samples: list[EpisodeSample],
    precision: str,
    thresholds: GateThresholds | None = None,
    class_ids: tuple[int, ...] | None = None,
    threads: int | None = None,
    on_episode: Callable[[EpisodeGate], None] | None = None,
    reference: list[dict[str, np.ndarray]] | None = None,
) -> GateReport:
    """Run both models in ONNX Runtime (the FP32 export is verified against PyTorch to ~1e-6) and compare.

    `reference`: FP32 outputs already computed for `samples`, so several variants gate against one run.
    """
    from hsnet_deploy.data.metrics import IoUAccumulator
    from hsnet_deploy.runtime.artifact import open_artifact

    report = GateReport(precision, thresholds or GateThresholds())
    if reference is None:
        reference = fp32_outputs(fp32_path, samples, threads)
    judged = sum(s.query_mask is not None for s in samples)  # episodes with ground truth: mIoU is over those
    ids = class_ids or tuple(sorted({s.class_id for s in samples}))
    acc_ref, acc_var = IoUAccumulator(ids), IoUAccumulator(ids)
    # The variant's metadata is written only once it passes, so the runner gets the precision directly.
    with open_artifact(variant_path, "cpu", threads=threads, precision=precision, require_meta=False) as runner:
        for sample, ref in zip(samples, reference):
            var = runner.infer(sample.feed)
            ep = compare_outputs(sample.name, ref, var)
            report.episodes.append(ep)
            if sample.query_mask is not None:
                acc_ref.update(sample.class_id, ref["mask"][0], sample.query_mask, sample.ignore)
                acc_var.update(sample.class_id, var["mask"][0], sample.query_mask, sample.ignore)
            if on_episode:
                on_episode(ep)
    if judged:
        report.miou_fp32, report.miou_variant = round(acc_ref.miou, 4), round(acc_var.miou, 4)
        if judged < len(samples):
            report.notes.append(f"mIoU over the {judged} of {len(samples)} gate episodes that have a query mask; "
                                "the other episodes count in the agreement checks only")
        if not report.miou_judgeable:
            report.notes.append(unjudged_miou_note(report))
    else:
        report.notes.append("episodes without ground truth: mIoU not measured, the gate uses agreement with FP32")
    fg = np.mean([e.fp32_foreground for e in report.episodes]) if report.episodes else 0.0
    if fg < 0.01:
        report.notes.append(f"FP32 masks are {fg:.1%} foreground: mask agreement is near-trivial here, "
                            "sign agreement and logit error carry the comparison")
    return report


def unjudged_miou_note(report: GateReport) -> str:
    """The note for an FP32 reference that scores too little to judge by: what then decides the gate."""
    verdict = ("the mIoU check was asked for (--gate-max-miou-drop), so the gate fails"
               if report.thresholds.miou_required else "agreement with FP32 decides")
    return (f"FP32 scores mIoU {report.miou_fp32:.1f} on the gate episodes: unable to judge the variant by mIoU "
            f"(seeded weights, or data of another task?); {verdict}")


def fp32_outputs(fp32_path: str | os.PathLike, samples: list[EpisodeSample], threads: int | None = None,
                 on_episode: Callable[[], None] | None = None) -> list[dict[str, np.ndarray]]:
    """The reference: the FP32 export in ONNX Runtime on the CPU."""
    from hsnet_deploy.runtime.artifact import open_artifact

    outputs = []
    with open_artifact(fp32_path, "cpu", threads=threads, precision="fp32", require_meta=False) as runner:
        for s in samples:
            outputs.append(runner.infer(s.feed))
            if on_episode:
                on_episode()
    return outputs
