"""Episodes per second of `eval` on the CPU: PyTorch eager (a checkpoint) against the ONNX Runtime runner,
resnet50 at 400x400, 1-shot, on a synthetic FSS-1000-layout folder of 500x375 JPEGs (data loading included,
overlapped with inference as in the real command)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from record import md_table, record

from hsnet_deploy.data.datasets import build_episodes
from hsnet_deploy.data.evaluate import evaluate
from hsnet_deploy.defaults import default_artifact
from hsnet_deploy.model import save_checkpoint, seeded_model
from hsnet_deploy.runtime.artifact import open_artifact


def make_fss(root: Path, classes: int = 3, images: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "FSS-1000" / f"class{c}"
        folder.mkdir(parents=True)
        for n in range(1, images + 1):
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(folder / f"{n}.jpg")
            mask = np.zeros((375, 500), np.uint8)
            mask[80:300, 100:400] = 255
            Image.fromarray(mask).save(folder / f"{n}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=12)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = make_fss(Path(tmp) / "data")
        ckpt = Path(tmp) / "seeded.pt"
        save_checkpoint(seeded_model("resnet50"), ckpt)
        eset = build_episodes("fss", root, shots=1, episodes=args.episodes)
        for label, path in (("pytorch eager (checkpoint)", ckpt), ("onnxruntime cpu (ONNX)", default_artifact(400))):
            runner = open_artifact(path, "cpu")
            with runner:
                start = time.perf_counter()
                result = evaluate(lambda q, s, m: runner.infer(
                    {"query_img": q, "support_imgs": s, "support_masks": m})["mask"], eset, progress=False)
                wall = time.perf_counter() - start
            rows.append([label, result.episodes, wall, result.episodes / wall,
                         sum(runner.inference_times) / len(runner.inference_times) * 1e3])
            print(rows[-1], flush=True)
    body = md_table(["runner", "episodes", "wall s", "episodes/s", "inference ms/episode"], rows)
    body += "\n\nSeeded weights; the wall time includes JPEG/PNG decoding and preprocessing in the loader thread."
    record("eval_speed", "eval speed on the CPU (issue: eval and predict)", body)


if __name__ == "__main__":
    main()
