import pytest
import torch

from imgpipe.models import SimpleCNN, WeightsUnavailableError, build_model, count_parameters, imagenet_state_dict


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
    model = build_model("resnet18", num_classes=3, in_channels=1, weights=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, donor.layer4[1].conv2.weight)
    assert model.fc.out_features == 3


def test_a_checkpoint_without_tensors_is_refused_by_name(tmp_path):
    path = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(ValueError, match="junk.pt"):
        build_model("simple_cnn", 2, 1, weights=str(path))


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
    model = build_model("resnet18", num_classes=2, in_channels=1, weights="imagenet")
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
    with pytest.raises(ValueError, match="cannot read checkpoint '.*notes.pt'"):
        build_model("simple_cnn", 2, 1, weights=str(path))
