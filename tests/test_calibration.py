"""Calibration episodes and the gate's metrics: fast tests, no model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from synthetic_datasets import make_fss, make_pascal

from hsnet_deploy.calibration.episodes import detect_layout, load_sample, one_shot_feeds, split_episodes
from hsnet_deploy.calibration.gate import GateReport, GateThresholds, mask_iou, sign_agreement
from hsnet_deploy.calibration.synthetic import write_simple_layout
from hsnet_deploy.errors import UserError


@pytest.fixture
def simple_dir(tmp_path):
    write_simple_layout(tmp_path / "calib", episodes=12, size=40, shots=2, seed=1)
    return tmp_path / "calib"


def test_calibration_and_gate_sets_share_no_episode_and_no_query(simple_dir):
    split = split_episodes(simple_dir, calib_episodes=5, gate_episodes=6, seed=0)
    assert split.layout == "simple" and len(split.calib) == 5 and len(split.gate) == 6
    calib_queries = {ep.query_image for ep in split.calib}
    gate_queries = {ep.query_image for ep in split.gate}
    assert not calib_queries & gate_queries
    assert not {ep.name for ep in split.calib} & {ep.name for ep in split.gate}
    assert split.has_ground_truth


def test_episode_split_is_seeded(simple_dir):
    names = lambda s: [ep.name for ep in s.calib + s.gate]
    assert names(split_episodes(simple_dir, 4, 4, seed=3)) == names(split_episodes(simple_dir, 4, 4, seed=3))
    assert names(split_episodes(simple_dir, 4, 4, seed=3)) != names(split_episodes(simple_dir, 4, 4, seed=4))


def test_simple_layout_sample_has_all_shots_and_ground_truth(simple_dir):
    split = split_episodes(simple_dir, 1, 1, seed=0)
    sample = load_sample(split.gate[0], 32)
    assert sample.feed["query_img"].shape == (1, 3, 32, 32)
    assert sample.feed["support_imgs"].shape == (1, 2, 3, 32, 32)
    assert sample.feed["support_masks"].shape == (1, 2, 32, 32)
    assert set(np.unique(sample.feed["support_masks"])) <= {0.0, 1.0}
    assert sample.query_mask is not None and sample.query_mask.shape == (32, 32)
    feeds = one_shot_feeds(sample)
    assert len(feeds) == 2 and feeds[1]["support_imgs"].shape == (1, 1, 3, 32, 32)
    np.testing.assert_array_equal(feeds[1]["support_masks"][0, 0], sample.feed["support_masks"][0, 1])


def test_fss_layout_is_read_with_the_authors_reader(tmp_path):
    make_fss(tmp_path)
    assert detect_layout(tmp_path) == "fss"
    split = split_episodes(tmp_path, calib_episodes=10, gate_episodes=10, seed=0)
    assert not {e.query_image for e in split.calib} & {e.query_image for e in split.gate}
    sample = load_sample(split.gate[0], 32)
    assert sample.query_mask is not None and split.has_ground_truth


def test_pascal_layout_dedupes_repeated_queries(tmp_path):
    make_pascal(tmp_path)
    split = split_episodes(tmp_path, calib_episodes=4, gate_episodes=4, seed=0)
    assert split.layout == "pascal"
    assert split.available <= 11  # the split file lists 11 (image, class) entries; 1000 episodes cycle them
    assert not {e.query_image for e in split.calib} & {e.query_image for e in split.gate}


def test_empty_directory_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no calibration episodes"):
        split_episodes(tmp_path / "empty", 1, 1)
    with pytest.raises(UserError, match="not found"):
        split_episodes(tmp_path / "missing", 1, 1)


def test_too_few_episodes_is_a_user_error(simple_dir):
    with pytest.raises(UserError, match="fewer than the 20 needed"):
        split_episodes(simple_dir, 10, 10)
    with pytest.raises(UserError, match="--calib-episodes 0"):
        split_episodes(simple_dir, 0, 1)


def test_support_without_mask_is_a_user_error(simple_dir):
    (simple_dir / "episode0003" / "support2_mask.png").unlink()
    with pytest.raises(UserError, match="support2.png: support image without its mask"):
        split_episodes(simple_dir, 1, 1)


def test_mask_of_another_size_is_a_user_error(simple_dir):
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(simple_dir / "episode0005" / "support1_mask.png")
    with pytest.raises(UserError, match=r"support1_mask.png: mask is 12x10 but its image support1.png is 40x40"):
        split_episodes(simple_dir, 11, 1)


def test_phone_photos_in_a_calibration_folder_are_read_as_predict_reads_them(tmp_path):
    """A support photo stored 40x30 with EXIF orientation 6 is 30x40 as shown: its mask fits drawn as shown or on
    the stored pixels (both give the same support mask), and the photo reaches the model turned."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.random.default_rng(3).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    on_stored = np.zeros((30, 40), np.uint8)
    on_stored[:, :12] = 255
    samples = []
    for name, mask in (("shown", np.rot90(on_stored, k=-1)), ("stored", on_stored)):
        for episode in ("episode0", "episode1"):  # one for calibration, one for the gate
            folder = tmp_path / name / episode
            folder.mkdir(parents=True)
            Image.fromarray(stored).save(folder / "query.jpg", exif=exif.tobytes(), quality=100)
            Image.fromarray(stored).save(folder / "support1.jpg", exif=exif.tobytes(), quality=100)
            Image.fromarray(np.ascontiguousarray(mask)).save(folder / "support1_mask.png")
        split = split_episodes(tmp_path / name, calib_episodes=1, gate_episodes=1, seed=0)
        samples.append(load_sample(split.calib[0], 32))
    np.testing.assert_array_equal(samples[0].feed["support_masks"], samples[1].feed["support_masks"])
    turned = np.rot90(np.asarray(Image.open(tmp_path / "shown" / "episode0" / "query.jpg")), k=-1)
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(turned)).resize((32, 32), Image.BILINEAR), np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_allclose(samples[0].feed["query_img"][0], ((expected / 255 - mean) / std).transpose(2, 0, 1),
                               atol=1e-5)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "shown" / "episode0" / "support1_mask.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "shown" / "episode1" / "support1_mask.png")
    with pytest.raises(UserError, match=r"support1_mask.png: mask is 20x20 but its image support1.jpg is 30x40"):
        split_episodes(tmp_path / "shown", calib_episodes=1, gate_episodes=1, seed=0)


def test_episode_folders_are_found_in_any_case_and_a_broken_one_is_named(simple_dir):
    """`query.Jpg` is a query (it used to drop its folder without a word); a folder of episode files with no query
    image Pillow's readers take here (`query.tif`), or with a gap in its support numbers, is an error naming it."""
    folder = simple_dir / "episode0004"
    query = next(folder.glob("query.*"))
    query.rename(folder / "query.Jpg")
    assert "episode0004" in [ep.label for ep in split_episodes(simple_dir, 11, 1).calib + split_episodes(
        simple_dir, 11, 1).gate]
    (folder / "query.Jpg").rename(folder / "query.tif")
    with pytest.raises(UserError, match="episode0004: episode folder without a query image"):
        split_episodes(simple_dir, 11, 1)
    (folder / "query.tif").rename(folder / "query.png")
    for name in ("support2.png", "support2_mask.png"):
        (folder / name).rename(folder / name.replace("2", "3"))
    with pytest.raises(UserError, match="support3.png: support2 is missing before it"):
        split_episodes(simple_dir, 11, 1)
    for name in ("support3.png", "support3_mask.png"):  # a gap of two (3 and 4): support5 was silently dropped
        (folder / name).rename(folder / name.replace("3", "2"))
    for name in ("support2.png", "support2_mask.png"):
        (folder / name.replace("2", "5")).write_bytes((folder / name).read_bytes())
    with pytest.raises(UserError, match="support5.png: support3 is missing before it"):
        split_episodes(simple_dir, 11, 1)
    for name in ("support5.png", "support5_mask.png"):  # not a support number: ignored, not a crash
        (folder / name).rename(folder / name.replace("5", "\u00b2"))
    assert len(split_episodes(simple_dir, 11, 1).calib) == 11


def test_mask_iou_and_sign_agreement_by_hand():
    a = np.array([[1, 1], [0, 0]], dtype=np.float32)
    b = np.array([[1, 0], [1, 0]], dtype=np.float32)
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    ref = np.zeros((2, 2, 2), dtype=np.float32)  # (2 classes, H, W): margin = fg - bg
    ref[1] = [[3.0, -1.0], [0.5, -0.5]]
    var = ref.copy()
    var[1, 0, 1] = 1.0  # flips the pixel whose |margin| is 1 of a total 5
    assert sign_agreement(ref, var) == pytest.approx(4 / 5)


def test_gate_report_names_each_failed_threshold():
    from hsnet_deploy.calibration.gate import EpisodeGate

    report = GateReport("int8", GateThresholds(min_mean_agreement=0.9, min_sign_agreement=0.99, max_miou_drop=1.0))
    report.episodes = [EpisodeGate("a", 0.8, 0.999, 0.01, 0.5)]
    report.miou_fp32, report.miou_variant = 60.0, 58.5
    fails = report.failures()
    assert len(fails) == 2 and "mean mask agreement 0.8000" in fails[0] and "mIoU drop 1.5000" in fails[1]
    assert report.to_dict()["passed"] is False


def test_gate_report_aggregates_its_episodes_as_the_thresholds_read_them():
    """Mean and worst agreement, mean sign agreement and the largest logit error, against plain arithmetic."""
    from hsnet_deploy.calibration.gate import EpisodeGate

    agreements, signs, errors = [0.9, 0.7, 1.0], [1.0, 0.99, 0.995], [0.01, 0.05, 0.02]
    report = GateReport("int8", GateThresholds(min_mean_agreement=0.8, min_worst_agreement=0.75,
                                               min_sign_agreement=0.99, max_logit_error=0.04))
    report.episodes = [EpisodeGate(str(i), a, s, e, 0.5) for i, (a, s, e) in enumerate(zip(agreements, signs, errors))]
    assert report.mean_agreement == pytest.approx(sum(agreements) / 3)
    assert report.worst_agreement == 0.7 and report.logit_error == 0.05
    assert report.sign_agreement == pytest.approx(sum(signs) / 3)
    fails = report.failures()
    assert len(fails) == 2 and "worst mask agreement 0.7000" in fails[0] and "logit error 0.0500" in fails[1]


def test_gate_logit_error_is_relative_to_the_largest_fp32_logit():
    """max |variant - FP32| / max |FP32|, as export's verification: the same for logits 100 times larger."""
    from hsnet_deploy.calibration.gate import compare_outputs

    rng = np.random.default_rng(0)
    ref_logits = rng.normal(size=(1, 1, 2, 8, 8)).astype(np.float32)
    var_logits = ref_logits + rng.normal(scale=1e-2, size=ref_logits.shape).astype(np.float32)
    mask = (ref_logits[:, 0, 1] > ref_logits[:, 0, 0]).astype(np.float32)
    expected = np.abs(var_logits - ref_logits).max() / np.abs(ref_logits).max()
    for scale in (1.0, 100.0):
        gate = compare_outputs("e", {"logits": ref_logits * scale, "mask": mask},
                               {"logits": var_logits * scale, "mask": mask})
        assert gate.logit_error == pytest.approx(expected, rel=1e-5)


def test_importing_the_package_leaves_heavy_quantisers_alone():
    code = ("import sys, hsnet_deploy, hsnet_deploy.calibration, hsnet_deploy.calibration.variant; "
            "print(any(m.split('.')[0] in ('modelopt', 'onnxconverter_common') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_default_thresholds_follow_ground_truth():
    with_gt = GateThresholds.defaults(True)  # ground truth adds the mIoU check; agreement still applies
    assert with_gt.max_miou_drop == 1.0 and with_gt.min_mean_agreement == 0.95 and with_gt.min_sign_agreement == 0.999
    assert not with_gt.miou_required and GateThresholds.defaults(True, max_miou_drop=0.5).miou_required
    without = GateThresholds.defaults(False, max_miou_drop=0.5)
    assert without.min_mean_agreement == 0.95 and without.min_sign_agreement == 0.999
    assert without.max_miou_drop == 0.5
    with pytest.raises(TypeError):
        GateThresholds.defaults(True, min_agreement=0.9)


def test_fp16_split_gates_on_the_int8_gate_episodes_and_needs_only_those(simple_dir):
    int8 = split_episodes(simple_dir, 5, 4, seed=2)
    fp16 = split_episodes(simple_dir, 5, 4, seed=2, calibrate=False)
    assert [e.name for e in fp16.gate] == [e.name for e in int8.gate]
    small = split_episodes(simple_dir, 32, 10, seed=2, calibrate=False)  # 12 episodes: the gate's 10 fit
    assert len(small.gate) == 10 and small.calib == [] and small.info()["calib_episodes"] == 0  # FP16 draws none
    # The gate depends on the seed and its own count only: an INT8 run calibrating on 1 episode of the small
    # pool gates on the FP16 variant's 10 (calibration used to come first and shift the gate's draw).
    assert [e.name for e in split_episodes(simple_dir, 1, 10, seed=2).gate] == [e.name for e in small.gate]


def test_every_simple_folder_is_checked_whatever_the_seed_draws(simple_dir):
    """A wrong mask in a folder that neither set draws is still named: the result must not depend on the seed."""
    drawn = split_episodes(simple_dir, 1, 1, seed=0)
    used = {ep.query_image.parent.name for ep in [*drawn.calib, *drawn.gate]}
    unused = next(f for f in sorted(p.name for p in simple_dir.iterdir()) if f not in used)
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(simple_dir / unused / "query_mask.png")
    with pytest.raises(UserError, match=rf"{unused}.query_mask.png: mask is 12x10"):
        split_episodes(simple_dir, 1, 1, seed=0)


def test_one_episode_type_reads_user_masks_as_predict_does(tmp_path):
    """Calibration episodes are data.episodes.Episode; the simple layout's masks are read by predict's
    own reader (0/255 grey here), and an episode without query_mask has no ground truth."""
    from hsnet_deploy.data.episodes import Episode, load_episode
    from hsnet_deploy.data.preprocess import image_to_tensor, load_binary_mask, load_image, mask_to_tensor

    write_simple_layout(tmp_path / "c", episodes=3, size=40, shots=1, seed=2)
    split = split_episodes(tmp_path / "c", 1, 2, seed=0)
    ep = split.gate[0]
    assert type(ep) is Episode and ep.user_masks and ep.name == ep.query_image.parent.name
    sample = load_sample(ep, 32)
    expected = mask_to_tensor(load_binary_mask(ep.support_masks[0]), 32).numpy()
    np.testing.assert_array_equal(sample.feed["support_masks"][0, 0], expected)
    np.testing.assert_array_equal(sample.feed["query_img"][0], image_to_tensor(load_image(ep.query_image), 32).numpy())
    no_truth = Episode(0, 0, "episode", ep.query_image, None, ep.support_images, ep.support_masks, user_masks=True)
    tensors = load_episode(no_truth, 32)
    assert tensors.query_mask is None and tensors.query_mask_orig is None
    assert load_sample(no_truth, 32).query_mask is None


def test_benchmark_episode_digest_keeps_its_old_fields(tmp_path):
    """The fields added for user layouts stay out of a benchmark episode's dict, so an eval state saved
    before them still resumes (its fingerprint hashes these dicts)."""
    from hsnet_deploy.data.episodes import Episode

    ep = Episode(3, 1, "cat", tmp_path / "q.jpg", tmp_path / "q.png", (tmp_path / "s.jpg",), (tmp_path / "s.png",), 2)
    assert set(ep.to_dict()) == {"index", "class_id", "class_name", "query_image", "query_mask", "support_images",
                                 "support_masks", "fg_label", "ignore_label"}
    assert ep.name == "cat/q.jpg#3"


def test_a_zero_padded_support_number_is_named_not_dropped(simple_dir):
    """support02.png is not support2: it is a support the reader would not take, so the folder is an error."""
    folder = simple_dir / "episode0004"
    for name in ("support2.png", "support2_mask.png"):
        (folder / name).rename(folder / name.replace("2", "02"))
    with pytest.raises(UserError, match=r"support02.png: write support numbers without leading zeros \(support2\)"):
        split_episodes(simple_dir, 11, 1)
    for name in ("support02.png", "support02_mask.png"):  # a real gap is named as one
        (folder / name).rename(folder / name.replace("02", "3"))
    with pytest.raises(UserError, match="support3.png: support2 is missing before it"):
        split_episodes(simple_dir, 11, 1)


def test_fp16_split_takes_zero_calibration_episodes(simple_dir):
    """FP16 calibrates nothing: --calib-episodes 0 is fine there (INT8 refuses it)."""
    split = split_episodes(simple_dir, 0, 3, seed=1, calibrate=False)
    assert len(split.gate) == 3 and split.calib == []
    with pytest.raises(UserError, match="--calib-episodes 0"):
        split_episodes(simple_dir, 0, 3, seed=1)


def test_repeated_queries_keep_their_first_episode(tmp_path):
    """PASCAL's episode list cycles its queries: the first episode of each query is the one kept."""
    from hsnet_deploy.calibration.episodes import benchmark_episodes

    make_pascal(tmp_path)
    pool = benchmark_episodes("pascal", tmp_path, 0, 0)
    first = {}
    for ep in pool:
        first.setdefault(ep.query_image, ep)
    assert len(first) < len(pool)  # the list does repeat queries
    split = split_episodes(tmp_path, calib_episodes=4, gate_episodes=4, seed=0)
    for ep in [*split.calib, *split.gate]:
        assert ep.to_dict() == first[ep.query_image].to_dict()


def test_a_transposed_photo_takes_a_mask_drawn_on_its_stored_pixels(tmp_path):
    """EXIF orientation 5 (transpose) turns the photo by 90 degrees like 6-8: a mask of the stored size fits."""
    exif = Image.Exif()
    exif[0x0112] = 5
    stored = np.random.default_rng(4).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), np.uint8)
    mask[:, :12] = 255
    for episode in ("episode0", "episode1"):
        folder = tmp_path / episode
        folder.mkdir()
        Image.fromarray(stored).save(folder / "query.jpg", exif=exif.tobytes(), quality=100)
        Image.fromarray(stored).save(folder / "support1.jpg", exif=exif.tobytes(), quality=100)
        Image.fromarray(mask).save(folder / "support1_mask.png")
    split = split_episodes(tmp_path, calib_episodes=1, gate_episodes=1, seed=0)
    assert len(split.calib) == len(split.gate) == 1


def test_a_user_episode_ignores_no_query_pixel(tmp_path):
    """A person's own query mask has no ignore label: every pixel, background included, counts in the IoU."""
    from hsnet_deploy.data.episodes import load_episode
    from hsnet_deploy.data.preprocess import load_binary_mask

    write_simple_layout(tmp_path / "c", episodes=3, size=40, shots=1, seed=2)
    ep = split_episodes(tmp_path / "c", 1, 2, seed=0).gate[0]
    t = load_episode(ep, 32)
    truth = load_binary_mask(ep.query_mask, require_foreground=False)
    assert (truth == 0).any()
    np.testing.assert_array_equal(t.query_mask_orig.numpy(), truth)
    assert str(t.query_ignore_orig.dtype) == "torch.bool"
    assert not t.query_ignore_orig.any()
    assert t.query_ignore.shape == (32, 32) and not t.query_ignore.any()
