"""How evaluate_kps.py drives a pipeline: one LoRA at a time, cached images skipped, pairs share seeds; samplers."""

import importlib.util

import pytest
from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler
from PIL import Image

from library.errors import UserInputError
from library.evaluation.kps_conditioning import Conditioning
from library.evaluation.kps_images import Adapter, GenerationSettings, PromptPair, generate_images, plan_images
from library.sampling.samplers import SAMPLERS, inference_scheduler

SETTINGS = GenerationSettings("model", "sd_v1 StableDiffusionPipeline", "ddim", 4, 7.5, 8, 8, "float32", "cpu")
PAIRS = [PromptPair("a photo of sks teapot", "a photo of teapot", "a photo of teapot", "prompts.txt line 1")]


class RecordingPipe:
    """Stands in for StableDiffusionPipeline: records what was loaded when each image was generated."""

    def __init__(self):
        self.loaded, self.calls, self.negative = None, [], []

    def load_lora_weights(self, path, adapter_name):
        assert self.loaded is None, "a LoRA was loaded on top of another"
        self.loaded = path

    def unload_lora_weights(self):
        self.loaded = None

    def __call__(self, prompt_embeds, negative_prompt_embeds, generator, **kwargs):
        self.calls.append((self.loaded, prompt_embeds, generator.initial_seed()))
        self.negative.append(negative_prompt_embeds)
        return type("Output", (), {"images": [Image.new("RGB", (8, 8))]})()


def prompt_kwargs(prompt, negative_prompt, clip_skip, max_token_length):
    """Stands in for ModelFamily.prompt_kwargs: the "embeddings" are the prompt and the conditioning."""
    return {"prompt_embeds": (prompt, clip_skip, max_token_length), "negative_prompt_embeds": negative_prompt}


def test_one_lora_at_a_time_and_cached_images_are_not_regenerated(tmp_path):
    adapters = [Adapter("base model", None, None, Conditioning()), Adapter("a", tmp_path / "a.safetensors", "aa", Conditioning()),
                Adapter("b", tmp_path / "b.safetensors", "bb", Conditioning())]
    planned = plan_images(adapters, PAIRS, ["sks teapot"], seeds=[5, 6])
    pipe = RecordingPipe()
    files, generated = generate_images(pipe, prompt_kwargs, adapters, planned, SETTINGS, tmp_path / "images")
    assert generated == 18 and len(set(files.values())) == 18  # 3 adapters x 2 seeds x (y_T, y, identity)
    assert [loaded for loaded, _, _ in pipe.calls] == [None] * 6 + [str(tmp_path / "a.safetensors")] * 6 + [
        str(tmp_path / "b.safetensors")] * 6
    assert pipe.loaded is None, "the last LoRA was unloaded"
    assert (("a photo of sks teapot", 1, 75), 5) in [(p, s) for _, p, s in pipe.calls[:6]]
    assert (("a photo of teapot", 1, 75), 5) in [(p, s) for _, p, s in pipe.calls[:6]], "y and y_T share seed 5"

    (tmp_path / "images" / files[planned[-1]].name).unlink()  # one image of adapter b is missing
    again = RecordingPipe()
    _, generated = generate_images(again, prompt_kwargs, adapters, planned, SETTINGS, tmp_path / "images")
    assert generated == 1 and again.calls == [(str(tmp_path / "b.safetensors"), ("sks teapot", 1, 75), 6)]


def test_each_adapter_s_prompts_are_encoded_with_its_own_conditioning(tmp_path):
    adapters = [Adapter("base model", None, None, Conditioning(clip_skip=2)),
                Adapter("a", tmp_path / "a.safetensors", "aa", Conditioning(clip_skip=2)),
                Adapter("b", tmp_path / "b.safetensors", "bb", Conditioning(max_token_length=150))]
    pipe = RecordingPipe()
    generate_images(pipe, prompt_kwargs, adapters, plan_images(adapters, PAIRS, [], seeds=[5]), SETTINGS, tmp_path)
    assert [embeds[1:] for _, embeds, _ in pipe.calls] == [(2, 75)] * 4 + [(1, 150)] * 2
    assert pipe.negative == [""] * 6, "the negative prompt is empty, as the pipeline's own default"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy= notice inside diffusers
def test_samplers_keep_the_models_noise_schedule():
    training = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    scheduler = inference_scheduler("k_euler_a", training)
    assert isinstance(scheduler, EulerAncestralDiscreteScheduler)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(UserInputError, match="Unknown sampler 'plms'"):
        inference_scheduler("plms", training)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_every_sampler_name_builds_a_scheduler_that_sets_its_steps():
    training = DDPMScheduler(beta_schedule="scaled_linear", clip_sample=False)
    for name in SAMPLERS:
        if "lms" in name and importlib.util.find_spec("scipy") is None:
            with pytest.raises(UserInputError, match="needs scipy"):
                inference_scheduler(name, training)
            continue
        inference_scheduler(name, training).set_timesteps(4)
