"""`evaluate_kps.py` end to end on the tiny SD model and a tiny open_clip model; bad input stops it early."""

import json

import pytest
import torch
from PIL import Image

import evaluate_kps
import networks.lora_cat as lora_cat
from library.errors import UserInputError
from library.evaluation.kps_clip import load_clip
from library.evaluation.kps_images import Adapter, GenerationSettings, PlannedImage, cache_key
from library.evaluation.kps_metrics import SIMILARITY_FLOOR, knowledge_preservation_score, pairwise_similarities
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
    settings = GenerationSettings("model", "ddim", 4, 7.5, 64, 64, "float32", "cpu")
    image = PlannedImage("a", "with_trigger", "a photo of sks teapot", 0, 0)
    lora = Adapter("a", None, "lora-bytes")
    key = cache_key(image, lora, settings)
    assert key == cache_key(PlannedImage("b", "identity", image.prompt, 0, 5), Adapter("b", None, "lora-bytes"), settings)
    assert key != cache_key(image, lora, GenerationSettings("model", "ddim", 5, 7.5, 64, 64, "float32", "cpu"))
    assert key != cache_key(PlannedImage("a", "with_trigger", image.prompt, 1, 0), lora, settings)
    assert key != cache_key(image, Adapter("a", None, "other-bytes"), settings)


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
