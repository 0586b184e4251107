"""`evaluate_kps.py` end to end on the tiny SD model and a tiny open_clip model; bad input stops it early."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import evaluate_kps
import networks.lora_cat as lora_cat
from library.errors import UserInputError
from library.evaluation.kps_clip import load_clip
from library.evaluation.kps_conditioning import Conditioning
from library.evaluation.kps_images import Adapter, GenerationSettings, PlannedImage, cache_key
from library.evaluation.kps_metrics import SIMILARITY_FLOOR, knowledge_preservation_score, pairwise_similarities
from library.families.prompt_tokens import tokenize
from library.families.sd.denoiser import SDDenoiser
from library.families.sd.models import load_stable_diffusion
from networks.lora_cat.file_format import read_lora_file, save_lora_file
from library.testing.tiny_clip import TINY_CLIP_CONFIG, save_tiny_open_clip
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir

CAPTIONS = ["a photo of sks teapot", "sks teapot on a table"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny model as a single file, one LoRA with random weights, tiny CLIP weights, two captioned images."""
    root = tmp_path_factory.mktemp("kps")
    models = build_tiny_sd(seed=0)
    save_single_file(models, root / "tiny.safetensors")
    network = lora_cat.create_network(1.0, 4, 4, models.vae, models.text_encoder, models.unet)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for lora in network.all_loras:
            lora.lora_up.weight.normal_(std=0.2)  # fresh LoRAs start at zero: give this one an effect
    network.save_weights(root / "random_lora.safetensors", torch.float32, {})
    save_tiny_open_clip(root / "clip.safetensors")
    folder = root / "train" / "1_sks teapot"
    folder.mkdir(parents=True)
    for index, (caption, color) in enumerate(zip(CAPTIONS, ("red", "blue"))):
        Image.new("RGB", (64, 64), color).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption + "\n")
    return root


def _argv(workspace, out, *extra, lora=None):
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"), "--model_config", str(tiny_config_dir(False)),
        "--lora", str(lora or workspace / "random_lora.safetensors"), "--trigger", "sks",
        "--train_data_dir", str(workspace / "train"), "--clip_model", str(TINY_CLIP_CONFIG),
        "--clip_pretrained", str(workspace / "clip.safetensors"), "--sample_steps", "4", "--seed", "3",
        "--device", "cpu", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def run(workspace):
    """One evaluation (base model + one LoRA, the two training captions as prompts, one seed)."""
    out = workspace / "out"
    assert evaluate_kps.main(_argv(workspace, out)) == 0
    return out, json.loads((out / "results.json").read_text())


def test_files_written(run):
    out, results = run
    assert (out / "results.md").read_text().count("\n") == 4, "header, separator, base model, one LoRA"
    assert sorted(p.name for p in out.glob("grid_*.png")) == ["grid_random_lora.png"]
    with Image.open(out / "grid_random_lora.png") as grid:
        assert grid.size == (3 * 64, 14 + 2 * 64), "3 columns of 64-px images, a label row, one row per prompt"
    # 2 adapters x 2 prompts x (with, without trigger); the identity images are the with-trigger ones.
    assert len(list((out / "images").glob("*.png"))) == 8 and results["images_generated"] == 8
    roles = {(i["adapter"], i["role"]) for i in results["images"]}
    assert roles == {(a, r) for a in ("base model", "random_lora") for r in ("with_trigger", "without_trigger", "identity")}
    assert all((out / "images" / i["path"].split("/")[-1]).is_file() for i in results["images"])


def test_scores_within_their_ranges(run):
    _, results = run
    assert set(results["scores"]) == {"base model", "random_lora"}
    for scores in results["scores"].values():
        for name, count in (("PS", 2), ("IS", 2), ("KPS", 2)):
            score = scores[name]
            assert score["count"] == count and 0 <= score["clamped"] <= count
        assert SIMILARITY_FLOOR <= scores["PS"]["value"] <= 1 and SIMILARITY_FLOOR <= scores["IS"]["value"] <= 1
        assert 0 <= scores["KPS"]["value"] <= 1 - SIMILARITY_FLOOR


def test_each_row_is_computed_on_its_own_images_with_shared_seeds(run):
    _, results = run
    by_path = {}
    for image in results["images"]:
        by_path.setdefault(image["path"], []).append(image)
    for adapter in ("base model", "random_lora"):
        pairs = results["similarities"][adapter]["preservation"]
        assert len(pairs) == 2
        for pair in pairs:
            without, with_ = by_path[pair["without_trigger"]], by_path[pair["with_trigger"]]
            assert {(i["adapter"], i["role"]) for i in without} == {(adapter, "without_trigger")}
            assert (adapter, "with_trigger") in {(i["adapter"], i["role"]) for i in with_}
            assert {i["seed"] for i in without + with_} == {3}
            assert "sks" in with_[0]["prompt"] and "sks" not in without[0]["prompt"]
    base_images = {i["path"] for i in results["images"] if i["adapter"] == "base model"}
    lora_images = {i["path"] for i in results["images"] if i["adapter"] == "random_lora"}
    assert not base_images & lora_images, "the LoRA changes the images, so no file is shared"


def test_kps_recomputed_from_the_saved_images_equals_the_reported_one(run, workspace):
    _, results = run
    clip = load_clip(str(TINY_CLIP_CONFIG), str(workspace / "clip.safetensors"), "cpu")
    for adapter, scores in results["scores"].items():
        pairs = results["similarities"][adapter]["preservation"]
        without = clip.images([p["without_trigger"] for p in pairs])
        with_ = clip.images([p["with_trigger"] for p in pairs])
        recomputed = knowledge_preservation_score(pairwise_similarities(without, with_))
        assert recomputed.value == pytest.approx(scores["KPS"]["value"], abs=1e-6)


def test_a_rerun_reuses_every_image(run, workspace):
    out, first = run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    assert evaluate_kps.main(_argv(workspace, out)) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["images_generated"] == 0 and again["images_reused"] == 8
    assert {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == stamps
    assert again["scores"] == first["scores"]


def test_the_cache_key_changes_with_what_decides_the_pixels():
    settings = GenerationSettings("model", "sd_v1 StableDiffusionPipeline", "ddim", 4, 7.5, 64, 64, "float32", "cpu")
    image = PlannedImage("a", "with_trigger", "a photo of sks teapot", 0, 0)
    lora = Adapter("a", None, "lora-bytes", Conditioning())
    key = cache_key(image, lora, settings)
    same = Adapter("b", None, "lora-bytes", Conditioning())
    assert key == cache_key(PlannedImage("b", "identity", image.prompt, 0, 5), same, settings)
    assert key != cache_key(image, lora, replace(settings, steps=5))
    assert key != cache_key(image, lora, replace(settings, family="sdxl_base_v1-0 StableDiffusionXLPipeline"))
    assert key != cache_key(PlannedImage("a", "with_trigger", image.prompt, 1, 0), lora, settings)
    assert key != cache_key(image, Adapter("a", None, "other-bytes", Conditioning()), settings)
    assert key != cache_key(image, Adapter("a", None, "lora-bytes", Conditioning(clip_skip=2)), settings)
    assert key != cache_key(image, Adapter("a", None, "lora-bytes", Conditioning(max_token_length=150)), settings)


# --- prompts encoded as the LoRA was trained (clip skip, token length) ------------------------------

PROMPT = "a photo of sks teapot"


def _lora_with_metadata(workspace, name, **metadata):
    """The random LoRA's layers, with training metadata of our choosing."""
    tensors, existing = read_lora_file(workspace / "random_lora.safetensors")
    save_lora_file(workspace / f"{name}.safetensors", tensors, {**existing, **metadata})
    return workspace / f"{name}.safetensors"


def _one_prompt_argv(workspace, out, loras, *extra):
    """One prompt, one seed, two sampling steps and no training images: 2 images per row."""
    prompts = workspace / "one_prompt.txt"
    prompts.write_text(PROMPT + "\n")
    return [
        "--pretrained_model_name_or_path", str(workspace / "tiny.safetensors"), "--model_config", str(tiny_config_dir(False)),
        "--lora", *map(str, loras), "--trigger", "sks", "--prompt_file", str(prompts), "--clip_model", str(TINY_CLIP_CONFIG),
        "--clip_pretrained", str(workspace / "clip.safetensors"), "--sample_steps", "2", "--seed", "3",
        "--device", "cpu", "--output_dir", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def trained_conditioning(workspace):
    """skip2 (ss_clip_skip 2) and long (ss_max_token_length 150) evaluated without flags; the prompt
    embeddings the pipeline got for each image, in generation order (row by row, y_T before y)."""
    skip2 = _lora_with_metadata(workspace, "skip2", ss_clip_skip="2", ss_max_token_length="None")
    long = _lora_with_metadata(workspace, "long", ss_max_token_length="150")  # no ss_clip_skip at all
    calls, original = [], StableDiffusionPipeline.__call__

    def recording_call(pipe, *args, **kwargs):
        calls.append((kwargs["prompt_embeds"].clone(), kwargs["negative_prompt_embeds"].clone()))
        return original(pipe, *args, **kwargs)

    out = workspace / "conditioning"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "__call__", recording_call)
        assert evaluate_kps.main(_one_prompt_argv(workspace, out, [skip2, long])) == 0
    return out, json.loads((out / "results.json").read_text()), calls


def test_results_record_each_row_s_conditioning_and_where_it_came_from(trained_conditioning):
    _, results, calls = trained_conditioning
    assert results["conditioning"] == {
        "base model": {"clip_skip": 2, "max_token_length": 75, "from": {"clip_skip": "as skip2", "max_token_length": "as skip2"}},
        "skip2": {"clip_skip": 2, "max_token_length": 75, "from": {"clip_skip": "ss_clip_skip", "max_token_length": "default"}},
        "long": {"clip_skip": 1, "max_token_length": 150,
                 "from": {"clip_skip": "default", "max_token_length": "ss_max_token_length"}},
    }
    assert len(calls) == 6, "3 rows x (y_T, y)"


def _trainer_states(models, clip_skip, max_token_length, texts):
    """The trainer's text conditioning of `texts`: its denoiser's encode of its tokenizer's ids."""
    with torch.no_grad():
        return SDDenoiser(models.unet, models.text_encoder, clip_skip).encode(
            tokenize(models.tokenizer, texts, max_token_length))


def test_the_prompt_embeddings_are_the_trainer_s_own_conditioning(workspace, trained_conditioning):
    _, results, calls = trained_conditioning
    texts = [PROMPT, results["prompts"][0]["without_trigger"]]
    models = load_stable_diffusion(workspace / "tiny.safetensors", model_config=tiny_config_dir(False))
    base = _trainer_states(models, 2, None, texts + [""])  # the base row takes skip2's clip skip
    for index, (embeds, negative) in enumerate(calls[:2]):
        assert torch.equal(embeds[0], base[index]) and torch.equal(negative[0], base[2])
    assert not torch.allclose(calls[0][0][0], _trainer_states(models, 1, None, [PROMPT])[0], atol=1e-3)

    # A LoRA row: the text encoder with the trainer's own adapter of that file attached.
    for row, (name, clip_skip, max_token_length) in enumerate([("skip2", 2, None), ("long", None, 150)], start=1):
        path = workspace / f"{name}.safetensors"
        network, _ = lora_cat.create_network_from_weights(1.0, path, models.vae, models.text_encoder, models.unet)
        network.apply_to(models.text_encoder, models.unet)
        network.load_weights(path)
        expected = _trainer_states(models, clip_skip, max_token_length, texts + [""])
        network.restore()
        for index, (embeds, negative) in enumerate(calls[2 * row:2 * row + 2]):
            assert embeds.shape == expected[index:index + 1].shape == (1, (max_token_length or 75) + 2, 32)
            assert torch.allclose(embeds[0], expected[index], atol=1e-5)
            assert torch.allclose(negative[0], expected[2], atol=1e-5)


def _pixels(results, adapter):
    """{(role, prompt, seed): pixels} of one row's images."""
    return {(i["role"], i["prompt"], i["seed"]): np.asarray(Image.open(i["path"]))
            for i in results["images"] if i["adapter"] == adapter}


def test_a_lora_trained_with_clip_skip_2_is_sampled_as_with_the_flag(workspace, trained_conditioning):
    _, from_metadata, _ = trained_conditioning
    out = workspace / "flags"
    assert evaluate_kps.main(_one_prompt_argv(workspace, out, [workspace / "skip2.safetensors"], "--clip_skip", "2")) == 0
    flagged = json.loads((out / "results.json").read_text())
    for adapter in ("skip2", "base model"):
        metadata_pixels, flag_pixels = _pixels(from_metadata, adapter), _pixels(flagged, adapter)
        assert metadata_pixels.keys() == flag_pixels.keys() and len(flag_pixels) == 2
        assert all(np.array_equal(metadata_pixels[k], flag_pixels[k]) for k in flag_pixels), adapter

    # Same folder, --clip_skip 1: no image made under clip skip 2 may be reused.
    assert evaluate_kps.main(_one_prompt_argv(workspace, out, [workspace / "skip2.safetensors"], "--clip_skip", "1")) == 0
    skip1 = json.loads((out / "results.json").read_text())
    assert skip1["images_generated"] == 4 and skip1["images_reused"] == 0
    assert skip1["conditioning"]["skip2"]["clip_skip"] == 1 and skip1["conditioning"]["base model"]["clip_skip"] == 1
    for adapter in ("skip2", "base model"):
        skip2_pixels, skip1_pixels = _pixels(from_metadata, adapter), _pixels(skip1, adapter)
        assert all(not np.array_equal(skip2_pixels[k], skip1_pixels[k]) for k in skip1_pixels), adapter


def test_a_lora_whose_metadata_holds_no_clip_skip_is_refused_early(workspace, tmp_path):
    bad = _lora_with_metadata(workspace, "bad_skip", ss_clip_skip="two")
    _fails_early(workspace, tmp_path, r"bad_skip\.safetensors has ss_clip_skip='two' in its metadata", lora=bad)


def test_clip_skip_below_1_stops_at_parse_time(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_kps.parse_args(_argv(workspace, tmp_path, "--clip_skip", "0"))
    assert "--clip_skip must be at least 1" in capsys.readouterr().err


def _fails_early(workspace, tmp_path, match, *extra, lora=None):
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match=match):
        evaluate_kps.evaluate(evaluate_kps.parse_args(_argv(workspace, out, *extra, lora=lora)))
    assert not (out / "images").exists(), "nothing was generated"


def test_a_lora_for_another_model_is_refused(workspace, tmp_path):
    tensors, metadata = read_lora_file(workspace / "random_lora.safetensors")
    renamed = {k.replace("lora_unet_mid_block", "lora_unet_mid_block_9"): v for k, v in tensors.items()}
    save_lora_file(tmp_path / "other.safetensors", renamed, metadata)
    _fails_early(workspace, tmp_path, "other.safetensors has .* layers that this model does not have",
                 lora=tmp_path / "other.safetensors")
    key = next(k for k in tensors if k.startswith("lora_unet") and k.endswith("lora_down.weight"))
    reshaped = {**tensors, key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1, *tensors[key].shape[2:])}
    save_lora_file(tmp_path / "wider.safetensors", reshaped, metadata)
    _fails_early(workspace, tmp_path, "wider.safetensors has .* but this model's layer needs",
                 lora=tmp_path / "wider.safetensors")


def test_a_missing_lora_or_clip_weights_file_is_named(workspace, tmp_path):
    _fails_early(workspace, tmp_path, "--lora file .*nowhere.safetensors does not exist",
                 lora=tmp_path / "nowhere.safetensors")
    _fails_early(workspace, tmp_path, "--clip_pretrained weights file .*missing_clip.safetensors does not exist",
                 "--clip_pretrained", str(tmp_path / "missing_clip.safetensors"))


def test_prompts_without_the_trigger_are_refused_with_their_line(workspace, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks teapot\na photo of a dog\n")
    _fails_early(workspace, tmp_path, r"'a photo of a dog' \(.*prompts.txt line 2\) holds none of the triggers",
                 "--prompt_file", str(prompts))


def test_conflicting_seed_flags_stop_at_parse_time(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_kps.parse_args(_argv(workspace, tmp_path, "--seeds", "1", "2"))
    assert "either --seeds" in capsys.readouterr().err


def test_clip_weights_for_another_clip_model_are_refused(workspace, tmp_path):
    other = json.loads(TINY_CLIP_CONFIG.read_text())
    other["embed_dim"] = 16
    config = tmp_path / "narrow_clip.json"
    config.write_text(json.dumps(other))
    with pytest.raises(UserInputError, match="could not be loaded into the open_clip model .*narrow_clip.json"):
        load_clip(str(config), str(workspace / "clip.safetensors"), "cpu")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_an_openai_torchscript_archive_loads_through_open_clip(tmp_path):
    """OpenAI's ViT-L-14.pt is a TorchScript archive; a tiny one traced from open_clip stands in for it."""
    import open_clip

    config = {  # widths of 64: OpenAI's layout has one 64-wide head per 64 channels
        "embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
    }
    config_path = tmp_path / "tiny_openai_clip.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        original = open_clip.create_model("tiny_openai_clip").eval()
    with torch.no_grad():  # OpenAI's weights are float16, and open_clip's loader rounds to it
        for parameter in original.parameters():
            parameter.copy_(parameter.half().float())
    # OpenAI's model keeps its causal mask as a plain attribute, out of the state dict.
    mask = original._buffers.pop("attn_mask")
    original.attn_mask = mask
    tokens = open_clip.get_tokenizer("tiny_openai_clip")(["a photo of a teapot"])
    images = torch.randn(1, 3, 32, 32)
    torch.jit.save(torch.jit.trace(original, (images, tokens), check_trace=False), tmp_path / "tiny.pt")

    clip = load_clip(str(config_path), str(tmp_path / "tiny.pt"), "cpu")
    with torch.no_grad():
        assert torch.allclose(clip.model.encode_text(tokens), original.encode_text(tokens), atol=1e-5)
        assert torch.allclose(clip.model.encode_image(images), original.encode_image(images), atol=1e-5)
