"""The learner exports with a dynamic batch (B*K) and runs at batch sizes other than the traced one.

torch 2.11's ONNX export of the full model failed in the learner's GroupNorm reshape (a `-1` size it could
not infer for a data-dependent batch). The full model's export is checked by the `exported` fixture on the
installed torch; `benchmarks/torch_compat.py` runs these tests and the export under each torch of the
supported range.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from hsnet_deploy.model import seeded_model
from hsnet_deploy.model.learner import GroupNorm6d

SIZE = 64


@pytest.fixture(scope="module")
def model():
    return seeded_model("resnet50", 0).eval()


def _pyramid(model, n_shots: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 3, SIZE, SIZE, generator=g)
    s = torch.randn(1, n_shots, 3, SIZE, SIZE, generator=g)
    m = (torch.rand(1, n_shots, SIZE, SIZE, generator=g) > 0.5).float()
    with torch.no_grad():
        _, pyramid = model.support_logits(q, s, m)
    return pyramid


def test_learner_alone_exports_to_onnx_with_dynamic_batch(model, tmp_path, monkeypatch):
    monkeypatch.setattr(GroupNorm6d, "two_stage", True)
    learner = model.hpn_learner
    n = torch.export.Dim("N", min=1, max=1024)
    path = tmp_path / "learner.onnx"
    torch.onnx.export(learner, (_pyramid(model, 2, 0),), str(path), dynamo=True,
                      dynamic_shapes=([{0: n}, {0: n}, {0: n}],), optimize=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for shots, seed in ((1, 1), (3, 2)):  # neither is the traced N = 2
        pyramid = _pyramid(model, shots, seed)
        got = session.run(None, {name: p.numpy() for name, p in zip(names, pyramid)})[0]
        with torch.no_grad():
            want = learner(pyramid).numpy()
        assert got.shape == want.shape == (shots, 2, SIZE // 4, SIZE // 4)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
