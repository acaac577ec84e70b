import pytest
import torch

from hsnet_deploy.errors import UserError
from hsnet_deploy.model import HSNet, load_checkpoint, save_checkpoint, seeded_model


@pytest.fixture(scope="module")
def resnet50_state():
    return {"module." + k: v for k, v in seeded_model("resnet50", seed=2).state_dict().items()}


def test_own_format_records_backbone_and_masking(tmp_path):
    model = seeded_model("vgg16", seed=3, mask_support=False)
    path = tmp_path / "own.pt"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)  # no backbone needed
    assert loaded.backbone_name == "vgg16" and loaded.mask_support is False
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_prefix_is_optional(tmp_path, resnet50_state):
    path = tmp_path / "plain.pt"
    torch.save({k[7:]: v for k, v in resnet50_state.items()}, path)
    assert isinstance(load_checkpoint(path, "resnet50"), HSNet)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pt", "resnet50")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a pickle" * 10)
    with pytest.raises(UserError, match="garbage.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(path, "resnet50")
    text = tmp_path / "notes.pt"
    text.write_text("hello world, not a checkpoint")  # torch's legacy reader alone says "101"
    with pytest.raises(UserError, match=r"notes.pt: not a readable PyTorch checkpoint \(neither torch.save's zip "
                                        r"archive nor a legacy pickle: KeyError"):
        load_checkpoint(text, "resnet50")


def test_tensor_instead_of_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="not an HSNet checkpoint"):
        load_checkpoint(path, "resnet50")


def test_authors_file_needs_a_backbone(tmp_path, resnet50_state):
    path = tmp_path / "best_model.pt"
    torch.save(resnet50_state, path)
    with pytest.raises(UserError, match="pass --backbone .*look like resnet50"):
        load_checkpoint(path)


def test_wrong_backbone_names_keys_and_the_likely_one(tmp_path, resnet50_state):
    path = tmp_path / "best_model.pt"
    torch.save(resnet50_state, path)
    with pytest.raises(UserError, match=r"missing keys: backbone\.layer3\.6\..*look like a resnet50"):
        load_checkpoint(path, "resnet101")


def test_unexpected_and_missing_keys_are_named(tmp_path, resnet50_state):
    state = dict(resnet50_state)
    del state["module.hpn_learner.decoder2.2.bias"]
    state["module.hpn_learner.extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path, "resnet50")
    assert "1 missing key: hpn_learner.decoder2.2.bias" in str(err.value)
    assert "1 unexpected key: hpn_learner.extra.weight" in str(err.value)


def test_wrong_shape_is_named(tmp_path, resnet50_state):
    state = dict(resnet50_state)
    state["module.hpn_learner.decoder1.0.weight"] = torch.zeros(128, 128, 5, 5)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"decoder1\.0\.weight \(128, 128, 5, 5\) != \(128, 128, 3, 3\)"):
        load_checkpoint(path, "resnet50")


def test_own_format_refuses_a_contradicting_backbone(tmp_path):
    path = tmp_path / "own.pt"
    save_checkpoint(seeded_model("resnet50"), path)
    with pytest.raises(UserError, match="records backbone resnet50, but vgg16"):
        load_checkpoint(path, "vgg16")


def test_seeded_model_is_reproducible():
    a, b = seeded_model("resnet50", seed=7), seeded_model("resnet50", seed=7)
    c = seeded_model("resnet50", seed=8)
    key = "hpn_learner.encoder_layer2.0.conv1.weight"
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
