import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from authors_reference import authors_forward
from conftest import random_episode, reference_keys

from hsnet_deploy.errors import UserError
from hsnet_deploy.model import (
    BACKBONES,
    CenterPivotConv4d,
    HSNet,
    check_image_size,
    feature_sizes,
    kshot_vote,
    seeded_model,
)
from hsnet_deploy.model.learner import MIX, SQUEEZE_C2, SQUEEZE_C3, SQUEEZE_C4

LEARNER_PAIRS = sorted({(k, s) for _, k, s in SQUEEZE_C4 + SQUEEZE_C3 + SQUEEZE_C2 + MIX})


def naive_center_pivot(x, w1, b1, w2, b2, stride):
    """out(x, x') = sum_p' c(x, p') k2(p' - x') + sum_p c(p, x') k1(p - x), written as explicit sums."""
    x, w1, w2, b1, b2 = (t.detach().double() for t in (x, w1, w2, b1, b2))
    x, w1, w2 = x.numpy(), w1.numpy(), w2.numpy()
    n, _, hq, wq, hs, ws = x.shape
    o, _, k, _ = w1.shape
    p = k // 2
    hs_out, ws_out = len(range(0, hs, stride)), len(range(0, ws, stride))
    out = np.zeros((n, o, hq, wq, hs_out, ws_out))
    for i, j, u, v in itertools.product(range(hq), range(wq), range(hs_out), range(ws_out)):
        su, sv = u * stride, v * stride  # the output's support pivot in input coordinates
        acc = b1.double().numpy() + b2.double().numpy()
        acc = np.broadcast_to(acc, (n, o)).copy()
        for di, dj in itertools.product(range(k), range(k)):
            qi, qj = i + di - p, j + dj - p  # query neighbour, support fixed at the pivot
            if 0 <= qi < hq and 0 <= qj < wq:
                acc += x[:, :, qi, qj, su, sv] @ w1[:, :, di, dj].T
            ti, tj = su + di - p, sv + dj - p  # support neighbour, query fixed
            if 0 <= ti < hs and 0 <= tj < ws:
                acc += x[:, :, i, j, ti, tj] @ w2[:, :, di, dj].T
        out[:, :, i, j, u, v] = acc
    return torch.from_numpy(out)


@pytest.mark.parametrize("kernel,stride", LEARNER_PAIRS)
def test_center_pivot_matches_naive_4d_sum(kernel, stride):
    torch.manual_seed(kernel * 10 + stride)
    conv = CenterPivotConv4d(2, 3, kernel, stride)
    for shape in [(2, 2, 5, 4, 7, 6), (1, 2, 3, 6, 9, 5)]:  # a second input size after the first
        x = torch.randn(shape)
        with torch.no_grad():
            got = conv(x).double()
        want = naive_center_pivot(x, conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, stride)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_state_dict_matches_authors_keys_shapes_dtypes(backbone):
    ref = reference_keys(backbone)
    mine = HSNet(backbone).state_dict()
    assert list(mine) == list(ref)
    for name, tensor in mine.items():
        shape, dtype = ref[name]
        assert tuple(tensor.shape) == shape, name
        assert str(tensor.dtype).removeprefix("torch.") == dtype, name


@pytest.mark.parametrize("backbone,count", [("resnet50", 2_573_794), ("resnet101", 2_587_394), ("vgg16", 2_570_018)])
def test_learner_parameter_count(backbone, count):
    assert sum(p.numel() for p in HSNet(backbone).hpn_learner.parameters()) == count


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpoint_built_from_authors_keys_loads_strictly(backbone, tmp_path):
    from hsnet_deploy.model import load_checkpoint

    g = torch.Generator().manual_seed(1)
    state = {}
    for name, (shape, dtype) in reference_keys(backbone).items():
        if dtype == "int64":
            state["module." + name] = torch.tensor(7, dtype=torch.int64)
        else:
            state["module." + name] = torch.randn(shape, generator=g)
    path = tmp_path / "best_model.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # PyTorch 1.5's legacy format
    model = load_checkpoint(path, backbone)
    assert not model.training
    probe = "hpn_learner.decoder2.2.weight"
    assert torch.equal(model.state_dict()[probe], state["module." + probe])
    HSNet(backbone).load_state_dict({k[7:]: v for k, v in state.items()}, strict=True)


EXPECTED_CHANNELS = {  # per tapped map, in backbone order
    "resnet50": [512] * 4 + [1024] * 6 + [2048] * 3,
    "resnet101": [512] * 4 + [1024] * 23 + [2048] * 3,
    "vgg16": [512] * 7,
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_hypercolumn_sizes_and_channels_at_400(backbone):
    model = HSNet(backbone)
    with torch.no_grad():
        feats = model.backbone.hypercolumns(torch.randn(1, 3, 400, 400))
    assert [f.shape[1] for f in feats] == EXPECTED_CHANNELS[backbone]
    n4, n3, n2 = model.backbone.stage_sizes
    sides = [f.shape[-1] for f in feats]
    want = {"vgg16": (50, 25, 12)}.get(backbone, (50, 25, 13))
    assert feature_sizes(backbone, 400) == want
    assert sides == [want[0]] * n2 + [want[1]] * n3 + [want[2]] * n4
    assert all(f.min() < 0 for f in feats[:-1])  # taps are pre-ReLU (vgg's last is pool5)


def test_resnet_taps_are_block_outputs_before_the_final_relu():
    model = HSNet("resnet50")
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in
             (model.backbone.layer2, model.backbone.layer3, model.backbone.layer4) for b in layer]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone.hypercolumns(x)
        torch.nn.Sequential(*list(model.backbone.children())[:8])(x)  # torchvision-style forward
    for h in hooks:
        h.remove()
    assert len(outputs) == len(feats) == 13
    for tap, out in zip(feats, outputs):
        assert torch.allclose(torch.relu(tap), out, atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_squeezed_support_dims_are_2x2_at_400(backbone):
    model = seeded_model(backbone)
    seen = {}
    for name in ("encoder_layer4", "encoder_layer3", "encoder_layer2"):
        getattr(model.hpn_learner, name).register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.shape))
    with torch.no_grad():
        model(*random_episode(1, 1, 400))
    f2, f3, f4 = feature_sizes(backbone, 400)
    assert seen["encoder_layer4"][2:] == (f4, f4, 2, 2)
    assert seen["encoder_layer3"][2:] == (f3, f3, 2, 2)
    assert seen["encoder_layer2"][2:] == (f2, f2, 2, 2)


def test_image_size_rule_predicts_what_the_network_accepts():
    model = seeded_model("vgg16")
    check_image_size("vgg16", 256, 256)
    with pytest.raises(UserError, match="264.*must agree"):
        check_image_size("vgg16", 264, 264)
    # Bypass the check: the network itself must fail at 520 (squeezed support sides 3, 2, 2) and run at
    # 256. (At 264 the sides are 2, 1, 1 and PyTorch would broadcast 1 over 2: it runs, but not as trained,
    # so the rule refuses it too.)
    import hsnet_deploy.model.hsnet as hsnet_module

    original = hsnet_module.check_image_size
    hsnet_module.check_image_size = lambda *a: None
    try:
        with torch.no_grad():
            model(*random_episode(1, 1, 256))
            with pytest.raises(RuntimeError):
                model(*random_episode(1, 1, 520))
    finally:
        hsnet_module.check_image_size = original
    with pytest.raises(UserError, match="image height 520"):
        model(*random_episode(1, 1, 520))
    with pytest.raises(UserError, match="too small"):
        check_image_size("resnet50", 16, 16)


def test_kshot_vote_on_hand_made_argmax_maps():
    # 3 shots over a 1x4 image; votes per pixel: [0, 1, 2, 3] -> /3 -> >= 0.5 keeps the last two.
    fg = torch.tensor([[[0, 1, 1, 1]], [[0, 0, 1, 1]], [[0, 0, 0, 1]]], dtype=torch.float32)  # (K, 1, 4)
    logits = torch.stack([1 - fg, fg], dim=1).unsqueeze(0)  # (1, K, 2, 1, 4)
    assert kshot_vote(logits).tolist() == [[[0, 0, 1, 1]]]
    # Largest vote 1 (only one shot fires anywhere): every voted pixel counts.
    fg = torch.tensor([[[0, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 1]]], dtype=torch.float32)
    assert kshot_vote(torch.stack([1 - fg, fg], dim=1).unsqueeze(0)).tolist() == [[[0, 1, 0, 1]]]
    # No votes at all: all background (division by max(0, 1)).
    assert kshot_vote(torch.zeros(2, 3, 2, 2, 2)).sum() == 0


def test_one_shot_mask_is_the_argmax():
    logits = torch.randn(2, 1, 2, 8, 8)
    assert torch.equal(kshot_vote(logits), logits[:, 0].argmax(dim=1).float())


def test_query_backbone_runs_once_for_five_shots():
    model = seeded_model("resnet50")
    calls = Counter()
    original = model.backbone.hypercolumns

    def counting(img):
        calls[img.shape[0]] += 1
        return original(img)

    model.backbone.hypercolumns = counting
    with torch.no_grad():
        model(*random_episode(2, 5, 64))
    # One pass over B + B*K = 12 images; the authors' per-shot loop would push 2 * B*K = 20 through it.
    assert calls == Counter({12: 1})


@pytest.mark.parametrize("backbone", BACKBONES)
def test_matches_independent_authors_style_forward(backbone):
    model = seeded_model(backbone)
    q, s, m = random_episode(2, 3, 96 if backbone != "vgg16" else 128, seed=3)
    with torch.no_grad():
        logits, mask = model(q, s, m)
        ref_logits, ref_mask = authors_forward(model, q, s, m)
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 1e-5 * scale
    assert torch.equal(mask, ref_mask)


def test_kshot_logits_equal_separate_one_shot_calls():
    model = seeded_model("resnet50")
    q, s, m = random_episode(2, 3, 64, seed=4)
    with torch.no_grad():
        joint, _ = model(q, s, m)
        for shot in range(3):
            single, _ = model(q, s[:, shot:shot + 1], m[:, shot:shot + 1])
            assert (joint[:, shot] - single[:, 0]).abs().max() <= 1e-5 * single.abs().max()


def test_mask_support_switch_changes_the_result():
    q, s, m = random_episode(1, 1, 64, seed=5)
    with torch.no_grad():
        on, _ = seeded_model("resnet50")(q, s, m)
        off_model = seeded_model("resnet50", mask_support=False)
        off, _ = off_model(q, s, m)
        ref, _ = authors_forward(off_model, q, s, m)
    assert not torch.allclose(on, off)
    assert (off - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_export_numerics_stay_close_to_eager():
    model = seeded_model("resnet50")
    q, s, m = random_episode(2, 2, 96, seed=6)
    with torch.no_grad():
        eager, _ = model(q, s, m)
        model.prepare_export(96, 96)
        exported, _ = model(q, s, m)
    assert (eager - exported).abs().max() <= 1e-4 * eager.abs().max()
    assert hasattr(model.mask_resize, "m_96_12")
    assert not any("m_96_12" in k for k in model.state_dict())  # matrices are not checkpoint keys
