"""Episode readers against plain re-implementations of the authors' sampling on the global legacy RNG."""

import contextlib
import glob
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from synthetic_datasets import (
    FSS_CLASSES,
    PASCAL_FOLD0_LINES,
    coco_fold_classes,
    make_coco,
    make_fss,
    make_pascal,
    write_fss_split,
)

from hsnet_deploy.data.datasets import build_episodes, coco_episodes, fss_episodes, pascal_episodes
from hsnet_deploy.data.episodes import load_episode
from hsnet_deploy.errors import UserError


@contextlib.contextmanager
def global_seed(seed: int):
    """np.random.seed(seed) as the authors' test.py does, restoring the global state afterwards."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


@pytest.fixture
def fss_root(tmp_path):
    return make_fss(tmp_path)


@pytest.fixture
def pascal_root(tmp_path):
    return make_pascal(tmp_path)


@pytest.fixture
def coco_root(tmp_path):
    return make_coco(tmp_path)


# ---------------------------------------------------------------------------------------------- FSS-1000


def authors_fss(base: str, categories: list[str], shots: int) -> list[tuple[str, list[str]]]:
    """The authors' FSS order and draws, written out plainly with path strings and np.random."""
    episodes = []
    with global_seed(0):
        for cat in sorted(categories):
            paths = sorted(glob.glob(os.path.join(base, cat) + "/*"))
            for query in [p for p in paths if os.path.basename(p).split(".")[1] == "jpg"]:
                supports = []
                while len(supports) < shots:
                    pick = np.random.choice(range(1, 11), 1, replace=False)[0]
                    candidate = os.path.join(os.path.dirname(query), str(pick)) + ".jpg"
                    if candidate != query:
                        supports.append(candidate)
                episodes.append((query, supports))
    return episodes


@pytest.mark.parametrize("shots", [1, 5])
def test_fss_episodes_match_authors_order_and_draws(fss_root, shots):
    eset = fss_episodes(fss_root, shots=shots)
    expected = authors_fss(str(fss_root / "FSS-1000"), list(FSS_CLASSES), shots)

    assert [(str(e.query_image), [str(s) for s in e.support_images]) for e in eset.episodes] == expected
    assert len(eset) == 30 and eset.shots == shots


def test_fss_queries_sorted_by_class_then_lexicographic_path(fss_root):
    eset = fss_episodes(fss_root)
    names = [(e.class_name, e.query_image.name) for e in eset.episodes]
    order = ["1", "10", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert names == [(c, f"{n}.jpg") for c in ("Boat", "apple", "zebra_fish") for n in order]
    assert all(e.query_mask == e.query_image.with_suffix(".png") for e in eset.episodes)


def test_fss_query_is_never_its_own_support_but_supports_may_repeat(fss_root):
    eset = fss_episodes(fss_root, shots=5)
    assert all(e.query_image not in e.support_images for e in eset.episodes)
    assert any(len(set(e.support_images)) < 5 for e in eset.episodes)
    assert all(s.parent == e.query_image.parent for e in eset.episodes for s in e.support_images)


def test_fss_split_file_chooses_classes_and_gives_authors_class_ids(fss_root):
    write_fss_split(fss_root, ["zebra_fish", "Boat"])  # unsorted, \r\n line ends
    eset = fss_episodes(fss_root)
    assert eset.class_ids == (760, 761)
    assert eset.class_names == {760: "Boat", 761: "zebra_fish"}
    assert {e.class_name for e in eset.episodes} == {"Boat", "zebra_fish"}
    assert {(e.class_id, e.class_name) for e in eset.episodes} == {(760, "Boat"), (761, "zebra_fish")}
    assert eset.notes == []


def test_fss_split_file_blank_lines_are_skipped(fss_root):
    """A blank line (an editor's trailing newline, a gap) names no class: it is not the dataset folder itself."""
    path = fss_root / "splits" / "fss" / "test.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"zebra_fish\r\n\r\n  \r\nBoat\r\n\r\n")
    eset = fss_episodes(fss_root)
    assert eset.class_names == {760: "Boat", 761: "zebra_fish"}


def test_fss_mask_foreground_starts_at_128(fss_root):
    """The authors' FSS reader: a mask pixel is foreground from 128 up (an antialiased edge of exactly 128 counts)."""
    eset = fss_episodes(fss_root)
    ep = eset.episodes[0]
    labels = np.zeros((10, 12), np.uint8)
    labels[:, :4], labels[:, 4:8] = 127, 128
    Image.fromarray(np.repeat(labels[..., None], 3, axis=2)).save(ep.query_mask)
    mask = load_episode(ep, 12).query_mask_orig.numpy()
    assert mask.shape == (10, 12)
    assert (mask[:, :4] == 0).all() and (mask[:, 4:8] == 1).all() and (mask[:, 8:] == 0).all()


def test_fss_without_split_file_uses_every_class_folder_and_says_so(fss_root):
    eset = fss_episodes(fss_root)
    assert eset.class_ids == (0, 1, 2)
    assert "every one of the 3 class folders" in eset.notes[0]


def test_fss_full_root_without_split_file_is_user_error(tmp_path):
    for i in range(1000):
        (tmp_path / "FSS-1000" / f"c{i:04d}").mkdir(parents=True)
    with pytest.raises(UserError, match=r"splits/fss/test\.txt: split file not found"):
        fss_episodes(tmp_path)


def test_fss_split_naming_a_missing_class_folder_is_user_error(fss_root):
    write_fss_split(fss_root, ["apple", "unicorn"])
    with pytest.raises(UserError, match=r"FSS-1000/unicorn"):
        fss_episodes(fss_root)


def test_fss_missing_support_image_is_user_error_naming_it(tmp_path):
    make_fss(tmp_path, classes=("apple",), n_images=4)  # supports are drawn from 1..10 whatever exists
    with pytest.raises(UserError, match=r"apple/\d+\.(jpg|png): file not found"):
        fss_episodes(tmp_path)


def test_fss_without_any_query_image_is_user_error_not_zero_episodes(tmp_path):
    """Images named .jpeg (not the authors' <n>.jpg) give no episode: an error, not "mIoU 0.00" from 0 episodes."""
    make_fss(tmp_path, classes=("apple", "Boat"), n_images=10)
    for jpg in (tmp_path / "FSS-1000").rglob("*.jpg"):
        jpg.rename(jpg.with_suffix(".jpeg"))
    with pytest.raises(UserError, match=r"FSS-1000: no query image in its 2 class folder\(s\).*not \.jpeg"):
        fss_episodes(tmp_path)


def test_fss_class_folder_without_images_is_named_in_a_note(tmp_path):
    make_fss(tmp_path, classes=("apple", "Boat"), n_images=10)
    (tmp_path / "FSS-1000" / "empty_class").mkdir()
    eset = fss_episodes(tmp_path)
    assert {e.class_name for e in eset.episodes} == {"apple", "Boat"}
    assert any("1 class folder(s) hold no <n>.jpg and give no episode: empty_class" in n for n in eset.notes)


def test_fss_root_given_as_the_dataset_folder_itself(fss_root):
    a = fss_episodes(fss_root)
    b = fss_episodes(fss_root / "FSS-1000")
    assert [e.support_images for e in a.episodes] == [e.support_images for e in b.episodes]


# ---------------------------------------------------------------------------------------------- PASCAL-5i


def authors_pascal(lines, n_episodes: int, shots: int) -> list[tuple[str, int, list[str]]]:
    metadata = [(line.split("__")[0], int(line.split("__")[1]) - 1) for line in lines]
    classwise = {c: [name for name, cls in metadata if cls == c] for c in range(20)}
    episodes = []
    with global_seed(0):
        for idx in range(n_episodes):
            query, cls = metadata[idx % len(metadata)]
            supports = []
            while len(supports) < shots:
                pick = np.random.choice(classwise[cls], 1, replace=False)[0]
                if pick != query:
                    supports.append(pick)
            episodes.append((query, cls, supports))
    return episodes


@pytest.mark.parametrize("shots", [1, 5])
def test_pascal_episodes_match_authors_cycling_and_draws(pascal_root, shots):
    eset = pascal_episodes(pascal_root, fold=0, shots=shots, episodes=40)
    expected = authors_pascal(PASCAL_FOLD0_LINES, 40, shots)

    got = [(e.query_image.stem, e.class_id, [s.stem for s in e.support_images]) for e in eset.episodes]
    assert got == expected
    assert [e.query_image.stem for e in eset.episodes[11:22]] == [e.query_image.stem for e in eset.episodes[:11]]
    assert all(e.fg_label == e.class_id + 1 and e.ignore_label == 255 for e in eset.episodes)


def test_pascal_and_coco_refuse_more_episodes_than_their_protocol(tmp_path):
    for build in (pascal_episodes, coco_episodes):
        with pytest.raises(UserError, match="--episodes 1001: the PASCAL-5i / COCO-20i test protocol has 1000"):
            build(tmp_path, fold=0, shots=1, episodes=1001)


def test_pascal_default_is_1000_episodes_of_the_fold_classes(pascal_root):
    eset = pascal_episodes(pascal_root, fold=0)
    assert len(eset) == 1000
    assert eset.class_ids == (0, 1, 2, 3, 4)
    assert eset.class_names[0] == "aeroplane" and eset.class_names[4] == "bottle"


def test_pascal_episode_prefix_equals_full_run_prefix(pascal_root):
    full = pascal_episodes(pascal_root, shots=2)
    short = pascal_episodes(pascal_root, shots=2, episodes=17)
    assert short.episodes == full.episodes[:17]


def test_pascal_class_with_a_single_image_is_user_error(tmp_path):
    make_pascal(tmp_path, lines=("2008_000001__01", "2008_000002__02", "2008_000003__02"))
    with pytest.raises(UserError, match="2008_000001: no other image of its class"):
        pascal_episodes(tmp_path)


def test_pascal_split_line_outside_the_fold_is_user_error(tmp_path):
    make_pascal(tmp_path, lines=("2008_000001__01", "2008_000002__07"))
    with pytest.raises(UserError, match=r"fold0\.txt:2: class 07 is not a fold-0 class"):
        pascal_episodes(tmp_path)


def test_load_episode_pascal_ignores_255_in_query_and_zeroes_it_in_supports(pascal_root):
    ep = pascal_episodes(pascal_root, shots=2, episodes=1).episodes[0]
    t = load_episode(ep, size=40)
    from hsnet_deploy.data.preprocess import load_mask, mask_to_tensor

    raw = load_mask(ep.query_mask)
    assert (raw == 255).any()
    np.testing.assert_array_equal(t.query_ignore_orig.numpy(), raw == 255)
    np.testing.assert_array_equal(t.query_mask_orig.numpy(), (raw == ep.fg_label).astype(np.float32))
    resized = mask_to_tensor(raw, 40).numpy()
    np.testing.assert_array_equal(t.query_ignore.numpy(), resized == 255)
    np.testing.assert_array_equal(t.query_mask.numpy(), (resized == ep.fg_label).astype(np.float32))
    for k, path in enumerate(ep.support_masks):
        s_raw = mask_to_tensor(load_mask(path), 40).numpy()
        np.testing.assert_array_equal(t.support_masks[k].numpy(), (s_raw == ep.fg_label).astype(np.float32))
    assert t.query_img.shape == (3, 40, 40) and t.support_imgs.shape == (2, 3, 40, 40)
    assert t.support_masks.shape == (2, 40, 40) and set(t.support_masks.unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------------- COCO-20i


def authors_coco(by_class, class_ids, n_episodes, shots):
    episodes = []
    with global_seed(0):
        for _ in range(n_episodes):
            cls = np.random.choice(class_ids, 1, replace=False)[0]
            query = np.random.choice(by_class[cls], 1, replace=False)[0]
            supports = []
            while len(supports) < shots:
                pick = np.random.choice(by_class[cls], 1, replace=False)[0]
                if pick != query:
                    supports.append(pick)
            episodes.append((int(cls), str(query), [str(s) for s in supports]))
    return episodes


@pytest.mark.parametrize("shots", [1, 3])
def test_coco_draws_class_then_query_then_each_support_like_the_authors(coco_root, shots):
    by_class = pickle.loads((coco_root / "splits/coco/val/fold0.pkl").read_bytes())
    eset = coco_episodes(coco_root, fold=0, shots=shots, episodes=60)
    expected = authors_coco(by_class, coco_fold_classes(0), 60, shots)

    base = coco_root / "COCO2014"
    got = [
        (e.class_id, str(e.query_image.relative_to(base)), [str(s.relative_to(base)) for s in e.support_images])
        for e in eset.episodes
    ]
    assert got == expected
    ep = eset.episodes[0]
    assert ep.query_mask == base / "annotations" / ep.query_image.relative_to(base).with_suffix(".png")
    assert eset.class_ids == tuple(range(0, 80, 4)) and ep.fg_label == ep.class_id + 1 and ep.ignore_label is None


def test_coco_fold_two_uses_interleaved_classes(tmp_path):
    make_coco(tmp_path, fold=2)
    eset = coco_episodes(tmp_path, fold=2, episodes=50)
    assert eset.class_ids == tuple(2 + 4 * v for v in range(20))
    assert {e.class_id for e in eset.episodes} <= set(eset.class_ids)


def test_coco_split_pickle_that_would_run_code_is_refused(coco_root):
    (coco_root / "splits/coco/val/fold0.pkl").write_bytes(pickle.dumps({0: [os.getcwd]}))
    with pytest.raises(UserError, match=r"fold0\.pkl: not a readable split file"):
        coco_episodes(coco_root)


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("dataset", "make", "remove", "expected"),
    [
        ("fss", None, None, r"FSS-1000: not found"),
        ("pascal", make_pascal, "VOC2012/SegmentationClassAug", r"VOC2012/SegmentationClassAug: not found"),
        ("pascal", make_pascal, "splits/pascal/val/fold0.txt", r"splits/pascal/val/fold0\.txt: split file not found"),
        ("coco", make_coco, "splits/coco/val/fold0.pkl", r"splits/coco/val/fold0\.pkl: split file not found"),
        ("coco", make_coco, "COCO2014/annotations", r"COCO2014/annotations: not found"),
        ("coco", None, None, r"COCO2014: not found"),
    ],
)
def test_wrong_layout_is_user_error_naming_the_expected_path(tmp_path, dataset, make, remove, expected):
    import shutil

    if make is not None:
        make(tmp_path)
        target = tmp_path / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(UserError, match=expected):
        build_episodes(dataset, tmp_path)


def test_explicit_splits_dir_is_used_and_checked(pascal_root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("splits")
    (pascal_root / "splits").rename(elsewhere / "splits")
    eset = build_episodes("pascal", pascal_root, splits_dir=elsewhere / "splits", episodes=5)
    assert len(eset) == 5
    with pytest.raises(UserError, match="nowhere: splits directory not found"):
        build_episodes("pascal", pascal_root, splits_dir=elsewhere / "nowhere")


def test_bad_arguments_are_user_errors(pascal_root):
    with pytest.raises(UserError, match="--fold 4"):
        build_episodes("pascal", pascal_root, fold=4)
    with pytest.raises(UserError, match="--shots 0"):
        build_episodes("pascal", pascal_root, shots=0)
    with pytest.raises(UserError, match="'voc'"):
        build_episodes("voc", pascal_root)


def test_missing_data_file_is_found_before_the_run(pascal_root):
    (pascal_root / "VOC2012/JPEGImages/2008_000006.jpg").unlink()
    with pytest.raises(UserError, match=r"2008_000006\.jpg: file not found"):
        pascal_episodes(pascal_root, episodes=12)


def test_a_split_file_that_is_not_utf8_is_an_error_and_a_windows_bom_is_read(tmp_path):
    """A split file of other bytes was an internal error (UnicodeDecodeError); one saved by a Windows editor (UTF-16
    with its byte-order mark, or UTF-8 with one) reads as the same lines."""
    root = make_pascal(tmp_path / "data")
    split = root / "splits" / "pascal" / "val" / "fold0.txt"
    expected = build_episodes("pascal", root, fold=0, shots=1)
    text = split.read_text()
    for encoded in (b"\xef\xbb\xbf" + text.encode("utf-8"), text.encode("utf-16"), text.encode("utf-16-be")):
        if encoded[:2] not in (b"\xff\xfe", b"\xfe\xff", b"\xef\xbb"):
            encoded = b"\xfe\xff" + encoded  # utf-16-be has no BOM of its own: add it
        split.write_bytes(encoded)
        got = build_episodes("pascal", root, fold=0, shots=1)
        assert got.episodes == expected.episodes and len(got.episodes) > 0
    split.write_bytes(b"\x98\x00\xc3" + text.encode("utf-8"))
    with pytest.raises(UserError, match="fold0.txt: not a readable split file .not UTF-8 text: byte 0"):
        build_episodes("pascal", root, fold=0, shots=1)


# ---------------------------------------------------------------------------------------------- folds, limits, seeds


def test_pascal_fold_two_tests_classes_11_to_15(tmp_path):
    """Authors' data/pascal.py: nclass_trn = 20 // 4 = 5, fold f tests the 0-based classes 5f .. 5f+4, so the label
    values (class + 1) of fold 2 are 11..15: 'diningtable' .. 'person'."""
    lines = ("2008_000001__11", "2008_000002__11", "2008_000003__15", "2008_000004__15")
    make_pascal(tmp_path, lines=lines, fold=2)
    eset = pascal_episodes(tmp_path, fold=2, episodes=4)
    assert eset.class_ids == (10, 11, 12, 13, 14)
    assert eset.class_names[10] == "diningtable" and eset.class_names[14] == "person"
    assert [(e.class_id, e.fg_label) for e in eset.episodes] == [(10, 11), (10, 11), (14, 15), (14, 15)]
    make_pascal(tmp_path / "other", lines=("2008_000001__09", "2008_000002__09"), fold=2)  # class 9 is fold 1's
    with pytest.raises(UserError, match="class 09 is not a fold-2 class"):
        pascal_episodes(tmp_path / "other", fold=2)


def test_coco_class_listing_one_image_twice_is_refused_before_sampling(coco_root):
    """A class whose list holds one image twice has no support for it: refused up front, even when the episodes
    asked for would not draw that class."""
    split = coco_root / "splits/coco/val/fold0.pkl"
    by_class = pickle.loads(split.read_bytes())
    by_class[76] = [by_class[76][0], by_class[76][0]]
    split.write_bytes(pickle.dumps(by_class))
    with pytest.raises(UserError, match=r"class 76 \(.*\) needs at least 2 images, has 1"):
        coco_episodes(coco_root, episodes=1)


def test_fss_more_episodes_than_query_images_is_user_error(fss_root):
    total = len(FSS_CLASSES) * 10  # make_fss: 10 <n>.jpg per class
    assert len(fss_episodes(fss_root, episodes=total)) == total
    with pytest.raises(UserError, match=f"--episodes {total + 1}: FSS-1000 test has {total} query images"):
        fss_episodes(fss_root, episodes=total + 1)


def test_build_episodes_passes_the_seed_to_every_reader(fss_root, tmp_path):
    """`--seed` reaches the FSS reader too: its draws are the authors' with np.random.seed(seed)."""
    base = str(fss_root / "FSS-1000")
    with global_seed(7):
        want = [int(np.random.choice(range(1, 11), 1, replace=False)[0]) for _ in range(40)]
    got = build_episodes("fss", fss_root, seed=7, episodes=5)
    picks = iter(want)
    for ep in got.episodes:  # redraw while the pick is the query, as the authors do
        pick = next(picks)
        while f"{pick}.jpg" == ep.query_image.name:
            pick = next(picks)
        assert ep.support_images == (ep.query_image.parent / f"{pick}.jpg",)
    assert str(got.episodes[0].query_image).startswith(base)
    assert got.episodes != build_episodes("fss", fss_root, seed=0, episodes=5).episodes


def test_load_episode_fss_reads_support_masks_by_luminance_like_the_query(fss_root):
    """The authors' FSS reader reads every mask through .convert('L'): a palette support mask whose index 1 is white is
    foreground by its colour, not background by its index."""
    ep = fss_episodes(fss_root, episodes=1).episodes[0]
    path = ep.support_masks[0]
    fg = np.asarray(Image.open(path).convert("L")) >= 128
    pal = Image.fromarray(fg.astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    pal.save(path)
    t = load_episode(ep, size=24)
    from hsnet_deploy.data.preprocess import mask_to_tensor

    assert fg.any()
    np.testing.assert_array_equal(t.support_masks[0].numpy(), mask_to_tensor(fg.astype(np.float32), 24).numpy())


def test_fss_names_with_more_dots_follow_the_authors_second_part_rule(fss_root):
    """'<n>.jpg.orig' is a query (its second dot-separated part is 'jpg') with mask <n>.png; 'v2.old.jpg' is not."""
    import shutil

    cls = fss_root / "FSS-1000" / "apple"
    shutil.copy(cls / "3.jpg", cls / "3.jpg.orig")
    shutil.copy(cls / "4.jpg", cls / "v2.old.jpg")
    eset = fss_episodes(fss_root, shots=1)
    expected = authors_fss(str(fss_root / "FSS-1000"), list(FSS_CLASSES), 1)
    assert [(str(e.query_image), [str(s) for s in e.support_images]) for e in eset.episodes] == expected
    odd = [e for e in eset.episodes if e.query_image.name == "3.jpg.orig"]
    assert len(odd) == 1 and odd[0].query_mask == cls / "3.png"
    assert not any(e.query_image.name == "v2.old.jpg" for e in eset.episodes)
