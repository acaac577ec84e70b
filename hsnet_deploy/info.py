"""`hsnet-deploy info`: what this machine can run, and what an artifact is, without running anything.

Everything is read from package metadata, provider lists and the artifact's own metadata (ONNX
`metadata_props`, a plan's sidecar JSON): no model is loaded, no session or engine is created.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
import time
from pathlib import Path

from hsnet_deploy.errors import UserError
from hsnet_deploy.machine import cpu_name, usable_cores

DISTRIBUTIONS = ("hsnet-deploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim", "tensorrt",
                 "tensorrt-lean", "cuda-python", "nvidia-modelopt", "pillow", "click")


def versions(dists: tuple[str, ...] = DISTRIBUTIONS) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent), read without importing it."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in dists:
        try:
            found[dist] = md.version(dist)
        except md.PackageNotFoundError:
            found[dist] = None
    return found


def version_line() -> str:
    """`--version`: this package and the runtimes it drives."""
    v = versions(("hsnet-deploy", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt"))
    ort = v.get("onnxruntime-gpu") or v.get("onnxruntime")
    parts = [f"torch {v.get('torch') or 'not installed'}", f"onnxruntime {ort or 'not installed'}",
             f"tensorrt {v.get('tensorrt') or 'not installed'}", f"python {v['python']}"]
    return f"hsnet-deploy, version {v.get('hsnet-deploy') or 'unknown'}\n" + ", ".join(parts)


def environment() -> dict:
    """Backends, devices and versions this machine has, as `hsnet-deploy info` shows them."""
    backends: dict[str, dict] = {}
    devices = [{"device": "cpu", "name": cpu_name(), "cores": usable_cores()}]
    try:
        import torch

        cuda = torch.cuda.is_available()
        backends["pytorch"] = {"available": True, "devices": ["cpu", *(["cuda"] if cuda else [])]}
        if cuda:
            for i in range(torch.cuda.device_count()):
                cap = torch.cuda.get_device_capability(i)
                devices.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                                "compute_capability": f"{cap[0]}.{cap[1]}"})
    except ImportError as exc:
        backends["pytorch"] = {"available": False, "reason": str(exc)}
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        backends["onnxruntime"] = {"available": True, "providers": providers,
                                   "devices": ["cpu", *(["cuda"] if "CUDAExecutionProvider" in providers else [])]}
    except ImportError as exc:
        backends["onnxruntime"] = {"available": False, "reason": str(exc)}
    backends["tensorrt"] = _tensorrt()
    return {"backends": backends, "devices": devices, "versions": versions(),
            "platform": f"{platform.system()} {platform.release()} {platform.machine()}"}


def _tensorrt() -> dict:
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        return {"available": False, "reason": f"not installed ({type(exc).__name__})"}
    return {"available": True, "version": getattr(trt, "__version__", None), "builder": hasattr(trt, "Builder"),
            "devices": ["cuda"]}


# Metadata keys shown as their own rows; the rest are listed under "other".
_SHOWN = ("format", "backbone", "img_size", "precision", "opset", "weights", "seed", "checkpoint",
          "checkpoint_format", "checkpoint_sha256", "source_model", "source_sha256", "ort_version", "ort_device",
          "ort_optimization", "tensorrt_version", "gpu_name", "compute_capability")


def describe_artifact(path: str | os.PathLike) -> dict:
    """An artifact's kind, metadata, precision, gate report, source and versions (its file is not run)."""
    from hsnet_deploy.artifacts import sha256_file
    from hsnet_deploy.runtime.artifact import inspect_artifact

    art = inspect_artifact(path)
    stat = art.path.stat()
    info: dict = {"path": str(art.path), "kind": art.kind, "bytes": stat.st_size,
                  "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime))}
    if art.kind == "checkpoint":
        from hsnet_deploy.model import describe_checkpoint

        info["checkpoint"] = describe_checkpoint(art.path)  # read with weights_only, as a run reads it: junk is an Error
        info["sha256"] = sha256_file(art.path)
        info["note"] = ("this project's checkpoint: it records its backbone" if "backbone" in info["checkpoint"] else
                        "the authors' format records no backbone: give --backbone when running it") + \
            "; a checkpoint runs eagerly in PyTorch"
        return info
    meta = dict(art.meta)
    stages = meta.pop("stages", None)
    info["metadata"] = {k: meta.pop(k) for k in _SHOWN if k in meta}
    info["precision"] = info["metadata"].get("precision", "fp32")
    info["source"] = {k: info["metadata"][k] for k in ("weights", "seed", "checkpoint", "checkpoint_sha256",
                                                       "source_model", "source_sha256") if k in info["metadata"]}
    info["versions"] = meta.pop("versions", {})
    info["gate"] = meta.pop("gate", None)
    info["verification"] = meta.pop("verification", None)
    if stages:
        info["stages"] = sorted(k for k, v in stages.items() if v)
    info["other"] = meta
    return info


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def environment_rows(env: dict) -> list[tuple[str, str]]:
    rows = []
    for name, b in env["backends"].items():
        if not b.get("available"):
            rows.append((f"backend {name}", f"no: {b.get('reason', '')}"))
            continue
        detail = ", ".join(b.get("devices", []))
        if name == "onnxruntime":
            detail += f" ({', '.join(p.replace('ExecutionProvider', '') for p in b['providers'])})"
        if name == "tensorrt" and not b.get("builder"):
            detail += " (runtime only: no builder)"
        rows.append((f"backend {name}", detail))
    for d in env["devices"]:
        extra = f", {d['cores']} cores" if "cores" in d else f", compute {d.get('compute_capability')}"
        rows.append((f"device {d['device']}", f"{d['name']}{extra}"))
    rows += [(name, v or "not installed") for name, v in env["versions"].items()]
    rows.append(("platform", env["platform"]))
    return rows


def artifact_rows(info: dict) -> list[tuple[str, str]]:
    rows = [("path", info["path"]), ("kind", info["kind"]), ("size", f"{info['bytes'] / 2**20:.1f} MiB")]
    if info["kind"] == "checkpoint":
        facts = info["checkpoint"]
        backbone = facts.get("backbone") or (f"not recorded (keys look like {facts['backbone_from_keys']})"
                                             if facts.get("backbone_from_keys") else "not recorded")
        rows += [("format", facts["checkpoint_format"]), ("backbone", backbone),
                 ("tensors", f"{facts['tensors']} ({facts['parameters'] / 1e6:.1f}M values)")]
        return rows + [("sha256", info["sha256"]), ("note", info["note"])]
    rows += [(k, _fmt(v)) for k, v in info["metadata"].items()]
    rows += [(f"version {k}", _fmt(v)) for k, v in info["versions"].items()]
    gate = info.get("gate")
    if gate:
        rows.append(("gate", "passed" if gate.get("passed") else "FAILED"))
        for check in gate.get("checks", []):
            value = "-" if check.get("value") is None else _fmt(check["value"])
            rows.append((f"  {check['name']}", f"{value} (needs {check['op']} {check['limit']}): {check['status']}"))
        if not gate.get("checks"):
            rows += [(f"  {k}", _fmt(gate[k])) for k in ("mean_agreement", "sign_agreement", "miou_fp32",
                                                        "miou_variant") if gate.get(k) is not None]
    elif info["precision"] != "fp32":
        rows.append(("gate", "no gate report in the metadata"))
    rows += recipe_rows(info.get("other", {}))
    if info.get("verification"):
        rows.append(("export verification", f"worst relative error {_fmt(info['verification'].get('worst_rel'))}"))
    if info.get("stages"):
        rows.append(("stage map", ", ".join(info["stages"])))
    return rows


def recipe_rows(other: dict) -> list[tuple[str, str]]:
    """How the graph was laid out and, for a variant, what stayed FP32 or was quantised and on which data: the
    facts that tell two variants of one export apart (the JSON keeps them whole under "other")."""
    rows = []
    if other.get("layout"):
        rows.append(("export layout", str(other["layout"])))
    variant = other.get("variant") or {}
    if "kept_fp32" in variant:
        kept = variant["kept_fp32"] or {}
        rows.append(("kept in FP32", ", ".join(f"{name} ({group.get('nodes', '?')} nodes)"
                                               for name, group in kept.items()) or "none"))
    if "quantized_stages" in variant:
        rows.append(("quantised stages", _fmt(variant["quantized_stages"])))
        if variant.get("calib_method"):
            rows.append(("calibration method", str(variant["calib_method"])))
    if variant.get("backend"):
        rows.append(("variant backend", str(variant["backend"])))
    calib = other.get("calibration")
    if calib:
        counts = []
        if calib.get("calib_episodes") and "quantized_stages" in variant:  # FP16 calibrates nothing (older: unused)
            counts.append(f"{calib['calib_episodes']} calibration episodes")
        gate = calib.get("gate_episodes")
        truth = calib.get("ground_truth_episodes")
        if truth is None and "ground_truth" in calib:  # metadata written before the count: all or none
            truth = gate if calib["ground_truth"] else 0
        if gate is not None:
            counts.append(f"{gate} gate episodes" + ("" if truth is None else f" ({truth} with ground truth)"))
        if calib.get("layout") == "synthetic":
            data = ", ".join([f"synthetic episodes, seed {calib.get('seed')}", *counts])
        else:
            data = (f"{calib.get('root', '?')} ({calib.get('layout')} layout, seed {calib.get('seed')}): "
                    + ", ".join(counts))
        rows.append(("episodes", data))
    return rows


def seeded_weights_warning(meta: dict, artifact: str | os.PathLike) -> str | None:
    """The warning predict and eval print for an artifact made from seeded random weights."""
    if meta.get("weights") != "seeded-random":
        return None
    return (f"{artifact}: made from SEEDED RANDOM weights (seed {meta.get('seed', '?')}), not a trained "
            "checkpoint: its masks mean nothing; export with --checkpoint for real segmentation")


def run_record(settings: dict) -> dict:
    """What a result JSON needs to be read later: tool versions, UTC timestamp, settings, the command."""
    return {"versions": {k: v for k, v in versions().items() if v},
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings, "command": ["hsnet-deploy", *sys.argv[1:]]}


def describe(path: str | os.PathLike | None) -> dict:
    if path is None:
        return environment()
    if not Path(path).exists():
        raise UserError(f"{path}: artifact not found")
    return describe_artifact(path)
