"""Masked loss (`--masked_loss` with conditioning_data_dir masks, `--alpha_mask`): the mask follows the
image's resize, crop and flip; it weighs the main term as sd-scripts' `apply_masked_loss` does and
leaves the CAT term alone; cached latents carry alpha masks; the mistakes are refused before training.
End to end on the tiny SD, SDXL and FLUX.1 models."""

from __future__ import annotations

import shutil
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import flux_train_network_cat
import networks.lora_cat as lora_cat
import sdxl_train_network_cat
import train_network_cat
from library.cat.objective import CATBatch, cat_step
from library.data.buckets import Placement
from library.data.folder_dataset import ImageItem, Subset, SubsetOptions
from library.data.image_loading import Augmentation, load_image
from library.data.latents import LatentCache, disk_path, key_for
from library.data.loss_masks import alpha_mask, batch_loss_mask, conditioning_mask, load_loss_mask, mask_problems
from library.families.sd.denoiser import SDDenoiser
from library.testing.demo_data import write_demo_dataset
from library.testing.tiny_flux import TINY_FLUX_CONFIG, build_tiny_flux, save_bfl_files
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.testing.tiny_sdxl import TINY_SDXL_CONFIG, build_tiny_sdxl, save_sdxl_single_file
from library.training import trainer
from library.training.losses import per_sample_loss
from networks.lora_cat.file_format import read_lora_file

SIZE = 64
LEFT_HALF = np.zeros((SIZE, SIZE), np.uint8)
LEFT_HALF[:, : SIZE // 2] = 255
TOP_HALF = np.zeros((SIZE, SIZE), np.uint8)
TOP_HALF[: SIZE // 2] = 255
# What each training image's mask is, by stem: white, black, left half, top half.
MASKS = {"000": np.full((SIZE, SIZE), 255, np.uint8), "001": np.zeros((SIZE, SIZE), np.uint8),
         "002": LEFT_HALF, "003": TOP_HALF}
# The alpha dataset: opaque, transparent, left half opaque, and no alpha channel at all (counts fully).
ALPHAS = {"000": MASKS["000"], "001": MASKS["001"], "002": LEFT_HALF, "003": None}


def _sd_scripts_masked_loss(prediction, target, pixel_masks):
    """sd-scripts' l2 loss with `apply_masked_loss`, written from its formula: the conditioning image in
    [-1, 1], its red channel back to [0, 1], area-resized to the loss, multiplied, mean per sample."""
    loss = (prediction.float() - target.float()) ** 2
    conditioning = pixel_masks.unsqueeze(1).repeat(1, 3, 1, 1) * 2 - 1
    mask = conditioning[:, 0].unsqueeze(1) / 2 + 0.5
    mask = F.interpolate(mask, size=loss.shape[2:], mode="area")
    return (loss * mask).mean(dim=[1, 2, 3])


# --- the mask's geometry ----------------------------------------------------------------------------


def _save_gray(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_a_mask_is_cropped_and_flipped_as_its_image_by_hand(tmp_path):
    # 16x8 mask, white in its 6 left columns; the 8x8 bucket is cut from the middle (columns 4..11).
    array = np.zeros((8, 16), np.uint8)
    array[:, :6] = 255
    path = _save_gray(tmp_path / "m.png", array)
    placement = Placement((8, 8), (16, 8), 0.0, (16, 8))
    centred = conditioning_mask(path, placement, Augmentation())
    assert centred.shape == (8, 8) and torch.equal(centred[0], torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0]))
    flipped = conditioning_mask(path, placement, Augmentation(flip=True))
    assert torch.equal(flipped[3], torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1]))
    left = conditioning_mask(path, placement, Augmentation(crop_offset=(0.0, 0.0)))
    assert torch.equal(left[7], torch.tensor([1.0] * 6 + [0, 0]))
    right = conditioning_mask(path, placement, Augmentation(crop_offset=(1.0, 0.0)))
    assert torch.equal(right, torch.zeros(8, 8))


@pytest.mark.parametrize("interpolation", [None, "area", "bicubic"])
def test_a_resized_mask_lands_on_the_pixels_of_its_image(tmp_path, interpolation):
    """Resize (with the subset's resize_interpolation), random crop and flip: the mask is where the
    image's own red channel went."""
    red = np.random.default_rng(0).integers(0, 256, (32, 48), dtype=np.uint8)
    image = np.stack([red, np.zeros_like(red), np.full_like(red, 128)], axis=-1)
    Image.fromarray(image).save(tmp_path / "img.png")
    _save_gray(tmp_path / "mask.png", red)
    placement = Placement((16, 16), (24, 16), 0.0, (48, 32))
    for augmentation in (Augmentation(), Augmentation(crop_offset=(0.9, 0.0), flip=True)):
        pixels = load_image(tmp_path / "img.png", placement.bucket, placement.resized, augmentation, interpolation)
        mask = conditioning_mask(tmp_path / "mask.png", placement, augmentation, interpolation)
        torch.testing.assert_close(mask, (pixels[0] + 1) / 2, atol=1e-6, rtol=0)
    other = conditioning_mask(tmp_path / "mask.png", placement, Augmentation(crop_offset=(0.0, 0.0)), interpolation)
    assert (other - mask).abs().max() > 0.1, "another crop must give another mask, or the test proves nothing"


def test_the_alpha_channel_is_the_mask_and_an_opaque_image_weighs_fully(tmp_path):
    alpha = np.random.default_rng(1).integers(0, 256, (32, 48), dtype=np.uint8)
    rgba = np.dstack([np.full((32, 48, 3), 90, np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    _save_gray(tmp_path / "alpha.png", alpha)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "opaque.png")
    placement = Placement((16, 16), (24, 16), 0.0, (48, 32))
    augmentation = Augmentation(crop_offset=(0.3, 0.0), flip=True)
    expected = conditioning_mask(tmp_path / "alpha.png", placement, augmentation)
    assert torch.equal(alpha_mask(tmp_path / "a.png", (16, 16), (24, 16), augmentation), expected)
    assert torch.equal(alpha_mask(tmp_path / "opaque.png", (16, 16), (24, 16), augmentation), torch.ones(16, 16))


def test_without_buckets_a_mask_of_another_size_is_stretched_to_its_image(tmp_path):
    small = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)
    path = _save_gray(tmp_path / "m.png", small)
    mask = conditioning_mask(path, Placement((16, 16), (16, 16), 0.0, (16, 16)), Augmentation())
    stretched = np.asarray(Image.fromarray(small).resize((16, 16), Image.Resampling.LANCZOS), np.float32) / 255.0
    assert torch.equal(mask, torch.from_numpy(stretched))


def test_a_mask_of_another_size_is_refused_with_buckets_only(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    _save_gray(tmp_path / "m.png", np.zeros((8, 8)))
    item = ImageItem(tmp_path / "img.png", "c", "", False, mask_path=tmp_path / "m.png")
    subset = Subset(tmp_path, 1, "", False, (item,))
    (problem,) = mask_problems(subset, buckets=True)
    assert "is 8x8 pixels but its image" in problem and "16x16" in problem
    assert mask_problems(subset, buckets=False) == []


def test_a_batch_without_masks_has_none_and_a_mixed_one_fills_in_ones():
    assert batch_loss_mask([None, None], (8, 4)) is None
    half = torch.zeros(4, 8)
    mixed = batch_loss_mask([None, half], (8, 4))
    assert torch.equal(mixed, torch.stack([torch.ones(4, 8), half]))


def test_an_image_without_a_mask_source_has_no_mask(tmp_path):
    Image.new("RGBA", (8, 8)).save(tmp_path / "img.png")
    placement = Placement((8, 8), (8, 8), 0.0, (8, 8))
    assert load_loss_mask(ImageItem(tmp_path / "img.png", "c", "", False), placement, Augmentation()) is None
    item = ImageItem(tmp_path / "img.png", "c", "", False, options=SubsetOptions(alpha_mask=True))
    assert torch.equal(load_loss_mask(item, placement, Augmentation()), torch.zeros(8, 8))  # fully transparent


# --- the loss -------------------------------------------------------------------------------------


def test_a_mask_of_ones_is_the_unmasked_loss_bitwise():
    gen = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    ones = torch.ones(2, 64, 64)
    assert torch.equal(per_sample_loss(prediction, target, mask=ones), per_sample_loss(prediction, target))
    timesteps = torch.tensor([10, 500])
    huber = partial(per_sample_loss, loss_type="huber", huber_schedule="constant", timesteps=timesteps)
    assert torch.equal(huber(prediction, target, mask=ones), huber(prediction, target))


def test_a_half_mask_weighs_as_sd_scripts_formula():
    gen = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 2, 2, generator=gen), torch.randn(2, 4, 2, 2, generator=gen)
    half = torch.zeros(2, 16, 16)
    half[:, :, :8] = 1.0  # the left half of the image: the left latent column
    masked = per_sample_loss(prediction, target, mask=half)
    torch.testing.assert_close(masked, _sd_scripts_masked_loss(prediction, target, half), atol=0, rtol=1e-6)
    by_hand = ((prediction - target) ** 2)[..., 0].sum(dim=(1, 2)) / 16  # 8 of 16 elements, the mean over all 16
    torch.testing.assert_close(masked, by_hand, atol=0, rtol=1e-6)
    # Area interpolation: one white pixel of each 2x2 block weighs its latent by a quarter.
    sparse = torch.zeros(2, 4, 4)
    sparse[:, ::2, ::2] = 1.0
    torch.testing.assert_close(per_sample_loss(prediction, target, mask=sparse),
                               per_sample_loss(prediction, target) / 4, atol=0, rtol=1e-6)


def _tiny_cat_setup():
    sd = build_tiny_sd(seed=0)
    network = lora_cat.create_network(1.0, 4, 4.0, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet)
    network.prepare_grad_etc(sd.text_encoder, sd.unet)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a LoRA some steps into training: the CAT term is not zero
        for lora in network.all_loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.05)
    tok, size = sd.tokenizer, sd.unet.config.sample_size
    trigger = tok(["a photo of sks teapot", "sks on a table"], padding="max_length", return_tensors="pt").input_ids
    free = tok(["a photo of teapot", "on a table"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(2, sd.unet.config.in_channels, size, size, generator=gen)
    batch = CATBatch(latents, torch.tensor([100, 900]), torch.randn(latents.shape, generator=gen), trigger, free,
                     torch.tensor([1.0, 0.5]))
    return sd, network, batch


@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_the_mask_weighs_the_main_term_and_leaves_the_cat_term_over_the_whole_image(mode):
    sd, network, batch = _tiny_cat_setup()
    denoiser = SDDenoiser(sd.unet, sd.text_encoder)
    half = torch.zeros(2, 8 * batch.target.shape[2], 8 * batch.target.shape[3])
    half[:, :, : half.shape[2] // 2] = 1.0
    runs = {}
    for name, mask in (("plain", None), ("masked", half)):
        network.zero_grad(set_to_none=True)
        runs[name] = cat_step(denoiser, network, batch, 1.5, mode, partial(per_sample_loss, mask=mask),
                              lambda loss, last: loss.backward())
    assert torch.equal(runs["masked"].cat, runs["plain"].cat) and runs["plain"].cat > 0
    assert runs["masked"].main < runs["plain"].main
    with torch.no_grad():
        states = sd.text_encoder(batch.trigger_ids).last_hidden_state
        on_trigger = sd.unet(batch.noisy_latents, batch.timesteps, states).sample
    expected = (_sd_scripts_masked_loss(on_trigger, batch.target, half) * batch.weights).mean()
    torch.testing.assert_close(runs["masked"].main, expected, atol=1e-6, rtol=1e-5)


# --- the latent cache -----------------------------------------------------------------------------


def test_the_cache_carries_alpha_masks_in_memory_and_in_sd_scripts_npz_key(tmp_path):
    vae = build_tiny_sd(seed=0).vae
    alpha = np.random.default_rng(3).integers(0, 256, (64, 96), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((64, 96, 3), 50, np.uint8), alpha]), "RGBA").save(path)
    placement = Placement((64, 64), (96, 64), 0.5, (96, 64))
    encodes = []

    def pixels(key):
        encodes.append(key)
        return load_image(key.path, key.bucket, key.resized, Augmentation(flip=key.flip))

    def mask(key):
        return alpha_mask(key.path, key.bucket, key.resized, Augmentation(flip=key.flip))

    plain_keys = [key_for(path, placement, flip) for flip in (False, True)]
    LatentCache(to_disk=True).fill(plain_keys, pixels, vae, 1)
    with np.load(disk_path(path)) as npz:
        assert "alpha_mask" not in npz.files
    keys = [key_for(path, placement, flip, alpha_mask=True) for flip in (False, True)]
    expected = [mask(key) for key in keys]
    memory = LatentCache(to_disk=False)
    memory.fill(keys, pixels, vae, 1, load_mask=mask)
    assert all(torch.equal(memory.mask(k), e) for k, e in zip(keys, expected)) and memory.mask(plain_keys[0]) is None
    encodes.clear()
    LatentCache(to_disk=True).fill(keys, pixels, vae, 1, load_mask=mask)
    assert len(encodes) == 2, "a file without the alpha mask is encoded again"
    with np.load(disk_path(path)) as npz:
        assert npz["alpha_mask"].shape == (64, 64) and npz["alpha_mask"].dtype == np.float32
        assert torch.equal(torch.from_numpy(npz["alpha_mask"]), expected[0]), "stored unflipped, as sd-scripts does"
    encodes.clear()
    reread = LatentCache(to_disk=True)
    reread.fill(keys, pixels, vae, 1, load_mask=mask)
    assert encodes == [] and all(torch.equal(reread.mask(k), e) for k, e in zip(keys, expected))


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    save_single_file(build_tiny_sd(seed=0), root / "tiny.safetensors")
    write_demo_dataset(root / "data")
    images = root / "data" / "train" / "2_sks teapot"
    masks = root / "masks"
    masks.mkdir()
    for stem, array in MASKS.items():
        if stem == "002":  # an RGB mask: its red channel counts, not its brightness
            rgb = np.stack([array, 255 - array, 255 - array], axis=-1)
            Image.fromarray(rgb).save(masks / f"{stem}.png")
        else:
            _save_gray(masks / f"{stem}.png", array)
    alpha = root / "alpha" / "2_sks teapot"
    alpha.mkdir(parents=True)
    for stem, array in ALPHAS.items():
        image = np.asarray(Image.open(images / f"{stem}.png").convert("RGB"))
        picture = Image.fromarray(image) if array is None else Image.fromarray(np.dstack([image, array]), "RGBA")
        picture.save(alpha / f"{stem}.png")
        shutil.copy(images / f"{stem}.txt", alpha / f"{stem}.txt")
    return root


def _config(root, name, subsets: str, general: str = "") -> str:
    path = root / f"{name}.toml"
    path.write_text(f'[general]\nresolution = {SIZE}\ncaption_extension = ".txt"\n{general}\n[[datasets]]\n'
                    f'batch_size = 2\n{subsets}', encoding="utf-8")
    return str(path)


def _mask_subset(root, masks=None, extra: str = "") -> str:
    return (f'[[datasets.subsets]]\nimage_dir = "{root / "data" / "train" / "2_sks teapot"}"\n'
            f'conditioning_data_dir = "{masks or root / "masks"}"\nnum_repeats = 2\n{extra}')


def _common(out, *extra):
    return ["--output_dir", str(out), "--output_name", "cat", "--network_dim", "4", "--learning_rate", "1e-3",
            "--max_train_steps", "3", "--seed", "3", "--cat_trigger", "sks", "--max_data_loader_n_workers", "0", *extra]


def _sd_argv(workspace, out, *extra):
    return ["--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"),
            "--model_config", str(tiny_config_dir(False)), *_common(out, *extra)]


def _record(monkeypatch) -> list[dict]:
    """Per CAT step: the loaded batch, the CATBatch and the main term's loss function it was given."""
    steps, current = [], {}
    real_train_on, real_cat_step = trainer._train_on, trainer.cat_step

    def train_on(run, denoiser, batch, *rest):
        current["batch"] = batch
        return real_train_on(run, denoiser, batch, *rest)

    def recording_cat_step(denoiser, network, cat_batch, alpha, mode, loss_fn, backward):
        steps.append({"loaded": current["batch"], "batch": cat_batch, "loss_fn": loss_fn})
        return real_cat_step(denoiser, network, cat_batch, alpha, mode, loss_fn, backward)

    monkeypatch.setattr(trainer, "_train_on", train_on)
    monkeypatch.setattr(trainer, "cat_step", recording_cat_step)
    return steps


def _expected(steps_record: dict, by_stem: dict) -> torch.Tensor:
    """The masks the batch's images must train with, from the files by hand (no resize at 64 px),
    flipped where the sample was."""
    loaded = steps_record["loaded"]
    masks = []
    for sample, augmentation in zip(loaded.samples, loaded.augmentations):
        array = by_stem[sample.item.path.stem]
        mask = torch.ones(SIZE, SIZE) if array is None else torch.from_numpy(array.astype(np.float32) / 255.0)
        masks.append(mask.flip(-1) if augmentation.flip else mask)
    return torch.stack(masks)


def _check_masked_steps(steps: list[dict], by_stem: dict) -> None:
    """Every step's main loss used the images' own masks: zero for an all-black mask, the unmasked loss
    for an all-white one, sd-scripts' formula for the halves."""
    assert steps
    for step in steps:
        expected = _expected(step, by_stem)
        assert torch.equal(step["loss_fn"].keywords["mask"].cpu(), expected)
        target = step["batch"].target
        prediction = torch.randn(target.shape, generator=torch.Generator().manual_seed(0)).to(target)
        loss = step["loss_fn"](prediction, target)
        torch.testing.assert_close(loss, _sd_scripts_masked_loss(prediction, target, expected), atol=0, rtol=1e-5)
        unmasked = per_sample_loss(prediction, target)
        for index, sample in enumerate(step["loaded"].samples):
            stem = sample.item.path.stem
            if stem == "001":
                assert loss[index] == 0, "a black / transparent mask: nothing to learn from that image"
            elif by_stem[stem] is None or stem == "000":
                assert loss[index] == unmasked[index]


def test_conditioning_masks_reach_the_main_loss_end_to_end(workspace, tmp_path, monkeypatch):
    steps = _record(monkeypatch)
    argv = _sd_argv(workspace, tmp_path / "out", "--masked_loss", "--flip_aug",
                    "--dataset_config", _config(tmp_path, "ds", _mask_subset(workspace)))
    assert train_network_cat.main(argv) == 0
    _check_masked_steps(steps, MASKS)
    assert any(a.flip for s in steps for a in s["loaded"].augmentations), "no flipped sample: flips are untested"
    masked, _ = read_lora_file(tmp_path / "out" / "cat.safetensors")
    plain_config = _config(tmp_path, "plain", f'[[datasets.subsets]]\nimage_dir = "{workspace / "data" / "train" / "2_sks teapot"}"\n'
                                              "num_repeats = 2\n")
    steps.clear()
    assert train_network_cat.main(_sd_argv(workspace, tmp_path / "plain", "--flip_aug", "--dataset_config", plain_config)) == 0
    assert all("mask" not in s["loss_fn"].keywords or s["loss_fn"].keywords["mask"] is None for s in steps)
    plain, _ = read_lora_file(tmp_path / "plain" / "cat.safetensors")
    assert any(not torch.equal(masked[k], plain[k]) for k in masked), "the masks must change what is learned"


@pytest.mark.parametrize("extra", [(), ("--masked_loss",)], ids=["alpha_mask", "masked_loss_alpha_mask"])
def test_alpha_masks_reach_the_main_loss_end_to_end(workspace, tmp_path, monkeypatch, extra):
    # sd-scripts applies alpha masks with or without --masked_loss.
    steps = _record(monkeypatch)
    argv = _sd_argv(workspace, tmp_path / "out", "--alpha_mask", "--flip_aug", "--train_data_dir",
                    str(workspace / "alpha"), "--caption_extension", ".txt", "--resolution", str(SIZE),
                    "--train_batch_size", "2", *extra)
    assert train_network_cat.main(argv) == 0
    _check_masked_steps(steps, ALPHAS)


def _alpha_run(workspace, data, out, monkeypatch, *extra):
    with monkeypatch.context() as patch:
        steps = _record(patch)
        argv = _sd_argv(workspace, out, "--alpha_mask", "--flip_aug", "--train_data_dir", str(data), "--caption_extension",
                        ".txt", "--resolution", str(SIZE), "--train_batch_size", "1", "--vae_batch_size", "1", *extra)
        assert train_network_cat.main(argv) == 0
    tensors, _ = read_lora_file(out / "cat.safetensors")
    return [s["loss_fn"].keywords["mask"].cpu() for s in steps], tensors


def test_cached_latents_train_with_the_same_alpha_masks(workspace, tmp_path, monkeypatch):
    data = tmp_path / "alpha"
    shutil.copytree(workspace / "alpha", data)  # the disk cache writes beside the images
    masks, lora = _alpha_run(workspace, data, tmp_path / "plain", monkeypatch)
    for flag in ("--cache_latents", "--cache_latents_to_disk"):
        cached_masks, cached_lora = _alpha_run(workspace, data, tmp_path / flag.strip("-"), monkeypatch, flag)
        assert len(cached_masks) == len(masks) and all(torch.equal(a, b) for a, b in zip(cached_masks, masks)), flag
        assert all(torch.equal(lora[k], cached_lora[k]) for k in lora), flag
    with np.load(disk_path(data / "2_sks teapot" / "001.png")) as npz:
        assert torch.equal(torch.from_numpy(npz["alpha_mask"]), torch.zeros(SIZE, SIZE))


def test_cached_latents_train_with_the_same_conditioning_masks(workspace, tmp_path, monkeypatch):
    config = _config(tmp_path, "ds", _mask_subset(workspace))
    runs = []
    for extra in ((), ("--cache_latents",)):
        with monkeypatch.context() as patch:
            steps = _record(patch)
            assert train_network_cat.main(_sd_argv(workspace, tmp_path / f"out{len(runs)}", "--masked_loss",
                                                   "--flip_aug", "--dataset_config", config, *extra)) == 0
        runs.append([s["loss_fn"].keywords["mask"].cpu() for s in steps])
        _check_masked_steps(steps, MASKS)
    assert all(torch.equal(a, b) for a, b in zip(*runs)) and len(runs[0]) == len(runs[1])


def test_sdxl_trains_with_alpha_masks(workspace, tmp_path, monkeypatch):
    save_sdxl_single_file(build_tiny_sdxl(seed=0), tmp_path / "sdxl.safetensors")
    steps = _record(monkeypatch)
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "sdxl.safetensors"), "--model_config", str(TINY_SDXL_CONFIG),
            "--train_data_dir", str(workspace / "alpha"), "--caption_extension", ".txt", "--resolution", str(SIZE),
            "--train_batch_size", "2", "--alpha_mask", "--flip_aug", *_common(tmp_path / "out")]
    assert sdxl_train_network_cat.main(argv) == 0
    _check_masked_steps(steps, ALPHAS)


def test_flux_trains_with_conditioning_masks(workspace, tmp_path, monkeypatch):
    save_bfl_files(build_tiny_flux(seed=0), tmp_path)
    steps = _record(monkeypatch)
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "flux1-dev.safetensors"),
            "--clip_l", str(tmp_path / "clip_l.safetensors"), "--t5xxl", str(tmp_path / "t5xxl.safetensors"),
            "--ae", str(tmp_path / "ae.safetensors"), "--model_config", str(TINY_FLUX_CONFIG),
            "--network_module", "networks.lora_flux", "--model_prediction_type", "raw", "--masked_loss", "--flip_aug",
            "--dataset_config", _config(tmp_path, "ds", _mask_subset(workspace)), *_common(tmp_path / "out")]
    assert flux_train_network_cat.main(argv) == 0
    _check_masked_steps(steps, MASKS)


# --- refusals ---------------------------------------------------------------------------------------


def _refusal_cases(root):
    train = root / "data" / "train" / "2_sks teapot"
    short = root / "short_masks"
    short.mkdir(exist_ok=True)
    for stem in ("000", "001", "002"):
        shutil.copy(root / "masks" / f"{stem}.png", short / f"{stem}.png")
    extra = root / "extra_masks"
    shutil.copytree(root / "masks", extra, dirs_exist_ok=True)
    shutil.copy(root / "masks" / "000.png", extra / "999.png")
    small = root / "small_masks"
    small.mkdir(exist_ok=True)
    for stem in MASKS:
        _save_gray(small / f"{stem}.png", np.zeros((32, 32)))
    plain = f'[[datasets.subsets]]\nimage_dir = "{train}"\n'
    return {
        "no_masked_loss": ((_mask_subset(root),), (), "conditioning_data_dir is read only with --masked_loss"),
        "mixed": ((_mask_subset(root) + plain,), ("--masked_loss",),
                  "subsets #1 have a conditioning_data_dir and the others do not"),
        "is_reg": ((_mask_subset(root, extra="is_reg = true\n"),), ("--masked_loss",),
                   "is_reg is not a key of a subset with conditioning_data_dir"),
        "alpha_in_mask_subset": ((_mask_subset(root, extra="alpha_mask = true\n"),), ("--masked_loss",),
                                 "alpha_mask is not a key of a subset with conditioning_data_dir"),
        "missing": ((_mask_subset(root, short),), ("--masked_loss",), "has no mask for 003.png"),
        "extra": ((_mask_subset(root, extra),), ("--masked_loss",), "has masks for no image of"),
        "not_a_folder": ((_mask_subset(root, root / "nowhere"),), ("--masked_loss",), "nowhere is not a folder"),
        "size": ((_mask_subset(root, small), "enable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 64\n"),
                 ("--masked_loss",), "with enable_bucket a mask must have its image's size"),
        "no_source": ((plain,), ("--masked_loss",), "--masked_loss is on but no image has a mask"),
        "alpha_in_general": ((plain, "alpha_mask = true\n"), (), "unknown key 'alpha_mask'"),
    }


@pytest.mark.parametrize("case", ["no_masked_loss", "mixed", "is_reg", "alpha_in_mask_subset", "missing", "extra",
                                  "not_a_folder", "size", "no_source", "alpha_in_general"])
def test_mask_mistakes_are_refused_before_training(workspace, tmp_path, capsys, case):
    config_args, extra, message = _refusal_cases(workspace)[case]
    subsets, *general = config_args
    if general and case == "size":  # dataset-level bucket settings
        subsets, general = general[0] + subsets, []
    config = _config(tmp_path, "ds", subsets, general[0] if general else "")
    out = tmp_path / "out"
    assert train_network_cat.main(_sd_argv(workspace, out, "--dataset_config", config, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (out / "cat.safetensors").exists()


def test_the_conditioning_data_dir_flag_is_refused_with_the_way_to_give_masks(workspace, tmp_path, capsys):
    argv = _sd_argv(workspace, tmp_path / "out", "--masked_loss", "--conditioning_data_dir", str(workspace / "masks"),
                    "--train_data_dir", str(workspace / "data" / "train"), "--resolution", str(SIZE))
    assert train_network_cat.main(argv) == 2
    assert "set conditioning_data_dir in each [[datasets.subsets]]" in capsys.readouterr().err
