"""The embedded default model `bench` (and the benchmark scripts) fall back to, and the exporters' noise
switched off: library code the CLI and the scripts share."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from hsnet_deploy.errors import GateFailure

CACHE_DIR = Path(os.environ.get("HSNET_DEPLOY_CACHE", Path.home() / ".cache" / "hsnet-deploy"))


def quiet_exporters() -> None:
    """torch.onnx logs a warning per missing torchvision op and onnxscript chats; users need none of it."""
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_LOGS", "-all")


def default_artifact(img_size: int) -> Path:
    """The embedded default: resnet50 with seeded weights, exported once into the cache directory."""
    import subprocess
    import sys

    from hsnet_deploy.console import err
    from hsnet_deploy.model.hsnet import check_image_size

    check_image_size("resnet50", img_size, img_size)  # bad input is the caller's Error:, not a failed child
    path = CACHE_DIR / f"default-resnet50-{img_size}-seed0.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    err.print(f"Exporting the embedded default (resnet50, SEEDED RANDOM weights, {img_size}x{img_size}) "
              f"to {path} once ...")
    # In a child process: the export's memory stays out of the peak memory the benchmark reports.
    child = subprocess.Popen([sys.executable, "-m", "hsnet_deploy", "export", "--backbone", "resnet50", "--seed", "0",
                              "--img-size", str(img_size), "-o", str(path)], stdout=subprocess.DEVNULL)
    try:
        returncode = child.wait()
    except BaseException:
        # Ctrl-C or SIGTERM here: SIGTERM lets the child remove its temporary files (SIGKILL would not).
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    if returncode != 0 or not path.exists():
        raise GateFailure(f"the embedded default could not be exported (exit status {returncode})")
    return path
