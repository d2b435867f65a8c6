from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from imgpipe.training.augment import AUGMENT_PRESETS, AugmentParams, BatchAugment


def random_images(count: int, channels: int, height: int = 40, width: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, channels, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def smooth_images(count: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Gradients plus a bright square: structure that moves visibly under flips and affines."""
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    image = torch.stack([(xs * 200 + ys * 50), (ys * 220 + 10).expand(height, width),
                         ((1 - xs) * 120 + 60).expand(height, width)])[:channels]
    image[:, height // 4: height // 2, width // 5: width // 2] = 250
    return image.round().to(torch.uint8).expand(count, -1, -1, -1).contiguous()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_float(image: torch.Tensor) -> torch.Tensor:
    return image.float() / 255


def torchvision_affine(image: torch.Tensor, params: AugmentParams, index: int, fill=None) -> torch.Tensor:
    return TF.affine(image, angle=float(params.angle[index]), translate=params.translate[index].tolist(),
                     scale=float(params.scale[index]), shear=[0.0, 0.0],
                     interpolation=InterpolationMode.BILINEAR, fill=fill)


AFFINE = dict(angle=torch.tensor([7.0, -13.0, 0.0, 14.5]),
              translate=torch.tensor([[2.5, -1.0], [0.0, 3.0], [-4.0, 0.0], [1.25, 3.5]]),
              scale=torch.tensor([1.1, 0.9, 1.0, 0.86]))
# Translating by whole pixels at angle 0 and scale 1 samples exactly at pixel centres.
WHOLE_PIXEL_SHIFT = dict(angle=torch.zeros(2), translate=torch.tensor([[3.0, -2.0], [-5.0, 4.0]]),
                         scale=torch.ones(2))


@pytest.mark.parametrize("preset", ["light", "standard"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_of_a_batch_gets_its_own_draw(preset, channels):
    images = smooth_images(8, channels, 40, 40)
    output = BatchAugment(preset, channels)(images, seeded(0))
    distinct = {tuple(image.flatten().tolist()) for image in output}
    assert len(distinct) == 8


@pytest.mark.parametrize("preset", ["light", "standard"])
def test_same_seed_same_output_other_seed_other_output(preset):
    augment = BatchAugment(preset, 3)
    images = random_images(6, 3)
    first = augment(images, seeded(7))
    assert torch.equal(first, augment(images, seeded(7)))
    assert not torch.equal(first, augment(images, seeded(8)))


def test_the_generator_advances_and_a_restored_state_replays_the_batch():
    augment = BatchAugment("standard", 1)
    images = random_images(4, 1)
    generator = seeded(3)
    saved = generator.get_state()
    first = augment(images, generator)
    assert not torch.equal(generator.get_state(), saved)
    second = augment(images, generator)
    assert not torch.equal(first, second)
    generator.set_state(saved)
    assert torch.equal(augment(images, generator), first)
    assert torch.equal(augment(images, generator), second)


def test_draws_use_only_the_given_generator():
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    BatchAugment("standard", 3)(random_images(4, 3), seeded(0))
    assert torch.equal(torch.get_rng_state(), global_state)


def test_drawn_parameters_stay_in_the_preset_ranges():
    params = BatchAugment("standard", 3).draw(4000, 40, 50, seeded(0))
    assert params.angle.abs().max() <= 15 and params.angle.abs().max() > 14
    assert params.translate[:, 0].abs().max() <= 5.0 and params.translate[:, 1].abs().max() <= 4.0
    assert 0.85 <= params.scale.min() and params.scale.max() <= 1.15
    for factors in (params.brightness, params.contrast, params.saturation):
        assert 0.8 <= factors.min() and factors.max() <= 1.2
    assert 0.45 < params.flip.float().mean() < 0.55
    light = BatchAugment("light", 1).draw(4000, 40, 40, seeded(0))
    assert light.angle.abs().max() <= 10 and light.brightness is None and light.saturation is None
    assert BatchAugment("standard", 1).draw(4, 40, 40, seeded(0)).saturation is None


def test_flip_equals_torchvision_horizontal_flip_per_image():
    images = random_images(3, 3, 24, 40)
    output = BatchAugment("light", 3).apply(images, AugmentParams(flip=torch.tensor([True, False, True])))
    for index, flipped in enumerate([True, False, True]):
        expected = TF.horizontal_flip(images[index]) if flipped else images[index]
        assert torch.equal(output[index], as_float(expected))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height,width", [(40, 40), (24, 40), (50, 31)])
def test_affine_equals_torchvision_affine_per_image(channels, height, width):
    images = random_images(4, channels, height, width)
    params = AugmentParams(**AFFINE)
    output = BatchAugment("light", channels).apply(images, params)
    for index in range(4):
        expected = torchvision_affine(as_float(images[index]), params, index)
        # Whole images, borders included: both sample with grid_sample (bilinear, zeros
        # padding, align_corners=False) at the same points, which only differ in float32
        # rounding of the grid (~1e-6 pixel); bilinear output moves at most by that much
        # times the largest step between neighbouring pixels (1.0), so 1e-4 is ample and
        # still fails on any sub-pixel misplacement (a 0.01-pixel shift moves these noise
        # images by ~1e-2).
        torch.testing.assert_close(output[index], expected, rtol=0, atol=1e-4)


def test_affine_with_a_whole_pixel_shift_moves_pixels_exactly():
    images = random_images(2, 1, 30, 40)
    output = BatchAugment("light", 1).apply(images, AugmentParams(**WHOLE_PIXEL_SHIFT))
    # Image 0 moved 3 right and 2 up: output[y, x] = input[y + 2, x - 3]. The uint8 values
    # come back to within float rounding of the grid (a few 1e-7 pixel of bilinear
    # leakage), so nothing was blurred, and what moved in from outside is zero.
    assert torch.allclose(output[0, 0, :-2, 3:] * 255, images[0, 0, 2:, :-3].float(), atol=1e-3)
    assert output[0, 0, -2:, :].max() < 1e-5 and output[0, 0, :, :3].max() < 1e-5
    assert torch.allclose(output[1, 0, 4:, :-5] * 255, images[1, 0, :-4, 5:].float(), atol=1e-3)


def test_fill_is_plain_zero_padding_which_torchvision_fill_0_matches_inside_the_image():
    # v2.RandomAffine's fill=0 (unlike fill=None) also multiplies by the bilinearly sampled
    # coverage of the image, darkening the one-pixel band along the edge of the moved image
    # a second time. Ours is fill=None's plain zero padding: the two agree wherever a sample
    # lies fully inside the image.
    images = random_images(4, 3, 40, 40)
    params = AugmentParams(**AFFINE)
    output = BatchAugment("light", 3).apply(images, params)
    for index in range(4):
        coverage = torchvision_affine(torch.ones(1, 40, 40), params, index)
        inside = (coverage > 1 - 1e-6).expand(3, -1, -1)
        expected = torchvision_affine(as_float(images[index]), params, index, fill=0)
        assert inside.float().mean() > 0.5
        torch.testing.assert_close(output[index][inside], expected[inside], rtol=0, atol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_flip_folded_into_the_affine_equals_flip_then_affine(channels):
    images = random_images(4, channels, 24, 40)
    flips = torch.tensor([True, False, True, True])
    params = AugmentParams(flip=flips, **AFFINE)
    output = BatchAugment("light", channels).apply(images, params)
    for index in range(4):
        image = as_float(images[index])
        if flips[index]:
            image = TF.horizontal_flip(image)
        torch.testing.assert_close(output[index], torchvision_affine(image, params, index), rtol=0, atol=1e-4)


@pytest.mark.parametrize("step,kernel", [("brightness", TF.adjust_brightness),
                                         ("contrast", TF.adjust_contrast),
                                         ("saturation", TF.adjust_saturation)])
@pytest.mark.parametrize("channels", [1, 3])
def test_colour_steps_equal_torchvision_kernels_per_image(step, kernel, channels):
    images = random_images(4, channels, 24, 40)
    images[1] //= 3  # a dark image and a clipped one: both clamps matter
    images[2] = images[2] // 2 + 128
    factors = torch.tensor([0.8, 1.2, 1.13, 0.91])
    output = BatchAugment("standard", channels).apply(images, AugmentParams(**{step: factors}))
    for index in range(4):
        expected = kernel(as_float(images[index]), float(factors[index]))
        torch.testing.assert_close(output[index], expected, rtol=0, atol=1e-5)
    if step == "saturation" and channels == 1:
        assert torch.equal(output, as_float(images))  # grayscale has no saturation


@pytest.mark.parametrize("channels", [1, 3])
def test_standard_chain_equals_torchvision_chain(channels):
    images = random_images(4, channels, 40, 40)
    params = AugmentParams(flip=torch.tensor([False, True, True, False]), **AFFINE,
                           brightness=torch.tensor([0.8, 1.2, 1.0, 1.1]),
                           contrast=torch.tensor([1.2, 0.8, 0.9, 1.0]),
                           saturation=torch.tensor([0.8, 1.2, 1.1, 1.0]))
    output = BatchAugment("standard", channels).apply(images, params)
    for index in range(4):
        image = as_float(images[index])
        if params.flip[index]:
            image = TF.horizontal_flip(image)
        image = torchvision_affine(image, params, index)
        image = TF.adjust_brightness(image, float(params.brightness[index]))
        image = TF.adjust_contrast(image, float(params.contrast[index]))
        image = TF.adjust_saturation(image, float(params.saturation[index]))
        torch.testing.assert_close(output[index], image, rtol=0, atol=1e-4)


def test_call_applies_what_draw_draws():
    augment = BatchAugment("standard", 3)
    images = random_images(5, 3)
    params = augment.draw(5, 40, 40, seeded(11))
    assert torch.equal(augment(images, seeded(11)), augment.apply(images, params))


@pytest.mark.parametrize("channels", [1, 3])
def test_none_is_scaling_to_unit_range(channels):
    augment = BatchAugment("none", channels)
    images = random_images(3, channels)
    generator = seeded(0)
    state = generator.get_state()
    output = augment(images, generator)
    assert not augment.active
    assert output.dtype == torch.float32 and torch.equal(output, images.float() / 255)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_output_is_float32_in_unit_range_with_shape_and_device_kept(preset, channels):
    images = random_images(5, channels, 33, 47)
    images[0] = 255  # saturated images test the upper clamp
    output = BatchAugment(preset, channels)(images, seeded(0))
    assert output.dtype == torch.float32
    assert output.shape == images.shape and output.device == images.device
    assert output.min() >= 0 and output.max() <= 1
    assert BatchAugment(preset, channels).active == (preset != "none")


def test_unknown_preset_is_refused_by_name_with_the_valid_ones():
    with pytest.raises(ValueError, match="'heavy'") as error:
        BatchAugment("heavy", 1)
    assert all(name in str(error.value) for name in AUGMENT_PRESETS)


def test_wrong_channel_count_or_dtype_is_refused():
    with pytest.raises(ValueError, match="channels"):
        BatchAugment("light", 2)
    with pytest.raises(ValueError, match="channel"):
        BatchAugment("light", 3)(random_images(2, 1), seeded(0))
    with pytest.raises(ValueError, match="uint8"):
        BatchAugment("light", 1)(random_images(2, 1).float(), seeded(0))
