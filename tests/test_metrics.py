import json

import numpy as np
import pytest
import torch

from hsnet_deploy.data.metrics import IoUAccumulator, area_counts


def test_area_counts_match_a_hand_count():
    pred = np.array([[1, 1, 0, 0],
                     [1, 1, 0, 0],
                     [0, 0, 0, 0]])  # fmt: skip
    gt = np.array([[0, 1, 1, 0],
                   [0, 1, 1, 0],
                   [0, 0, 0, 0]])  # fmt: skip
    inter, union = area_counts(pred, gt)
    # fg: pred 4, gt 4, both 2 -> union 6; bg: pred 8, gt 8, both 6 -> union 10
    assert inter.tolist() == [6, 2] and union.tolist() == [10, 6]


def test_a_value_of_exactly_one_half_is_foreground_like_the_authors_two_bin_histogram():
    # torch.histc(bins=2, min=0, max=1) puts 0.5 in the upper (foreground) bin
    pred = np.array([0.5, 0.49, 1.0, 0.0])
    gt = np.array([0.5, 0.0, 0.0, 1.0])
    inter, union = area_counts(pred, gt)
    # pixel 0: both fg; 1: both bg; 2: pred fg only; 3: gt fg only
    assert inter.tolist() == [1, 1] and union.tolist() == [3, 3]


def test_ignored_pixels_count_in_neither_background_nor_foreground():
    pred = np.array([[1, 1, 0], [0, 1, 0]])
    gt = np.array([[1, 0, 0], [0, 0, 0]])
    ignore = np.array([[0, 1, 1], [0, 0, 0]], dtype=bool)  # one fg-pred pixel, one agreed-bg pixel
    inter, union = area_counts(pred, gt, ignore)
    # valid pixels: (0,0) p1 g1, (1,0) p0 g0, (1,1) p1 g0, (1,2) p0 g0
    assert inter.tolist() == [2, 1] and union.tolist() == [3, 2]


def test_class_iou_divides_summed_counts_not_the_mean_of_episode_ious():
    acc = IoUAccumulator([3])
    acc.update(3, np.ones((1, 2)), np.array([[1, 0]]))  # fg inter 1, union 2
    acc.update(3, np.ones((4, 5)), np.ones((4, 5)))  # fg inter 20, union 20
    assert acc.class_iou()[3] == pytest.approx(21 / 22)  # mean of episode IoUs would be 0.75


def authors_scores(episodes, class_ids, nclass):
    """The authors' Evaluator + AverageMeter, transcribed plainly: histc over {0, 1} with 255 ignored."""
    inter_buf = torch.zeros(2, nclass)
    union_buf = torch.zeros(2, nclass)
    for cls, pred, gt, ignore in episodes:
        pred = torch.tensor(pred, dtype=torch.float32)
        gt = torch.tensor(gt, dtype=torch.float32) + torch.tensor(ignore, dtype=torch.float32) * 255
        pred[gt == 255] = 255
        agree = pred[pred == gt]
        inter = torch.histc(agree, bins=2, min=0, max=1) if agree.numel() else torch.zeros(2)
        union = torch.histc(pred, bins=2, min=0, max=1) + torch.histc(gt, bins=2, min=0, max=1) - inter
        inter_buf[:, cls] += inter
        union_buf[:, cls] += union
    ids = torch.tensor(class_ids)
    iou = (inter_buf / torch.maximum(union_buf, torch.ones_like(union_buf)))[:, ids]
    miou = iou[1].mean() * 100
    fb = (inter_buf[:, ids].sum(1) / union_buf[:, ids].sum(1)).mean() * 100
    return miou.item(), fb.item(), iou[1]


def test_miou_and_fb_iou_match_the_authors_formulas_on_random_masks():
    rng = np.random.default_rng(0)
    class_ids = [5, 6, 7, 8, 9]
    episodes = []
    for i in range(40):
        h, w = rng.integers(5, 30, size=2)
        gt = rng.random((h, w)) < rng.random()
        pred = np.where(rng.random((h, w)) < 0.8, gt, ~gt)
        ignore = (rng.random((h, w)) < 0.1) & ~gt
        episodes.append((class_ids[i % 5], pred.astype(np.uint8), gt.astype(np.uint8), ignore))
    acc = IoUAccumulator(class_ids)
    for cls, pred, gt, ignore in episodes:
        acc.update(cls, pred, gt, ignore)

    miou, fb, per_class = authors_scores(episodes, class_ids, nclass=20)

    assert acc.miou == pytest.approx(miou, abs=1e-4)
    assert acc.fb_iou == pytest.approx(fb, abs=1e-4)
    np.testing.assert_allclose([acc.class_iou()[c] for c in class_ids], per_class.numpy(), atol=1e-6)
    assert acc.episodes == 40


def test_miou_averages_visited_classes_only():
    acc = IoUAccumulator([0, 1, 2, 3])
    acc.update(1, np.ones((2, 2)), np.ones((2, 2)))
    acc.update(2, np.zeros((2, 2)), np.ones((2, 2)))
    assert acc.visited == [1, 2]
    assert acc.miou == pytest.approx(50.0)
    # bg: inter 0, union 4 -> 0; fg: inter 4, union 8 -> 0.5
    assert acc.fb_iou == pytest.approx(25.0)


def test_unknown_class_is_rejected():
    with pytest.raises(ValueError, match="class 7"):
        IoUAccumulator([0, 1]).update(7, np.ones((1, 1)), np.ones((1, 1)))


def test_accumulator_survives_a_json_round_trip():
    rng = np.random.default_rng(1)
    acc = IoUAccumulator([10, 11, 12])
    for i in range(9):
        acc.update(10 + i % 2, rng.random((6, 7)) > 0.5, rng.random((6, 7)) > 0.5)
    back = IoUAccumulator.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert back.miou == acc.miou and back.fb_iou == acc.fb_iou and back.episodes == 9
    assert back.class_iou() == acc.class_iou() and back.class_ids == (10, 11, 12)
