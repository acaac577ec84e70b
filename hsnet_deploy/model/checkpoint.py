"""Load the authors' `best_model.pt` or this project's own checkpoint format, with errors a user can act on."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from hsnet_deploy.artifacts import atomic_path
from hsnet_deploy.errors import UserError
from hsnet_deploy.model.backbones import BACKBONES
from hsnet_deploy.model.hsnet import HSNet

FORMAT = "hsnet-deploy/checkpoint-v1"
MAX_LISTED = 5


def save_checkpoint(model: HSNet, path: str | os.PathLike, extra: dict | None = None) -> None:
    """This project's format: the state_dict plus what is needed to rebuild the model without flags."""
    payload = {
        "format": FORMAT,
        "backbone": model.backbone_name,
        "mask_support": model.mask_support,
        "state_dict": model.state_dict(),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _read(path: Path) -> object:
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        # weights_only=True: never run pickled code from a downloaded file. It reads PyTorch 1.5's
        # legacy (non-zip) serialisation too, which is what the authors' files use.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle a user's file is bad input, not a bug
        raise UserError(_load_failure(path, exc)) from None


def _load_failure(path: Path, exc: Exception) -> str:
    """torch's weights-only refusal opens with advice to load with weights_only=False (running the file's
    pickled code); the user needs its cause instead, which follows "WeightsUnpickler error:"."""
    text = str(exc).strip()
    cause = text.splitlines()[0] if text else type(exc).__name__
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        cause = rest.splitlines()[0].split(". Please use", 1)[0].strip() if rest else cause
        if cause.startswith("Unsupported global"):
            return (f"{path}: holds Python objects beyond tensors and plain containers ({cause[:160]}); "
                    f"hsnet-deploy never runs a file's pickled code: save the model's state_dict instead")
    if not zipfile.is_zipfile(path) and (isinstance(exc, KeyError | EOFError) or len(cause) < 8):
        # torch's legacy reader on a file that is no pickle says little ("101": a KeyError on a byte it read)
        return (f"{path}: not a readable PyTorch checkpoint (neither torch.save's zip archive nor a legacy pickle: "
                f"{type(exc).__name__} {cause})")
    return f"{path}: not a readable PyTorch checkpoint ({cause.split('. ', 1)[0][:200]})"


def guess_backbone(keys: list[str]) -> str | None:
    if any(k.startswith("backbone.features.") for k in keys):
        return "vgg16"
    if any(k.startswith("backbone.layer3.22.") for k in keys):
        return "resnet101"
    if any(k.startswith("backbone.layer3.") for k in keys):
        return "resnet50"
    return None


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def check_state_dict(state: dict, model: HSNet, path: Path) -> None:
    """Name the first offending keys instead of PyTorch's wall of text."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        hint = ""
        guess = guess_backbone(list(state))
        if guess and guess != model.backbone_name:
            hint = f"; the keys look like a {guess} checkpoint, not {model.backbone_name}"
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)}: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)}: {_listed(unexpected)}")
        raise UserError(f"{path}: does not fit HSNet({model.backbone_name}): {'; '.join(parts)}{hint}")
    bad = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape
    ]
    if bad:
        raise UserError(f"{path}: {len(bad)} tensors have the wrong shape for {model.backbone_name}: {_listed(bad)}")


def _contents(path: Path) -> tuple[dict, str | None, bool | None, str]:
    """(state_dict, recorded backbone, recorded masking switch, "hsnet-deploy" | "authors") of a checkpoint file:
    our format records the backbone and the switch; the authors' (with or without `module.`) records neither."""
    obj = _read(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not an HSNet checkpoint (holds a {type(obj).__name__}, expected a state_dict)")
    if obj.get("format") == FORMAT:
        state, backbone, mask_support = obj.get("state_dict"), obj.get("backbone"), obj.get("mask_support")
        missing = [k for k, ok in (("state_dict", isinstance(state, dict) and bool(state)),
                                   ("backbone", isinstance(backbone, str))) if not ok]
        if missing:
            raise UserError(f"{path}: an hsnet-deploy checkpoint without a usable {' or '.join(missing)} (damaged, or "
                            "written by other code)")
        return state, backbone, None if mask_support is None else bool(mask_support), "hsnet-deploy"
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not an HSNet checkpoint (no tensors keyed by parameter name)")
    return state, None, None, "authors"


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What `info` shows of a checkpoint: its format, the backbone it records (ours) or its keys point to (the
    authors'), and its size in tensors; a file that is no checkpoint is an Error, as when it is run."""
    path = Path(path)
    state, recorded, mask_support, source = _contents(path)
    facts = {"checkpoint_format": source, "tensors": len(state),
             "parameters": sum(int(v.numel()) for v in state.values() if isinstance(v, torch.Tensor))}
    if recorded:
        facts["backbone"] = recorded
    else:
        facts["backbone_from_keys"] = guess_backbone(list(state))
    if mask_support is not None:
        facts["mask_support"] = mask_support
    return facts


def load_checkpoint(path: str | os.PathLike, backbone: str | None = None, mask_support: bool | None = None) -> HSNet:
    """An eval-mode HSNet from the authors' `best_model.pt` (with or without `module.`) or our own format.

    Our format records the backbone and the masking switch; the authors' file does not, so `backbone`
    is required there (a wrong one is reported with the backbone the keys point to).
    """
    path = Path(path)
    state, recorded, recorded_masking, source = _contents(path)
    if recorded is not None:
        if backbone is not None and backbone != recorded:
            raise UserError(f"{path}: records backbone {recorded}, but {backbone} was asked for")
        backbone = recorded
        if mask_support is None:
            mask_support = True if recorded_masking is None else recorded_masking
    elif backbone is None:
        guess = guess_backbone(list(state))
        hint = f" (its keys look like {guess})" if guess else ""
        raise UserError(f"{path}: an authors' checkpoint does not record its backbone; pass --backbone{hint}")
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    model = HSNet(backbone, mask_support=True if mask_support is None else mask_support)
    check_state_dict(state, model, path)
    model.load_state_dict(state, strict=True)
    model.source_format = source
    return model.eval()


def seeded_model(backbone: str, seed: int = 0, mask_support: bool = True) -> HSNet:
    """A reproducible HSNet with random weights, for tests, demos and benchmarks without a checkpoint.

    PyTorch's default init with an isolated RNG; BatchNorm statistics randomised mildly so the
    backbone is not an identity-normalised toy.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HSNet(backbone, mask_support=mask_support)
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()
