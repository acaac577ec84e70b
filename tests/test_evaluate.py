"""The evaluation loop with a fake predictor (thresholding the query image): no model needed."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from synthetic_datasets import make_coco, make_fss, make_pascal

from hsnet_deploy.data.datasets import build_episodes
from hsnet_deploy.data.episodes import load_episode
from hsnet_deploy.data.evaluate import evaluate
from hsnet_deploy.errors import UserError
from hsnet_deploy.model import kshot_vote, mask_at_size

SIZE = 48  # small images keep the loop fast; the loop itself does not depend on the size


def threshold_predict(query_img, support_imgs, support_masks):
    assert query_img.dtype == np.float32 and query_img.ndim == 4
    assert support_imgs.shape[:2] == support_masks.shape[:2] and support_imgs.shape[2] == 3
    return (query_img.mean(axis=1) > 0.5).astype(np.float32)


class StopAfter:
    """A predict_fn that fails on its n-th call, like a crash or Ctrl-C in the middle of a run."""

    def __init__(self, calls: int, exc: type[BaseException] = RuntimeError) -> None:
        self.calls, self.exc = calls, exc

    def __call__(self, *args):
        self.calls -= 1
        if self.calls < 0:
            raise self.exc("stopped")
        return threshold_predict(*args)


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = make_pascal(tmp_path_factory.mktemp("pascal"))
    return build_episodes("pascal", root, shots=2, episodes=30)


def plain_scores(eset, size):
    """An independent loop: per-class sums of fg/bg intersection and union, ignored pixels dropped."""
    inter, union = {}, {}
    for ep in eset.episodes:
        t = load_episode(ep, size)
        pred = threshold_predict(t.query_img[None].numpy(), t.support_imgs[None].numpy(),
                                 t.support_masks[None].numpy())[0] > 0.5
        gt, valid = t.query_mask.numpy() > 0.5, ~t.query_ignore.numpy()
        i = np.array([(~pred & ~gt & valid).sum(), (pred & gt & valid).sum()])
        u = np.array([((~pred | ~gt) & valid).sum(), ((pred | gt) & valid).sum()])
        inter[ep.class_id] = inter.get(ep.class_id, 0) + i
        union[ep.class_id] = union.get(ep.class_id, 0) + u
    per_class = {c: 100 * inter[c][1] / max(union[c][1], 1) for c in inter}
    fb = 100 * np.mean(sum(inter.values()) / sum(union.values()))
    return per_class, float(np.mean(list(per_class.values()))), float(fb)


def test_evaluate_matches_an_independent_loop(pascal):
    result = evaluate(threshold_predict, pascal, img_size=SIZE, batch=4, progress=False)
    per_class, miou, fb = plain_scores(pascal, SIZE)

    assert result.episodes == 30 and result.dataset == "pascal" and result.shots == 2
    assert result.class_iou == pytest.approx(per_class)
    assert result.miou == pytest.approx(miou) and result.fb_iou == pytest.approx(fb)
    assert 0 < result.miou < 100  # the fake predictor is neither perfect nor useless on this data
    assert result.class_names[0] == "aeroplane"


def test_batch_size_does_not_change_the_scores(pascal):
    one = evaluate(threshold_predict, pascal, img_size=SIZE, batch=1, progress=False)
    seven = evaluate(threshold_predict, pascal, img_size=SIZE, batch=7, progress=False)  # last batch of 2
    assert (one.miou, one.fb_iou, one.class_iou) == (seven.miou, seven.fb_iou, seven.class_iou)


@pytest.mark.parametrize(("batch", "stop_calls", "exc"), [(1, 5, RuntimeError), (4, 3, KeyboardInterrupt)])
def test_resumed_run_equals_an_uninterrupted_run(pascal, tmp_path, batch, stop_calls, exc):
    full = evaluate(threshold_predict, pascal, img_size=SIZE, batch=batch, progress=False)
    state = tmp_path / "state.json"

    with pytest.raises(exc, match="stopped"):
        evaluate(StopAfter(stop_calls, exc), pascal, img_size=SIZE, batch=batch, state_path=state, progress=False)
    saved = json.loads(state.read_text())
    assert saved["next_episode"] == stop_calls * batch and not saved["complete"]

    resumed = evaluate(threshold_predict, pascal, img_size=SIZE, batch=batch, state_path=state, resume=True,
                       progress=False)

    assert resumed.resumed_from == stop_calls * batch
    assert (resumed.miou, resumed.fb_iou, resumed.class_iou) == (full.miou, full.fb_iou, full.class_iou)
    assert json.loads(state.read_text())["complete"]


def test_state_is_written_every_n_episodes_during_the_run(pascal, tmp_path):
    state = tmp_path / "state.json"
    seen = []

    def spy(*args):
        seen.append(json.loads(state.read_text())["next_episode"] if state.exists() else None)
        return threshold_predict(*args)

    evaluate(spy, pascal, img_size=SIZE, batch=2, state_path=state, save_every=6, progress=False)
    # calls start at episodes 0, 2, 4, ...; the state moves at 6, 12, 18, 24 completed episodes
    assert seen == [None] * 3 + [6] * 3 + [12] * 3 + [18] * 3 + [24] * 3


def test_resume_of_a_finished_run_returns_its_numbers_without_predicting(pascal, tmp_path):
    state = tmp_path / "state.json"
    first = evaluate(threshold_predict, pascal, img_size=SIZE, state_path=state, progress=False)
    again = evaluate(StopAfter(0), pascal, img_size=SIZE, state_path=state, resume=True, progress=False)
    assert (again.miou, again.fb_iou, again.resumed_from) == (first.miou, first.fb_iou, 30)


def test_resume_with_other_settings_is_a_user_error_naming_them(pascal, tmp_path):
    state = tmp_path / "state.json"
    with pytest.raises(RuntimeError):
        evaluate(StopAfter(2), pascal, img_size=SIZE, state_path=state, fingerprint={"artifact": "a"},
                 progress=False)
    with pytest.raises(UserError, match=r"state\.json: saved by a run with other settings \(img_size, run\.artifact"):
        evaluate(threshold_predict, pascal, img_size=SIZE + 16, state_path=state, resume=True,
                 fingerprint={"artifact": "b"}, progress=False)


def test_resume_over_other_episodes_with_the_same_counts_is_refused(pascal, tmp_path):
    """Same dataset, fold, K and episode count, another draw (seed): the saved totals belong to other episodes."""
    other = build_episodes("pascal", pascal.episodes[0].query_image.parents[2], shots=2, episodes=30, seed=1)
    assert [e.to_dict() for e in other.episodes] != [e.to_dict() for e in pascal.episodes]
    state = tmp_path / "state.json"
    with pytest.raises(RuntimeError):
        evaluate(StopAfter(2), pascal, img_size=SIZE, state_path=state, progress=False)
    with pytest.raises(UserError, match=r"other settings \(episode_digest differ\)"):
        evaluate(threshold_predict, other, img_size=SIZE, state_path=state, resume=True, progress=False)


def test_resume_without_a_state_file_starts_from_the_beginning(pascal, tmp_path):
    result = evaluate(threshold_predict, pascal, img_size=SIZE, state_path=tmp_path / "new.json", resume=True,
                      progress=False)
    assert result.resumed_from == 0 and result.episodes == 30
    assert any("no saved state" in n for n in result.notes)


def test_a_file_that_vanished_after_sampling_is_a_user_error_from_the_loader(tmp_path):
    root = make_fss(tmp_path, classes=("apple", "pear"))
    eset = build_episodes("fss", root, episodes=12)
    (root / "FSS-1000/pear/10.png").unlink()  # the query mask of episode 11 (pear/1, pear/10, ...)
    with pytest.raises(UserError, match=r"pear/10\.png: mask file not found"):
        evaluate(threshold_predict, eset, img_size=SIZE, progress=False)


def test_wrong_prediction_shape_is_reported(pascal):
    with pytest.raises(ValueError, match=r"expected the mask \(1, 48, 48\)"):
        evaluate(lambda q, s, m: np.zeros((1, 2, SIZE, SIZE)), pascal, img_size=SIZE, progress=False)


def test_fss_and_coco_run_end_to_end_with_json_output(tmp_path):
    fss = build_episodes("fss", make_fss(tmp_path / "f", classes=("a", "b")), shots=1)
    coco = build_episodes("coco", make_coco(tmp_path / "c"), shots=1, episodes=25)
    for eset in (fss, coco):
        result = evaluate(threshold_predict, eset, img_size=SIZE, batch=3, progress=True)
        d = json.loads(result.to_json())
        assert d["episodes"] == len(eset) and d["dataset"] == eset.dataset
        assert set(d["class_iou"]) <= {str(c) for c in eset.class_ids}
        assert 0 <= d["miou"] <= 100 and d["seconds"] > 0


def _vote(shot_masks) -> list:
    """The one K-shot vote (model.kshot_vote) on per-shot {0,1} masks (K, H, W), as logits (fg - bg)."""
    m = torch.tensor(np.asarray(shot_masks), dtype=torch.float32)
    return kshot_vote(torch.stack([1 - m, m], dim=1).unsqueeze(0))[0].int().tolist()


def test_the_k_shot_vote_follows_the_authors_rule():
    votes = np.array([[[1, 1, 0, 0]], [[1, 0, 1, 0]], [[1, 0, 0, 0]]])  # 3 shots, 1x4 image
    # top vote 3: pixel votes 3, 1, 1, 0 -> ratio 1, 1/3, 1/3, 0 -> only the first is >= 0.5
    assert _vote(votes) == [[1, 0, 0, 0]]
    two = np.array([[[1, 0, 0]], [[0, 1, 0]]])  # top vote 1: every voted pixel is foreground
    assert _vote(two) == [[1, 1, 0]]
    assert _vote(np.zeros((4, 1, 2))) == [[0, 0]]
    # upsampled to another size first, then the same vote (eval --original-size and predict share it)
    logits = torch.randn(3, 2, 5, 5)
    up = torch.nn.functional.interpolate(logits, size=(7, 9), mode="bilinear", align_corners=True)
    assert mask_at_size(logits.numpy(), 7, 9).tolist() == kshot_vote(up.unsqueeze(0))[0].tolist()


def test_the_k_shot_vote_matches_the_authors_flattened_maximum_on_random_votes():
    """The vote takes its image maximum per row, then over rows (one long ReduceMax was 9.5 ms on the GPU);
    the authors flatten the image and take one maximum. Same masks, including images with no vote."""
    gen = torch.Generator().manual_seed(3)
    for b, k, h, w in [(4, 5, 7, 11), (3, 2, 1, 9), (2, 3, 13, 1)]:
        fg = (torch.rand(b, k, h, w, generator=gen) < torch.rand(b, 1, 1, 1, generator=gen) * 0.4).float()
        fg[0] = 0  # an image no shot votes for
        logits = torch.stack([1 - fg, fg], dim=2)
        agg = fg.sum(dim=1)
        top = torch.maximum(agg.reshape(b, -1).max(dim=1)[0], torch.ones(b)).reshape(b, 1, 1)
        assert torch.equal(kshot_vote(logits), (agg / top >= 0.5).float())


def test_original_size_scores_logits_upsampled_to_each_query_size(pascal):
    def logits_fn(q, s, m):
        fg = torch.from_numpy(q).mean(1, keepdim=True)  # (B, 1, S, S)
        low = F.interpolate(fg, size=(12, 12), mode="bilinear", align_corners=True)
        two = torch.cat([torch.full_like(low, 0.5), low], dim=1)  # class 1 wins where the image is bright
        return two[:, None].expand(-1, s.shape[1], -1, -1, -1).numpy()  # (B, K, 2, 12, 12)

    result = evaluate(logits_fn, pascal, img_size=SIZE, original_size=True, progress=False)

    inter, union = {}, {}
    for ep in pascal.episodes:
        t = load_episode(ep, SIZE)
        low = torch.from_numpy(logits_fn(t.query_img[None].numpy(), t.support_imgs[None].numpy(), None)[0, 0])
        h, w = t.query_mask_orig.shape
        pred = F.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=True)[0].argmax(0).numpy() == 1
        gt, valid = t.query_mask_orig.numpy() > 0.5, ~t.query_ignore_orig.numpy()
        inter[ep.class_id] = inter.get(ep.class_id, 0) + (pred & gt & valid).sum()
        union[ep.class_id] = union.get(ep.class_id, 0) + ((pred | gt) & valid).sum()
    expected = {c: 100 * inter[c] / max(union[c], 1) for c in inter}
    assert result.original_size and result.class_iou == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs logits"):
        evaluate(threshold_predict, pascal, img_size=SIZE, original_size=True, progress=False)


def test_original_size_is_refused_for_fss(tmp_path):
    fss = build_episodes("fss", make_fss(tmp_path, classes=("a",)))
    with pytest.raises(UserError, match="PASCAL-5i and COCO-20i only"):
        evaluate(threshold_predict, fss, original_size=True, progress=False)
