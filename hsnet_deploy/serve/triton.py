"""A model repository for NVIDIA Triton Inference Server: `DIR/hsnet/config.pbtxt` + `DIR/hsnet/1/<model>`.

Triton serves ONNX models through its ONNX Runtime backend (platform `onnxruntime_onnx`, optionally with the
CUDA or TensorRT execution accelerator) and plans through its TensorRT backend (`tensorrt_plan`). The config
is written as protobuf text by hand (a dozen fields) so that writing it needs no Triton package; the tests
parse it into Triton's own `ModelConfig` message from `tritonclient`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hsnet_deploy.errors import UserError
from hsnet_deploy.outputs import check_output_folder
from hsnet_deploy.runtime.artifact import inspect_artifact
from hsnet_deploy.runtime.ort_cuda import CUDA_EP_DEFAULTS
from hsnet_deploy.runtime.trt_common import check_symmetric_int8

MODEL_NAME = "hsnet"
VERSION = 1  # the version folder written, and the only one the config lets Triton serve
MODEL_FILES = ("model.onnx", "model.plan")
INPUTS = ("query_img", "support_imgs", "support_masks")
OUTPUTS = ("logits", "mask")
# ONNX TensorProto element type -> Triton data type
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 2: "TYPE_UINT8", 3: "TYPE_INT8",
                  6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL", 11: "TYPE_FP64"}
ACCELERATORS = ("none", "cuda", "tensorrt")


@dataclass
class TritonRepo:
    config_path: Path
    model_path: Path
    platform: str
    max_batch_size: int
    config_text: str
    needs: str = ""  # what the server's runtime must be: an ONNX model's IR version and opset, a plan's TensorRT
    removed: list[Path] = field(default_factory=list)  # an earlier run's model of the other kind in the version folder
    other_versions: list[str] = field(default_factory=list)  # version folders beside ours, which the config leaves out


def tensor_dims(img_size: int) -> dict[str, list[int]]:
    """Per-episode dims (Triton's batch dim B excluded): K is variable (-1), H = W fixed at export."""
    s = img_size
    return {"query_img": [3, s, s], "support_imgs": [-1, 3, s, s], "support_masks": [-1, s, s],
            "logits": [-1, 2, s, s], "mask": [s, s]}


def load_graph(path: Path):
    """The ONNX model without its external weights: its I/O types and versions are all Triton's config needs."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def onnx_types(model, path: Path) -> dict[str, str]:
    graph = model.graph
    types = {}
    for value in list(graph.input) + list(graph.output):
        elem = value.type.tensor_type.elem_type
        if elem not in ONNX_TO_TRITON:
            raise UserError(f"{path}: tensor {value.name!r} has ONNX element type {elem}, which Triton cannot serve")
        types[value.name] = ONNX_TO_TRITON[elem]
    return types


# The first ONNX Runtime release that reads each IR version ONNX Runtime's model loader checks (its ONNX submodule:
# 1.18 moved to ONNX 1.16, whose IR version is 10). Older Triton containers carry older ONNX Runtimes.
MIN_ORT_FOR_IR = {10: "1.18"}


def onnx_needs(model) -> str:
    """What Triton's ONNX Runtime must read: the model's IR version and opset, and the first release that reads
    that IR version where it is known."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    text = f"Triton's ONNX Runtime must read ONNX IR version {model.ir_version} and opset {opset}"
    if model.ir_version in MIN_ORT_FOR_IR:
        text += f" (ONNX Runtime {MIN_ORT_FOR_IR[model.ir_version]} or later)"
    return text


def _tensor_block(kind: str, names: tuple[str, ...], types: dict[str, str], dims: dict[str, list[int]]) -> str:
    entries = [f'  {{\n    name: "{n}"\n    data_type: {types[n]}\n    dims: [ {", ".join(map(str, dims[n]))} ]\n  }}'
               for n in names]
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def config_text(platform: str, max_batch: int, types: dict[str, str], img_size: int, *, instances: int,
                kind: str, accelerator: str, precision: str, queue_delay_us: int, workspace_gib: float) -> str:
    dims = tensor_dims(img_size)
    preferred = sorted({b for b in (max_batch // 2, max_batch) if b >= 1})
    text = (f'name: "{MODEL_NAME}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
            + _tensor_block("input", INPUTS, types, dims) + _tensor_block("output", OUTPUTS, types, dims)
            + f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
              f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
            + f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
            # Triton's default policy serves the highest version folder: pinned, so a folder an earlier
            # deployment left (hsnet/2/) cannot take the place of the model just written.
            + f"version_policy: {{ specific: {{ versions: [ {VERSION} ] }} }}\n")
    if platform == "onnxruntime_onnx" and accelerator != "none":
        if accelerator == "tensorrt":
            mode = {"fp16": "FP16", "int8": "INT8"}.get(precision, "FP32")
            params = {"precision_mode": mode, "max_workspace_size_bytes": str(int(workspace_gib * 2**30)),
                      "trt_engine_cache_enable": "1", "trt_engine_cache_path": "/tmp/hsnet-trt-cache"}
        else:
            # Triton hands the cuda accelerator's parameters to ONNX Runtime's CUDA provider options as they are:
            # the names ONNX Runtime parses (HEURISTIC, not Triton's deprecated numeric "1"), and of the defaults
            # `bench` measured and runs with (runtime/ort_cuda.py) the two ONNX Runtime's own do not set; the
            # others equal its own, and an older build rejects a key it does not know (prefer_nhwc).
            params = {k: CUDA_EP_DEFAULTS[k] for k in ("cudnn_conv_algo_search", "use_tf32")}
        body = "\n".join(f'        parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
        text += ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
                 f'        name : "{accelerator}"\n{body}\n    }} ]\n  }}\n}}\n')
    return text


def write_triton_repo(artifact: str | Path, out_dir: str | Path, *, max_batch: int = 8, instances: int = 1,
                      kind: str = "gpu", accelerator: str = "tensorrt", queue_delay_us: int = 2000,
                      workspace_gib: float = 4.0) -> TritonRepo:
    """Write DIR/hsnet/config.pbtxt and DIR/hsnet/1/model.onnx (or model.plan); the model file is copied
    to a temporary name first and renamed, so an interrupted run leaves no half-written model."""
    art = inspect_artifact(artifact)
    if art.kind == "checkpoint":
        raise UserError(f"{art.path}: Triton serves ONNX models and TensorRT plans; export this checkpoint "
                        "with `hsnet-deploy export` first")
    if accelerator not in ACCELERATORS:
        raise UserError(f"--accelerator {accelerator}: expected one of {', '.join(ACCELERATORS)}")
    if max_batch < 1 or instances < 1:
        raise UserError("--max-batch and --instances must be at least 1")
    img_size = int(art.meta.get("img_size", 0))
    precision = str(art.meta.get("precision", "fp32"))
    kind_name = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}[kind]
    if art.kind == "tensorrt":
        profile_max = int(((art.meta.get("profile") or {}).get("batch") or [0, 0, max_batch])[-1])
        if max_batch > profile_max:
            raise UserError(f"--max-batch {max_batch}: {art.path} was built for B up to {profile_max}")
        if kind == "cpu":
            raise UserError(f"{art.path}: a TensorRT plan runs on a GPU only (--kind gpu)")
        source_name = str(art.meta.get("source_onnx") or "")
        source = art.path.with_name(source_name) if source_name else None
        types = onnx_types(load_graph(source), source) if source is not None and source.is_file() else \
            {n: "TYPE_FP32" for n in INPUTS + OUTPUTS}  # the contract's dtypes
        platform, filename = "tensorrt_plan", "model.plan"
        needs = (f"Triton's TensorRT must be {art.meta.get('tensorrt_version', 'the one the plan was built with')}, "
                 f"on a {art.meta.get('gpu_name', 'GPU of the architecture the plan was built on')}")
    else:
        if art.meta.get("ort_device"):
            raise UserError(f"{art.path}: an ONNX Runtime-optimised model is tied to one ONNX Runtime version; "
                            "give Triton the exported ONNX model instead")
        model = load_graph(art.path)
        types, needs = onnx_types(model, art.path), onnx_needs(model)
        platform, filename = "onnxruntime_onnx", "model.onnx"
        if kind == "cpu":
            accelerator = "none"
        if accelerator == "tensorrt":
            check_symmetric_int8(art.path, art.meta, "for Triton's TensorRT accelerator build the variant with "
                                 "`build-engine --int8 --backend tensorrt`, or serve this one with --accelerator "
                                 "cuda or --kind cpu")
    missing = [n for n in INPUTS + OUTPUTS if n not in types]
    if missing:
        raise UserError(f"{art.path}: tensors {missing} are missing; not an hsnet-deploy artifact")
    text = config_text(platform, max_batch, types, img_size, instances=instances, kind=kind_name,
                       accelerator=accelerator, precision=precision, queue_delay_us=queue_delay_us,
                       workspace_gib=workspace_gib)
    model_dir = Path(out_dir) / MODEL_NAME
    check_repository(Path(out_dir), model_dir, art.path)
    version_dir = model_dir / str(VERSION)
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out_dir}: cannot create the repository ({exc.strerror})") from None
    from hsnet_deploy.artifacts import atomic_path, write_bytes_atomic

    model_path = version_dir / filename
    with atomic_path(model_path) as tmp:
        shutil.copyfile(art.path, tmp)
    config_path = model_dir / "config.pbtxt"
    write_bytes_atomic(config_path, text.encode())
    # An earlier run's model of the other kind (1/model.plan beside a new 1/model.onnx) would be a second model in
    # the version Triton serves; the config names the platform, so it is removed, and said.
    removed = [version_dir / name for name in MODEL_FILES if name != filename and (version_dir / name).is_file()]
    for path in removed:
        path.unlink()
    others = sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name != str(VERSION))
    return TritonRepo(config_path, model_path, platform, max_batch, text, needs, removed, others)


def check_repository(out_dir: Path, model_dir: Path, artifact: Path) -> None:
    """The repository folder may be new, but not its parent (a mistyped path is not created); the artifact must not
    lie in the model folder this command rewrites."""
    parent = out_dir.absolute().parent
    if not out_dir.exists() and not parent.is_dir():
        raise UserError(f"{out_dir}: folder {parent} does not exist (-o may be a new folder, in an existing one)")
    check_output_folder(out_dir, "-o")  # a folder, writable (or creatable)
    if artifact.resolve().is_relative_to(model_dir.resolve()):
        raise UserError(f"{artifact}: lies in {model_dir}, the model folder this command writes; copy it out of the "
                        "repository first")
    for path, what, folder in ((model_dir, "the model folder", True),
                               (model_dir / "config.pbtxt", "the model's config", False),
                               (model_dir / str(VERSION), "the version folder", True)):
        if path.exists() and path.is_dir() != folder:
            kind = "a folder" if path.is_dir() else "a file"
            raise UserError(f"{path}: is {kind}, where triton-repo writes {what}; move it away first")
