"""Open any artifact and pick its runner from the metadata; refuse one that does not fit, with `Error:`.

ARTIFACT is an ONNX model (FP32, FP16, INT8), an ORT-optimised model, a TensorRT plan with its sidecar
JSON, or a PyTorch checkpoint (the authors' `best_model.pt` with a backbone, or this project's format).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hsnet_deploy.artifacts import INPUT_NAMES, TEXT_FIELDS, props_to_meta
from hsnet_deploy.errors import UserError
from hsnet_deploy.runtime.base import Runner

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")

# The metadata fields that code reads, by the JSON type they must have. A sidecar is plain JSON a person can
# edit (and ONNX metadata can be rewritten with onnx's API); a field of the wrong type is refused here, naming
# it, instead of crashing whatever reads it first.
META_FIELD_TYPES: dict[str, type] = {
    **dict.fromkeys(TEXT_FIELDS, str),
    **dict.fromkeys(("img_size", "opset", "seed"), int),
    **dict.fromkeys(("versions", "tool_versions", "preprocessing", "verification", "stages", "variant", "gate",
                     "calibration", "profile"), dict),
}
JSON_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object"}


@dataclass
class Artifact:
    path: Path
    kind: str  # "onnx" | "tensorrt" | "checkpoint"
    meta: dict


def read_onnx_meta(path: Path, require_meta: bool = True) -> dict:
    """The hsnet-deploy metadata of an ONNX model; `require_meta=False` accepts a model without it yet
    (a variant being gated, whose metadata is written once it passes)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: is a folder, not an ONNX model" if path.is_dir() else f"{path}: ONNX model not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a damaged file
        raise UserError(f"{path}: not a readable ONNX model (truncated or damaged? {type(exc).__name__})") from None
    if not proto.graph.node:  # protobuf reads an empty file, and some junk, as an empty model
        what = "an empty file" if path.stat().st_size == 0 else "a file with no graph in it"
        raise UserError(f"{path}: {what}, not an ONNX model")
    meta = props_to_meta({p.key: p.value for p in proto.metadata_props})
    if "backbone" not in meta and require_meta:
        raise UserError(f"{path}: an ONNX model without hsnet-deploy metadata; export it with `hsnet-deploy export`")
    check_meta(meta, path, require_meta)
    names = {i.name for i in proto.graph.input}
    if names != set(INPUT_NAMES):
        raise UserError(f"{path}: inputs {sorted(names)} are not HSNet's (query_img, support_imgs, support_masks)")
    return meta


def check_meta(meta: object, where: Path, require_meta: bool = True) -> dict:
    """The metadata as a dict whose known fields have their types and a usable image size, else `Error:`."""
    if not isinstance(meta, dict):
        raise UserError(f"{where}: the metadata is a JSON {type(meta).__name__}, expected an object")
    for key, want in META_FIELD_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, want) or isinstance(value, bool)):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise UserError(f"{where}: metadata field {key!r} is {shown}, expected {JSON_TYPE_NAMES[want]}")
    size = meta.get("img_size")
    if require_meta and size is None:
        raise UserError(f"{where}: metadata has no 'img_size' (the image size the model was exported for)")
    if size is not None and size < 1:
        raise UserError(f"{where}: metadata field 'img_size' is {size}, expected a size in pixels")
    return meta


def inspect_artifact(path: str | Path, require_meta: bool = True) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: artifact not found")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return Artifact(path, "checkpoint", {})
    if suffix in ENGINE_SUFFIXES:
        sidecar = path.with_name(path.name + ".json")
        if not sidecar.is_file():
            raise UserError(f"{path}: TensorRT plan without its metadata file {sidecar.name}")
        try:
            meta = json.loads(sidecar.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{sidecar}: not a text file (not UTF-8); expected the plan's JSON metadata") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{sidecar}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except OSError as exc:
            raise UserError(f"{sidecar}: cannot be read ({exc.strerror})") from None
        if require_meta and not (isinstance(meta, dict) and "backbone" in meta):
            raise UserError(f"{sidecar}: holds no hsnet-deploy metadata (the plan's file from `hsnet-deploy "
                            "build-engine --backend tensorrt`)")
        return Artifact(path, "tensorrt", check_meta(meta, sidecar, require_meta))
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip or legacy pickle: a torch checkpoint
        return Artifact(path, "checkpoint", {})
    return Artifact(path, "onnx", read_onnx_meta(path, require_meta))


def check_device_here(path: str | Path, device: str) -> None:
    """`--device cuda` on a machine whose backend for `path` has no CUDA: an Error now. `serve` asks before Ray starts
    its replicas, which would otherwise fail half a minute later without saying why."""
    if device != "cuda":
        return
    art = inspect_artifact(path)
    if art.kind == "onnx":
        from hsnet_deploy.runtime.ort_runner import available_providers

        if "CUDAExecutionProvider" not in available_providers():
            raise UserError(f"{path}: --device cuda, but ONNX Runtime has no CUDA provider here "
                            "(pip install onnxruntime-gpu)")
    elif art.kind == "checkpoint":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{path}: --device cuda, but this PyTorch sees no CUDA device")


def open_artifact(
    path: str | Path,
    device: str = "auto",
    backbone: str | None = None,
    img_size: int | None = None,
    threads: int | None = None,
    precision: str | None = None,
    cuda_graph: bool = False,
    ep_options: dict[str, str] | None = None,
    require_meta: bool = True,
) -> Runner:
    """The runner for `path`. `device` is cpu, cuda or auto (cuda when the backend can use it here).

    `img_size`, when given, must equal the artifact's: H and W are fixed at export. `cuda_graph` and
    `ep_options` (CUDA EP options, runtime/ort_cuda.py) apply to ONNX Runtime on CUDA. `precision` names
    an eager checkpoint's precision, or an ONNX model's when its metadata is not written yet
    (`require_meta=False`: a variant being gated).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device {device!r}: expected auto, cpu or cuda")
    art = inspect_artifact(path, require_meta)
    recorded = art.meta.get("backbone")
    if backbone and recorded and backbone != recorded:
        raise UserError(f"{art.path}: records backbone {recorded}, but {backbone} was asked for")
    if art.kind == "checkpoint":
        import torch

        from hsnet_deploy.model import load_checkpoint
        from hsnet_deploy.runtime.torch_runner import TorchRunner

        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if threads:  # eager PyTorch's threads are the process's (ONNX Runtime's are per session)
            torch.set_num_threads(threads)
        return TorchRunner(load_checkpoint(art.path, backbone), dev, precision or "fp32", str(art.path))

    if precision and "precision" not in art.meta:
        art.meta["precision"] = precision
    size = int(art.meta.get("img_size", 0))
    if img_size is not None and size != img_size:
        raise UserError(f"{art.path}: built for {size}x{size} images, not {img_size}x{img_size}")
    if art.kind == "tensorrt":
        from hsnet_deploy.runtime.trt_runner import TensorRTRunner

        if device == "cpu":
            raise UserError(f"{art.path}: a TensorRT engine runs on a CUDA GPU only")
        return TensorRTRunner(str(art.path), art.meta)

    from hsnet_deploy.runtime.ort_runner import OrtRunner, available_providers

    optimised_for = art.meta.get("ort_device")
    if device == "auto":
        device = optimised_for or ("cuda" if "CUDAExecutionProvider" in available_providers() else "cpu")
    if optimised_for and optimised_for != device:
        raise UserError(f"{art.path}: optimised by ONNX Runtime for {optimised_for}; it cannot run on {device}")
    ort_version = art.meta.get("ort_version")
    if ort_version:
        import onnxruntime

        if ort_version != onnxruntime.__version__:
            raise UserError(
                f"{art.path}: optimised by ONNX Runtime {ort_version}, this is {onnxruntime.__version__}; "
                "rebuild it with `hsnet-deploy build-engine --backend onnxruntime`"
            )
    return OrtRunner(str(art.path), art.meta, device, threads, cuda_graph, ep_options=ep_options)


def open_model(model, device: str = "cpu", precision: str = "fp32", artifact: str = "",
               compile_mode: str | None = None, compile_backend: str = "inductor") -> Runner:
    """A runner for an in-memory HSNet (PyTorch eager, or torch.compile'd with `compile_mode`): the
    baselines bench compares with, and benchmark scripts."""
    if compile_mode is not None:
        from hsnet_deploy.runtime.torch_compile import CompiledTorchRunner

        return CompiledTorchRunner(model, device, precision, compile_mode, compile_backend, artifact=artifact)
    from hsnet_deploy.runtime.torch_runner import TorchRunner

    return TorchRunner(model, device, precision, artifact)


def eager_baselines(model, cpu: bool, cuda: bool) -> list[Runner]:
    """PyTorch eager FP32 on the CPU; on a GPU eager FP32, FP16 autocast and the torch.compile anchor
    (what a user gets from one line of PyTorch, without this toolkit)."""
    label = "eager (seeded weights)"
    runners = [open_model(model, "cpu", "fp32", label)] if cpu else []
    if cuda:
        runners += [open_model(model, "cuda", "fp32", label), open_model(model, "cuda", "fp16", label),
                    open_model(model, "cuda", "fp16", "torch.compile (seeded weights)", "reduce-overhead")]
    return runners
