import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(max(1, torch.get_num_threads()))
# Tables as piped output gets them (160 columns) whatever width the developer's shell exports.
os.environ.pop("COLUMNS", None)


def reference_keys(backbone: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The authors' state_dict (without `module.`) as listed in shared/reference."""
    path = SHARED / "reference" / f"authors-keys-{backbone}.txt"
    if not path.exists():
        pytest.skip(f"reason: {path} is missing (shared/ must sit beside the checkout)")
    keys = {}
    for line in path.read_text().splitlines():
        name, rest = line.split(" ", 1)
        shape_text, dtype = rest.rsplit(" ", 1)
        shape = tuple(int(x) for x in shape_text.strip("()").split(",") if x.strip())
        keys[name.removeprefix("module.")] = (shape, dtype)
    return keys


def random_episode(b: int, k: int, size: int, seed: int = 0, noise_masks: bool = False):
    """Random images and masks: filled ellipses (or pixel noise) so the support masks are realistic."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, size, size, generator=g)
    s = torch.randn(b, k, 3, size, size, generator=g)
    if noise_masks:
        m = (torch.rand(b, k, size, size, generator=g) > 0.5).float()
    else:
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        m = torch.zeros(b, k, size, size)
        for i in range(b):
            for j in range(k):
                cy, cx, ry, rx = (torch.rand(4, generator=g) * torch.tensor([0.6, 0.6, 0.3, 0.3]) + 0.2) * size
                m[i, j] = ((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1).float()
    return q, s, m


EXPORT_SIZE = 64  # the smallest size every backbone takes quickly; export tracing dominates anyway


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """backbone -> (path, report, model) of a verified export at EXPORT_SIZE, made once per session."""
    from hsnet_deploy.export import export_onnx
    from hsnet_deploy.model import seeded_model

    cache = {}

    def get(backbone: str = "resnet50"):
        if backbone not in cache:
            model = seeded_model(backbone, 0)
            path = tmp_path_factory.mktemp("onnx") / f"{backbone}.onnx"
            report = export_onnx(model, path, EXPORT_SIZE, source={"weights": "seeded-random", "seed": 0})
            cache[backbone] = (path, report, model)
        return cache[backbone]

    return get


def run_cli(*args: str):
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from hsnet_deploy.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        old = sys.argv
        sys.argv = ["hsnet-deploy", *args]
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv = old
    return code, out.getvalue(), err.getvalue()


def ort_model_from_another_version(src, out):
    """An ORT-optimised model of `src` whose metadata says another ONNX Runtime (0.0.1) optimised it."""
    import onnx

    from hsnet_deploy.artifacts import meta_to_props, props_to_meta
    from hsnet_deploy.runtime.ort_build import build_ort_model

    build_ort_model(src, out, "cpu")
    proto = onnx.load(str(out))
    meta = props_to_meta({p.key: p.value for p in proto.metadata_props})
    meta["ort_version"] = "0.0.1"
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta_to_props(meta))
    onnx.save(proto, str(out))
    return out
