import logging

import pytest
import torch

from imgpipe.models.checkpoints import CheckpointError
from imgpipe.models.heads import head_name
from imgpipe.models.networks import (
    SimpleCNN,
    WeightsUnavailableError,
    build_model,
    count_parameters,
    imagenet_state_dict,
    load_start_weights,
    truncation_points,
)


@pytest.mark.parametrize("size", [32, 40, 64, 97])
def test_simple_cnn_works_at_any_size_from_32(size):
    model = SimpleCNN(in_channels=1, num_classes=3)
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
@pytest.mark.parametrize("channels", [1, 3])
def test_torchvision_models_get_our_head_and_channels(arch, channels):
    model = build_model(arch, num_classes=4, in_channels=channels).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, channels, 64, 64)).shape == (2, 4)


def test_starting_from_a_checkpoint_keeps_the_backbone_and_resizes_the_head(tmp_path):
    donor = build_model("resnet18", num_classes=10, in_channels=1)
    path = tmp_path / "donor.pt"
    torch.save({"state_dict": donor.state_dict()}, path)
    model = build_model("resnet18", num_classes=3, in_channels=1)
    report = load_start_weights(model, "resnet18", str(path))
    assert report.fresh == ["fc.weight", "fc.bias"] and report.unused == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer4[1].conv2.weight, donor.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def test_a_checkpoint_without_tensors_is_refused_by_name(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(CheckpointError, match="junk.pt.*holds no state_dict"):
        load_start_weights(build_model("simple_cnn", 2, 1), "simple_cnn", str(path))


def test_imagenet_weights_load_from_the_hub_cache_and_adapt_to_grayscale(tmp_path, monkeypatch):
    # Real ImageNet weights cannot be downloaded here: put a file of ours where torchvision's
    # loader looks for them, then the real loading path runs offline.
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    rgb = torchvision.models.resnet18(num_classes=1000)
    torch.save(rgb.state_dict(), cache / url.rsplit("/", 1)[1])
    model = build_model("resnet18", num_classes=2, in_channels=1)
    load_start_weights(model, "resnet18", "imagenet")
    assert torch.allclose(model.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    assert model.fc.out_features == 2


def test_missing_imagenet_weights_name_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as error:
        imagenet_state_dict("resnet18")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints") in message and "resnet18" in message and "https://" in message


def test_parameter_count():
    assert count_parameters(torch.nn.Linear(3, 2)) == 8


@pytest.mark.parametrize("arch", ["resnet50", "efficientnet_b4", "mobilenet_v3_large", "vgg16"])
def test_the_other_named_architectures_build_for_grayscale(arch):
    model = build_model(arch, num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("arch, size", [("googlenet", 64), ("inception_v3", 80), ("vit_b_32", 64)])
def test_architectures_with_aux_heads_or_fixed_sizes_train_on_our_images(arch, size):
    model = build_model(arch, num_classes=2, in_channels=3, image_size=size).train()
    logits = model(torch.zeros(2, 3, size, size))
    assert logits.shape == (2, 2)  # plain logits, not an (logits, aux) tuple
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="'.*notes.pt' is not a PyTorch checkpoint"):
        load_start_weights(build_model("simple_cnn", 2, 1), "simple_cnn", str(path))


def test_loading_nothing_is_an_error_that_names_the_file(tmp_path):
    # today's bug: a mobilenet started from a simple_cnn checkpoint loaded 0 of 244 tensors, silently
    path = tmp_path / "cnn.pt"
    torch.save({"state_dict": SimpleCNN(1, 2).state_dict()}, path)
    model = build_model("mobilenet_v3_small", 2, 1)
    with pytest.raises(ValueError, match=r"cnn.pt.*none of its 10 tensors fit this"):
        load_start_weights(model, "mobilenet_v3_small", str(path))


def test_a_partial_load_warns_with_what_did_not_fit(tmp_path, caplog):
    path = tmp_path / "ten_classes.pt"
    torch.save(SimpleCNN(1, 10).state_dict(), path)  # a plain state_dict, another class count
    model = build_model("simple_cnn", 3, 1)
    with caplog.at_level(logging.WARNING, logger="imgpipe.models.networks"):
        report = load_start_weights(model, "simple_cnn", str(path))
    assert len(report.loaded) == 8 and report.fresh == ["head.weight", "head.bias"]
    assert "loaded 8 of the model's 10 tensors" in caplog.text and "head.weight" in caplog.text
    assert not report.complete


def test_a_truncated_backbone_drops_the_last_stage_and_gets_an_own_head():
    # seed 000: ResNet-18 without its last conv stage, global pooling, an own dense head
    model = build_model("resnet18", 2, 1, image_size=40, truncate="layer4", head_hidden=[32], head_dropout=0.2)
    names = set(model.state_dict())
    assert not any(name.startswith(("layer4.", "fc.")) for name in names)
    assert "layer3.1.conv2.weight" in names  # torchvision names, so ImageNet weights load by name
    assert model.head[1].in_features == 256 and model.head[-1].out_features == 2
    assert head_name(model) == "head"
    assert model.eval()(torch.zeros(3, 1, 40, 40)).shape == (3, 2)
    efficientnet = build_model("efficientnet_b0", 3, 3, image_size=64, truncate="features.6")
    assert len(efficientnet.features) == 6 and efficientnet.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_an_unknown_cut_point_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'layer5' is not a module ResNet can be cut at; one of: .*layer3, layer3.1, layer4, "):
        build_model("resnet18", 2, 1, image_size=40, truncate="layer5")
    assert "features.7" in truncation_points(build_model("efficientnet_b0", 2, 3))


def test_imagenet_weights_load_into_a_truncated_backbone(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    rgb = torchvision.models.resnet18(num_classes=1000)
    torch.save(rgb.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model = build_model("resnet18", 2, 3, image_size=40, truncate="layer4")
    report = load_start_weights(model, "resnet18", "imagenet")
    assert torch.equal(model.layer3[0].conv1.weight, rgb.layer3[0].conv1.weight)
    assert set(report.fresh) == {"head.1.weight", "head.1.bias"}


@pytest.mark.parametrize("arch, head", [("simple_cnn", "head"), ("resnet18", "fc"), ("efficientnet_b0", "classifier"),
                                        ("vgg16", "classifier"), ("vit_b_32", "heads")])
def test_every_model_has_a_named_head(arch, head):
    assert head_name(build_model(arch, 2, 3, image_size=64)) == head
