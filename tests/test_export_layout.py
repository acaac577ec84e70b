"""The export-mode layouts (fewer copies in the graph) compute the same sums as the authors' formulation.

Each export form is checked against an independent computation: the explicit 4D sums of
`naive_center_pivot`, torch's own GroupNorm and F.interpolate.
"""

import pytest
import torch
import torch.nn.functional as F
from test_model import LEARNER_PAIRS, naive_center_pivot

from hsnet_deploy.model.center_pivot import CenterPivotConv4d, HaloInput, halo_rows
from hsnet_deploy.model.correlation import (
    hypercorrelation,
    hypercorrelation_for_export,
    mask_support_features,
)
from hsnet_deploy.model.learner import GroupNorm6d, HPNLearner
from hsnet_deploy.model.resize import Resizer


def _close(got, want, rel=1e-5):
    assert got.shape == want.shape
    assert (got.double() - want.double()).abs().max() <= rel * want.abs().max()


@pytest.mark.parametrize("kernel,stride", LEARNER_PAIRS)
def test_transpose_free_conv1_matches_naive_4d_sum(kernel, stride):
    torch.manual_seed(kernel * 10 + stride)
    conv = CenterPivotConv4d(2, 3, kernel, stride)
    conv.export_layout = True
    for shape in [(2, 2, 5, 4, 7, 6), (1, 2, 3, 6, 9, 5)]:
        x = torch.randn(shape)
        with torch.no_grad():
            got = conv(x)
        _close(got, naive_center_pivot(x, conv.conv1.weight, conv.conv1.bias, conv.conv2.weight,
                                       conv.conv2.bias, stride))


def _halo_input(x: torch.Tensor, kernel: int, stride: int) -> HaloInput:
    """What the export-mode correlation writes, built here from a plain 6D tensor by padding and slicing."""
    n, c, hq, wq, hs, ws = x.shape
    rows = halo_rows(hs, kernel, stride)
    halo = F.pad(x, (0, 0, 0, rows - hs)).reshape(n, c, hq * wq * rows, ws)
    return HaloInput(halo, x[..., ::stride, ::stride], x)


@pytest.mark.parametrize("kernel,stride,support", [(3, 2, 13), (3, 2, 7), (5, 4, 50), (5, 4, 25), (5, 4, 9), (3, 2, 5)])
def test_halo_conv_matches_naive_4d_sum(kernel, stride, support):
    assert halo_rows(support, kernel, stride) is not None
    torch.manual_seed(support)
    conv = CenterPivotConv4d(2, 3, kernel, stride)
    hq = 3 if support > 20 else 4
    x = torch.randn(2, 2, hq, hq + 1, support, support - 1 if support > 20 else support)
    if halo_rows(x.shape[-2], kernel, stride) is None:
        x = x[..., :support]
    with torch.no_grad():
        got = conv.forward_halo(_halo_input(x, kernel, stride))
    _close(got, naive_center_pivot(x, conv.conv1.weight, conv.conv1.bias, conv.conv2.weight,
                                   conv.conv2.bias, stride))


def test_halo_rows_rule():
    # At 400x400 (resnet50) every first squeeze block takes the halo layout: C4 13, C3 25, C2 50.
    assert halo_rows(13, 3, 2) == 14 and halo_rows(25, 5, 4) == 28 and halo_rows(50, 5, 4) == 52
    # Too few spare rows (48 -> 12 rows of output leaves none) or stride 1: the plain layout.
    assert halo_rows(48, 5, 4) is None and halo_rows(12, 3, 2) is None and halo_rows(4, 3, 1) is None


@pytest.mark.parametrize("shape,offset", [((2, 16, 5, 4, 3, 3), 0.0), ((1, 8, 6, 6, 2, 2), 3.0),
                                          ((3, 128, 4, 4, 2, 2), 20.0)])
def test_groupnorm_export_form_matches_torch(shape, offset):
    """One-pass statistics (E[x], E[x^2]) applied by one BatchNormalization, also with a mean far from 0."""
    torch.manual_seed(shape[1])
    gn = GroupNorm6d(4, shape[1], eps=1e-5)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(shape) * 2 + offset
    with torch.no_grad():
        want = F.group_norm(x, 4, gn.weight, gn.bias, 1e-5)
        gn.two_stage = True
        got = gn(x)
    _close(got, want, rel=2e-5)


def test_query_upsample_without_permutes_matches_interpolate():
    learner = HPNLearner((3, 6, 4))
    x = torch.randn(2, 5, 7, 6, 2, 3)
    with torch.no_grad():
        want = learner.upsample_query_dims(x, (13, 11))
        learner.resize.prepare({(7, 13), (6, 11)})
        got = learner.upsample_query_dims(x, (13, 11))
    _close(got, want)


@pytest.mark.parametrize("shots,masked", [(1, True), (2, True), (2, False)])
def test_export_correlation_writes_the_same_pyramid(shots, masked, monkeypatch):
    """Joint normalisation with the mask as a factor, zero-row padded supports and the pruned MatMul give
    the eager path's pyramid (split, mask, normalise, MatMul) and its pruned slices."""
    real_pad, pads = F.pad, []

    def pad_spy(x, pad, *a, **k):
        pads.append((x.dim(), tuple(pad)))
        return real_pad(x, pad, *a, **k)

    monkeypatch.setattr(F, "pad", pad_spy)
    torch.manual_seed(shots)
    b, img = 2, 40
    stage_sizes, channels, sides = (1, 2, 1), (8, 6, 4), (13, 5, 10)  # C4, C3, C2: each grid > channels
    feats = []  # backbone order: C2 maps first
    for side, ch, count in zip(reversed(sides), reversed(channels), reversed(stage_sizes)):
        feats += [torch.randn(b + b * shots, ch, side, side) for _ in range(count)]
    masks = (torch.rand(b * shots, img, img) > 0.5).float()
    masks[0, :, : img // 2] = 0  # a wide zero area: resized, it has exact zeros and tiny residues
    resize = Resizer()
    resize.prepare({(img, side) for side in sides})
    query, support = zip(*(torch.split(f, [b, b * shots]) for f in feats))
    support = list(support)
    if masked:
        support = mask_support_features(support, masks, resize)
    blocks = ((3, 2), (5, 4), (5, 4))
    plain = hypercorrelation(list(query), support, shots, stage_sizes)
    staged = hypercorrelation_for_export(feats, b, shots, masks if masked else None, resize, stage_sizes, blocks)
    assert all(isinstance(s, HaloInput) for s in staged)  # 13 -> 14, 5 -> 8, 10 -> 12 rows
    # each zero-row pad is a 4D (maps, C, h, w) pad along h alone, ONNX Runtime CUDA's own Pad kernel's case
    assert pads == [(4, (0, 0, 0, 1)), (4, (0, 0, 0, 3)), (4, (0, 0, 0, 2))]
    for want, got, (_, stride) in zip(plain, staged, blocks):
        _close(got.plain, want)
        if masked:  # support positions whose resized mask is exactly 0 correlate to exactly 0
            zero = resize(masks, tuple(want.shape[-2:])) == 0
            assert zero.any() and (got.plain.permute(0, 4, 5, 1, 2, 3)[zero] == 0).all()
        _close(got.pruned, want[..., ::stride, ::stride])
        rows = got.halo.shape[2] // (want.shape[2] * want.shape[3])
        halo = got.halo.reshape(*want.shape[:4], rows, want.shape[-1])
        _close(halo[..., : want.shape[-2], :], want)
        assert (halo[..., want.shape[-2]:, :] == 0).all()
    # --layout without halo: every stage plain, the same pyramid
    unpadded = hypercorrelation_for_export(feats, b, shots, masks if masked else None, resize, stage_sizes, blocks,
                                           use_halo=False)
    assert not any(isinstance(s, HaloInput) for s in unpadded)
    for want, got in zip(plain, unpadded):
        _close(got, want)


@pytest.mark.parametrize("layout", ["all", "halo,support_major_mixing", "none", "single_bias"])
def test_model_in_export_layout_matches_eager_at_a_halo_size(layout):
    """At 200x200 resnet50's C2 (25x25, 512 channels) takes the halo layout; logits and pyramid stay put
    with every layout switch on, with the dilated conv1 and the single bias off, with all of them off, and
    with only the single bias on (`--layout`)."""
    import copy

    from conftest import random_episode

    from hsnet_deploy.model import ExportLayout, seeded_model

    model = seeded_model("resnet50")
    q, s, m = random_episode(2, 2, 200, seed=3)
    chosen = ExportLayout.parse(layout)
    exported = copy.deepcopy(model).prepare_export(200, 200, chosen)
    seen, dilated = [], []
    real = exported.hpn_learner.squeeze
    exported.hpn_learner.squeeze = lambda block, x: seen.append(isinstance(x, HaloInput)) or real(block, x)
    real_conv2d = F.conv2d

    biases = {}  # center-pivot conv -> the bias its conv1 and conv2 ran with
    branches = {id(m.conv1.weight): (m, 0) for m in exported.modules() if isinstance(m, CenterPivotConv4d)}
    branches.update({id(m.conv2.weight): (m, 1) for m in exported.modules() if isinstance(m, CenterPivotConv4d)})

    def spy(*args, **kwargs):
        dilated.append(kwargs.get("dilation", 1) != 1)
        if id(args[1]) in branches:
            module, branch = branches[id(args[1])]
            biases.setdefault(module, ["not run", "not run"])[branch] = args[2] if len(args) > 2 else kwargs.get("bias")
        return real_conv2d(*args, **kwargs)

    with torch.no_grad():
        want, want_pyramid = model.support_logits(q, s, m)
        F.conv2d = spy
        try:
            got, got_pyramid = exported.support_logits(q, s, m)
        finally:
            F.conv2d = real_conv2d
    # C4, C3 plain (too few query positions to pay), C2 halo, when the halo is on
    assert seen == [False, False, chosen.halo]
    assert any(dilated) == chosen.dilated_query_conv
    assert exported.hpn_learner.support_major == chosen.support_major_mixing
    # conv1 without a bias and conv2 with the sum of both, or each with its own (the dense conv2 of the
    # support-major mixing runs other weights: its bias is checked by test_support_major_conv_matches_naive_4d_sum)
    assert len(biases) == 15
    dense = [bias2 for _, bias2 in biases.values() if isinstance(bias2, str)]
    assert len(dense) == (6 if chosen.support_major_mixing else 0)
    for module, (bias1, bias2) in biases.items():
        if chosen.single_bias:
            assert bias1 is None and (isinstance(bias2, str) or torch.equal(bias2, module.conv1.bias + module.conv2.bias))
        else:
            assert bias1 is module.conv1.bias and (isinstance(bias2, str) or bias2 is module.conv2.bias)
    _close(got, want, rel=1e-5)
    for g, w in zip(got_pyramid, want_pyramid):
        _close(g, w, rel=1e-5)


@pytest.mark.parametrize("single_bias", [False, True])
@pytest.mark.parametrize("kernel,stride,grid", [(3, 1, (2, 2)), (3, 1, (3, 2)), (3, 2, (4, 4)), (5, 4, (5, 6))])
def test_support_major_conv_matches_naive_4d_sum(kernel, stride, grid, single_bias):
    """The dense 1x1 form of conv2 and conv1 on support-major maps give the explicit 4D sums, with each
    branch's bias or with the two summed into the dense conv's."""
    torch.manual_seed(kernel + stride + grid[0])
    conv = CenterPivotConv4d(3, 5, kernel, stride)
    x = torch.randn(2, 3, 4, 5, *grid)  # (N, C, Hq, Wq, Hs, Ws)
    with torch.no_grad():
        conv.conv1.bias.normal_(0, 2)  # large enough that a dropped or doubled bias fails the comparison
    if single_bias:
        conv.prepare_single_bias()
    conv.prepare_support_major(*grid)
    with torch.no_grad():
        got = conv.forward_support_major(x.permute(0, 4, 5, 1, 2, 3)).permute(0, 3, 4, 5, 1, 2)
    _close(got, naive_center_pivot(x, conv.conv1.weight, conv.conv1.bias, conv.conv2.weight,
                                   conv.conv2.bias, stride))


def test_support_major_groupnorm_matches_torch():
    torch.manual_seed(7)
    gn = GroupNorm6d(4, 16, eps=1e-5)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
        x = torch.randn(3, 16, 6, 5, 2, 2) * 2 + 5.0
        want = F.group_norm(x, 4, gn.weight, gn.bias, 1e-5)
        got = gn.forward_support_major(x.permute(0, 4, 5, 1, 2, 3)).permute(0, 3, 4, 5, 1, 2)
    _close(got, want, rel=2e-5)


def test_support_major_mixing_matches_the_eager_learner():
    """encode with the mixing in the support-major layout (export) against the eager learner."""
    torch.manual_seed(3)
    learner = HPNLearner((3, 6, 4)).eval()
    with torch.no_grad():
        for module in learner.modules():
            if isinstance(module, GroupNorm6d):
                module.weight.normal_()
                module.bias.normal_()
        # C4 13x13 -> 2x2 support grid after squeezing, C3 25x25, C2 50x50 queries (resnet50 at 400), small here
        pyramid = [torch.randn(2, 3, 4, 4, 13, 13), torch.randn(2, 6, 7, 7, 25, 25), torch.randn(2, 4, 13, 13, 50, 50)]
        want = learner.encode(pyramid)
        learner.resize.prepare({(4, 7), (7, 13)})
        for module in learner.modules():
            if isinstance(module, GroupNorm6d):
                module.two_stage = True
            if isinstance(module, CenterPivotConv4d):
                module.export_layout = True
        learner.prepare_support_major(2, 2)
        got = learner.encode(pyramid)
    assert got.shape == want.shape == (2, 128, 13, 13)
    _close(got, want, rel=2e-5)


@pytest.mark.parametrize("n,positions", [(1, 1), (3, 1), (2, 4)])
def test_normalise_rows_gives_each_row_its_group_statistics_and_channel_affine(n, positions):
    """The one BatchNormalization of the export form, rows ordered (sample, position, channel), against the
    GroupNorm formula written out per row in float64; a group of equal values (variance rounding below 0 in
    E[x^2] - E[x]^2) comes out as its bias, not NaN."""
    torch.manual_seed(n * 10 + positions)
    c, groups, s = 8, 4, 30
    gn = GroupNorm6d(groups, c, eps=1e-5)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(n, positions, c, s) * 3 + torch.arange(c).reshape(1, 1, c, 1) * 5.0
    x[0, :, 2:4] = 7.3  # sample 0, group 1: constant
    xd = x.double().reshape(n, positions, groups, c // groups, s)
    mean = xd.mean(dim=(1, 3, 4))  # (N, G)
    var = xd.var(dim=(1, 3, 4), unbiased=False)
    norm = (xd - mean[:, None, :, None, None]) / torch.sqrt(var[:, None, :, None, None] + 1e-5)
    want = (norm.reshape(n, positions, c, s) * gn.weight.double().reshape(1, 1, c, 1)
            + gn.bias.double().reshape(1, 1, c, 1))
    with torch.no_grad():
        stats_mean = x.reshape(n, positions, groups, -1).mean(dim=(1, 3))
        stats_sq = x.square().reshape(n, positions, groups, -1).mean(dim=(1, 3))
        got = gn.normalise_rows(x.reshape(1, n * positions * c, s), n, positions, stats_mean, stats_sq)
    got = got.reshape(n, positions, c, s)
    assert torch.isfinite(got).all()
    varying = torch.ones(n, c, dtype=torch.bool)
    varying[0, 2:4] = False
    _close(got.permute(0, 2, 1, 3)[varying], want.float().permute(0, 2, 1, 3)[varying], rel=2e-5)
    # the constant group: x - E[x] is a float rounding (~1 ulp of 7.3) over sqrt(eps): within 1e-3 of the bias
    assert torch.allclose(got[0, :, 2:4], gn.bias[2:4].reshape(1, 2, 1).expand(positions, 2, s), atol=1e-3)


def test_layout_switches_parse_from_the_command_line_form():
    from hsnet_deploy.model import ExportLayout

    assert ExportLayout.parse("all") == ExportLayout() and ExportLayout().label() == "all"
    none = ExportLayout.parse("none")
    assert not (none.halo or none.dilated_query_conv or none.support_major_mixing or none.single_bias)
    assert none.label() == "none"
    some = ExportLayout.parse(" halo , support-major-mixing ")
    assert some == ExportLayout(dilated_query_conv=False, single_bias=False)
    assert some.label() == "halo,support_major_mixing"
    assert ExportLayout.parse(some.label()) == some
    with pytest.raises(ValueError, match="empty"):  # `--layout ""` read as none before
        ExportLayout.parse("  ")
    with pytest.raises(ValueError, match="unknown layout switch diagonal"):
        ExportLayout.parse("halo,diagonal")


@pytest.mark.parametrize("size", [(13, 11), (5, 11), (13, 7)])
def test_resizer_keeps_height_and_width_apart_eagerly_and_as_matrices(size):
    """A non-square resize, and one that keeps only one of the two sides: both modes equal F.interpolate
    (bilinear, align_corners=True) on the last two dims."""
    x = torch.randn(2, 3, 5, 7)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    resize = Resizer()
    _close(resize(x, size), want)
    resize.prepare({(5, size[0]), (7, size[1])})
    got = resize(x, size)
    assert got.shape == (2, 3, *size)
    _close(got, want)


def test_layout_label_names_three_of_four_switches():
    from hsnet_deploy.model import ExportLayout

    three = ExportLayout(single_bias=False)
    assert three.label() == "dilated_query_conv,halo,support_major_mixing"
    assert ExportLayout.parse(three.label()) == three
