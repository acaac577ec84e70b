import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hsnet_deploy.data.preprocess import (
    binary_mask,
    fit_mask_to_image,
    image_to_tensor,
    load_binary_mask,
    load_image,
    load_mask,
    mask_to_tensor,
    original_size,
)
from hsnet_deploy.errors import UserError


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8))


def test_image_to_tensor_matches_numpy_normalisation_of_pil_bilinear_resize(photo):
    resized = np.asarray(photo.resize((400, 400), resample=Image.Resampling.BILINEAR)).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    expected = ((resized / np.float32(255) - mean) / std).transpose(2, 0, 1)

    out = image_to_tensor(photo)

    assert out.dtype == torch.float32 and out.shape == (3, 400, 400)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_image_to_tensor_is_bit_identical_to_torchvision_totensor_normalize(photo):
    # torchvision's ToTensor + Normalize, transcribed: uint8 HWC -> CHW float32 / 255, then sub_ / div_.
    arr = np.asarray(photo.resize((400, 400), Image.Resampling.BILINEAR))
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous().float().div(255)
    x.sub_(torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)).div_(torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    assert torch.equal(image_to_tensor(photo), x)


def test_image_to_tensor_is_not_the_float_interpolate_path():
    # Downscaling is where PIL's antialiasing differs from F.interpolate on a float tensor.
    rng = np.random.default_rng(2)
    big = Image.fromarray(rng.integers(0, 256, size=(900, 700, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(big).copy()).permute(2, 0, 1)[None].float() / 255
    via_float = F.interpolate(x, size=(400, 400), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert (image_to_tensor(big) - (via_float - mean) / std).abs().max() > 0.1


def test_image_to_tensor_other_size_and_grey_input():
    grey = Image.fromarray(np.full((5, 7), 128, dtype=np.uint8))
    out = image_to_tensor(grey, size=64)
    assert out.shape == (3, 64, 64)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), (128 / 255 - np.array([0.485, 0.456, 0.406])) /
                               np.array([0.229, 0.224, 0.225]), atol=1e-6)


def _legacy_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch's legacy nearest source index: floor(dst * (in / out)) in float32, clamped to in - 1."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


@pytest.mark.parametrize("shape", [(375, 500), (333, 241), (224, 224), (7, 3), (400, 400), (1000, 801)])
def test_mask_to_tensor_matches_floor_index_nearest(shape):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    expected = labels[np.ix_(_legacy_nearest_index(shape[0], 400), _legacy_nearest_index(shape[1], 400))]

    out = mask_to_tensor(labels)

    assert out.dtype == torch.float32 and out.shape == (400, 400)
    np.testing.assert_array_equal(out.numpy(), expected.astype(np.float32))
    direct = F.interpolate(torch.from_numpy(labels).float()[None, None], size=(400, 400), mode="nearest")[0, 0]
    assert torch.equal(out, direct)


def test_mask_to_tensor_keeps_labels_and_other_sizes():
    labels = np.array([[0, 255], [3, 7]], dtype=np.uint8)
    assert mask_to_tensor(labels, size=4).tolist() == [[0, 0, 255, 255], [0, 0, 255, 255], [3, 3, 7, 7], [3, 3, 7, 7]]


def test_mask_to_tensor_is_not_pil_nearest():
    labels = np.arange(375 * 500, dtype=np.int64).reshape(375, 500) % 251
    pil = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((400, 400), Image.Resampling.NEAREST))
    assert not np.array_equal(mask_to_tensor(labels.astype(np.uint8)).numpy(), pil.astype(np.float32))


def _save(tmp_path, name, img: Image.Image):
    path = tmp_path / name
    img.save(path)
    return path


def test_load_mask_returns_raw_labels_for_grey_palette_and_one_bit(tmp_path):
    labels = np.array([[0, 1, 15], [255, 3, 0]], dtype=np.uint8)
    grey = _save(tmp_path, "grey.png", Image.fromarray(labels))
    pal_img = Image.fromarray(labels, mode="P")
    pal_img.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 3 % 256, 255 - i)])
    pal = _save(tmp_path, "pal.png", pal_img)
    one_bit = _save(tmp_path, "bit.png", Image.fromarray(labels > 1))
    rgb_grey = _save(tmp_path, "rgb.png", Image.fromarray(np.repeat(labels[..., None], 3, axis=2)))

    np.testing.assert_array_equal(load_mask(grey), labels)
    np.testing.assert_array_equal(load_mask(pal), labels)
    np.testing.assert_array_equal(load_mask(one_bit), (labels > 1).astype(np.uint8))
    np.testing.assert_array_equal(load_mask(rgb_grey), labels)
    assert load_mask(grey).dtype == np.uint8


def test_load_mask_palette_indices_are_not_colours(tmp_path):
    idx = np.array([[0, 2], [1, 2]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (253 * 3))
    path = _save(tmp_path, "voc.png", img)
    np.testing.assert_array_equal(load_mask(path), idx)
    # The FSS rule (.convert('L')) reads the palette colours' luminance instead.
    np.testing.assert_array_equal(load_mask(path, luminance=True), np.asarray(img.convert("L")))


def test_load_mask_refuses_colour_masks(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    path = _save(tmp_path, "colour.png", Image.fromarray(rgb))
    with pytest.raises(UserError, match="colour.png"):
        load_mask(path)


def test_binary_mask_rules_for_user_masks():
    np.testing.assert_array_equal(binary_mask(np.array([[0, 1]], np.uint8)), [[False, True]])
    np.testing.assert_array_equal(binary_mask(np.array([[0, 127, 128, 255]], np.uint8)), [[False, False, True, True]])
    np.testing.assert_array_equal(binary_mask(np.array([[0, 3, 255]], np.uint8), palette=True), [[False, True, False]])
    with pytest.raises(UserError, match="up to 20"):
        binary_mask(np.array([[0, 20]], np.uint8))


def test_load_binary_mask_reads_palette_and_grey_and_refuses_empty(tmp_path):
    idx = np.array([[0, 7], [255, 7]], dtype=np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0] * 256)
    assert load_binary_mask(_save(tmp_path, "p.png", pal)).tolist() == [[0.0, 1.0], [0.0, 1.0]]
    grey = _save(tmp_path, "g.png", Image.fromarray(np.array([[0, 255], [200, 10]], np.uint8)))
    out = load_binary_mask(grey)
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    empty = _save(tmp_path, "empty.png", Image.fromarray(np.zeros((3, 3), np.uint8)))
    with pytest.raises(UserError, match="empty.png: mask has no foreground"):
        load_binary_mask(empty)
    labels = _save(tmp_path, "labels.png", Image.fromarray(np.array([[0, 12]], np.uint8)))
    with pytest.raises(UserError, match="labels.png"):
        load_binary_mask(labels)


def test_missing_or_corrupt_files_are_user_errors_naming_the_path(tmp_path):
    with pytest.raises(UserError, match="nothing.jpg: image file not found"):
        load_image(tmp_path / "nothing.jpg")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png: cannot read mask"):
        load_mask(bad)
    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match="cut.jpg"):
        load_image(truncated)


def test_load_image_converts_to_rgb(tmp_path):
    path = _save(tmp_path, "grey.png", Image.fromarray(np.full((3, 4), 9, np.uint8)))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (4, 3)


def test_deep_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit grey PNG used to become white (`convert('RGB')` clips at 255): now it reads as the 8-bit image it
    encodes (value * 257), and the 32-bit modes by their values' range."""
    eight = np.random.default_rng(2).integers(0, 256, size=(9, 13), dtype=np.uint8)
    sixteen = _save(tmp_path, "g16.png", Image.fromarray(eight.astype(np.uint16) * 257))
    assert Image.open(sixteen).mode == "I;16"
    expected = np.repeat(eight[..., None], 3, axis=2)
    np.testing.assert_array_equal(np.asarray(load_image(sixteen)), expected)
    unit_float = _save(tmp_path, "f01.tiff", Image.fromarray(eight.astype(np.float32) / 255))
    np.testing.assert_array_equal(np.asarray(load_image(unit_float)), expected)
    byte_float = _save(tmp_path, "f255.tiff", Image.fromarray(eight.astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(load_image(byte_float)), expected)
    wild = _save(tmp_path, "wild.tiff", Image.fromarray(np.full((4, 4), -3.0, np.float32)))
    with pytest.raises(UserError, match=r"wild.tiff: image values range -3\.\.-3"):
        load_image(wild)


def _exif_jpeg(tmp_path, name: str, pixels: np.ndarray, orientation: int):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / name
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=100, subsampling=0)
    return path


def test_photos_are_turned_by_their_exif_orientation_only_when_asked(tmp_path):
    """Orientation 6 (a phone held upright) is shown turned 90 degrees clockwise: np.rot90(k=-1) of the stored
    pixels. The dataset readers keep the stored pixels, as the authors' loader does."""
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:10, :20] = 250  # a bright block in the stored top-left corner
    path = _exif_jpeg(tmp_path, "upright.jpg", stored, 6)
    plain = load_image(path)
    assert plain.size == (40, 30)
    notes = []
    shown = load_image(path, orient=True, notes=notes)
    assert shown.size == (30, 40) and original_size(shown) == (30, 40)
    expected = np.rot90(np.asarray(plain), k=-1)
    assert np.abs(np.asarray(shown).astype(int) - expected).max() == 0
    assert len(notes) == 1 and "upright.jpg" in notes[0] and "(6)" in notes[0]
    level = _exif_jpeg(tmp_path, "level.jpg", stored, 1)
    notes = []
    assert load_image(level, orient=True, notes=notes).size == (40, 30) and notes == []


def test_a_support_mask_is_fitted_to_its_turned_photo(tmp_path):
    """A mask drawn on the photo as shown fits as it is; one of the stored pixels' size (drawn on the unturned
    pixels) is turned with the photo; any other size is an error naming both files and the turn."""
    path = _exif_jpeg(tmp_path, "s.jpg", np.zeros((30, 40, 3), np.uint8), 6)
    photo = load_image(path, orient=True)
    as_shown = np.zeros((40, 30), np.float32)
    as_shown[:5, :] = 1
    assert fit_mask_to_image(as_shown, photo, "m.png", "s.jpg") is as_shown
    on_stored = np.zeros((30, 40), np.float32)
    on_stored[:, :7] = 1  # the stored left columns: the top rows once turned clockwise
    notes = []
    turned = fit_mask_to_image(on_stored, photo, "m.png", "s.jpg", notes)
    np.testing.assert_array_equal(turned, np.rot90(on_stored, k=-1))
    assert turned[:7].all() and not turned[7:].any() and "stored size" in notes[0]
    with pytest.raises(UserError, match=r"m.png: mask is 20x20 but its image s.jpg is 30x40 as shown \(EXIF"):
        fit_mask_to_image(np.zeros((20, 20), np.float32), photo, "m.png", "s.jpg")


def test_black_and_white_palette_masks_and_16_bit_masks(tmp_path):
    """Pillow's `convert('P')` of a 0/255 mask puts white at index 255: with no other index, 255 is the
    foreground (not VOC's border). A VOC mask keeps its rule. A 16-bit 0/65535 mask reads as 0/255."""
    fg = np.zeros((6, 8), bool)
    fg[2:5, 3:7] = True
    bw = _save(tmp_path, "bw.png", Image.fromarray(fg.astype(np.uint8) * 255).convert("P"))
    assert Image.open(bw).mode == "P"
    np.testing.assert_array_equal(load_binary_mask(bw), fg.astype(np.float32))
    voc = np.where(fg, 15, 0).astype(np.uint8)
    voc[0] = 255
    voc_img = Image.fromarray(voc, mode="P")
    voc_img.putpalette([0, 0, 0] * 256)
    np.testing.assert_array_equal(load_binary_mask(_save(tmp_path, "voc.png", voc_img)), fg.astype(np.float32))
    deep = _save(tmp_path, "m16.png", Image.fromarray(fg.astype(np.uint16) * 65535))
    np.testing.assert_array_equal(load_binary_mask(deep), fg.astype(np.float32))
    with pytest.raises(UserError, match="m16.png: mask values range 0..65535"):
        load_mask(deep)  # a label map keeps its values: 65535 is no label


def test_a_jpeg_is_reduced_until_its_decoded_size_fits(tmp_path):
    """JPEG DCT scaling decodes ceil(w / d) x ceil(h / d) pixels: 1201x901 at 1/2 is 601x451 (271051 pixels), over a
    limit of 600 * 450, so 1/4 is taken (301x226). A limit equal to the pixel count is within it."""
    from hsnet_deploy.data import preprocess

    previous = preprocess.max_pixels()
    try:
        big = tmp_path / "odd.jpg"
        Image.new("RGB", (1201, 901), (120, 30, 30)).save(big)
        preprocess.set_max_pixels(600 * 450)
        img = load_image(big)
        assert img.size == (301, 226) and original_size(img) == (1201, 901)
        exact = _save(tmp_path, "exact.png", Image.new("L", (20, 10)))
        preprocess.set_max_pixels(200)
        assert load_image(exact).size == (20, 10)
        preprocess.set_max_pixels(199)
        with pytest.raises(UserError, match="exact.png: image is 20x10"):
            load_image(exact)
    finally:
        preprocess.set_max_pixels(previous)


def test_a_32_bit_integer_image_of_small_values_keeps_them(tmp_path):
    """Mode 'I' carries no range: values up to 255 are 8-bit already (only a float image of 0..1 is scaled)."""
    values = np.array([[0, 1], [1, 0]], np.int32)
    path = _save(tmp_path, "i32.tiff", Image.fromarray(values))
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(np.asarray(load_image(path))[..., 0], values)


@pytest.mark.parametrize("turn", [5, 7])
def test_transposing_orientations_5_and_7_swap_the_size_and_fit_a_stored_size_mask(tmp_path, turn):
    """EXIF 2.3: orientations 5 to 8 all swap width and height (5 = transpose, 7 = transverse), not only 6 and 8."""
    path = _exif_jpeg(tmp_path, f"t{turn}.jpg", np.zeros((30, 40, 3), np.uint8), turn)
    photo = load_image(path, orient=True)
    assert photo.size == (30, 40) and original_size(photo) == (30, 40)
    on_stored = np.zeros((30, 40), np.float32)
    on_stored[:4, :7] = 1
    turned = fit_mask_to_image(on_stored, photo, "m.png", f"t{turn}.jpg")
    want = on_stored.T if turn == 5 else np.rot90(on_stored, 2).T  # transverse: the anti-diagonal flip
    np.testing.assert_array_equal(turned, want)


def test_a_mask_of_mostly_bright_grey_gets_the_is_it_a_mask_note(tmp_path):
    """Grey means neither 0/1 nor 255: values above 128 count too (a photo saved as the mask is mostly bright)."""
    labels = np.zeros((10, 10), np.uint8)
    labels[:, :5] = 200
    notes = []
    path = _save(tmp_path, "bright.png", Image.fromarray(labels))
    assert load_binary_mask(path, notes=notes).sum() == 50
    assert len(notes) == 1 and "bright.png: 50% of the mask's pixels are grey" in notes[0]
    notes = []
    load_binary_mask(_save(tmp_path, "clean.png", Image.fromarray(np.where(labels, 255, 0).astype(np.uint8))),
                     notes=notes)
    assert notes == []
