"""Atomic writes and artifact metadata: one helper for every file the toolkit writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hsnet_deploy.errors import UserError

# Every artifact's inputs and outputs (contract.md): the exporter writes them, every runner reads them.
INPUT_NAMES = ("query_img", "support_imgs", "support_masks")
OUTPUT_NAMES = ("logits", "mask")


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path that cannot become a file, before any expensive work starts."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{out}: is a directory, expected an output file path")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: directory {parent} is not writable")
    return out


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    An interrupted or failed write leaves the previous file (or none), never a truncated one.
    The temporary file sits in the same directory so the final rename is atomic on POSIX.
    """
    out = check_output_path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    mode = 0o666 & ~current_umask()  # mkstemp makes 0600; the file a user gets follows their umask
    try:
        os.chmod(tmp, mode)
        yield tmp
        os.chmod(tmp, mode)  # again: a writer may have replaced the temporary file with its own
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Keys of the metadata every artifact carries (ONNX metadata_props; TensorRT: the sidecar JSON).
# Values are strings in ONNX, so structured ones (versions, preprocessing, gate) are JSON-encoded.
META_PREFIX = "hsnet."
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # authors' data/dataset.py (FSSDataset.img_mean)
IMAGENET_STD = (0.229, 0.224, 0.225)  # authors' data/dataset.py (FSSDataset.img_std)
PREPROCESSING = {
    "resize": "PIL bilinear (antialiased) on the uint8 RGB image to img_size x img_size",
    "scale": "1/255",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "mask_resize": "torch nearest (legacy) to img_size; foreground = 1",
}


def tool_versions(**extra: str) -> dict[str, str]:
    """Versions of what made an artifact; imported lazily so a missing optional package is just absent."""
    import importlib.metadata as md

    versions = {}
    for dist in ("hsnet-deploy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    versions.update(extra)
    return versions


def meta_to_props(meta: dict) -> dict[str, str]:
    return {META_PREFIX + k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in meta.items()}


# Metadata fields whose values are text: stored as they are, and read back as text even where they look like JSON
# (a version "1.20" would otherwise come back as the number 1.2).
TEXT_FIELDS = frozenset({"format", "backbone", "precision", "weights", "source_model", "source_sha256",
                         "checkpoint", "checkpoint_format", "checkpoint_sha256", "simplified", "layout",
                         "ort_version", "ort_device", "ort_optimization", "tensorrt_version", "gpu_name",
                         "compute_capability", "plan_sha256"})


def props_to_meta(props: dict[str, str]) -> dict:
    meta = {}
    for key, value in props.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX):]
        if name in TEXT_FIELDS:
            meta[name] = value
            continue
        try:
            meta[name] = json.loads(value)
        except json.JSONDecodeError:
            meta[name] = value
    return meta


def stage_of_node(meta: dict) -> dict[str, str]:
    """Node name -> HSNet stage, from the `stages` map an exported model carries (empty when absent)."""
    return {name: stage for stage, names in meta.get("stages", {}).items() for name in names}
