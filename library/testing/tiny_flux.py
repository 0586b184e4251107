"""A tiny FLUX.1-shaped model with seeded random weights, and writers for the files FLUX users have.

Built from `configs/models/tiny_flux`: a transformer of 0.14M parameters with FLUX.1's layout
(two double-stream and two single-stream blocks, guidance embedding as in dev, 64 input channels:
16 latent channels packed 2x2), a 16-channel 8x VAE with FLUX's scaling and shift, a 3-layer CLIP
text encoder (CLIP-L's role: only its pooled output is used) and a 2-layer T5 encoder with T5 v1.1's
gated-GELU feed-forward. The T5 tokenizer is a small Unigram trained here, offline, and committed
in `configs/models/tiny_flux/tokenizer_2/` (`build_tiny_t5_tokenizer` makes it again).

The writers produce a diffusers folder (what `FluxPipeline.from_pretrained` reads) or the four
single files of a ComfyUI/sd-scripts setup: the transformer in BFL layout, clip_l, t5xxl and ae.

    .venv/bin/python -m library.testing.tiny_flux   # rewrites configs/models/tiny_flux/tokenizer_2/
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from library.families.clip_tokenizer import EOS_TOKEN, build_clip_tokenizer
from library.families.flux.bfl_layout import diffusers_to_bfl
from library.families.flux.family import FluxModels
from library.families.flux.tokenizers import load_t5_tokenizer
from library.families.model_parts import MODEL_CONFIGS_DIR
from library.testing import ldm_layout
from library.testing.tiny_sd import perturb, write_state_dict

TINY_FLUX_CONFIG = MODEL_CONFIGS_DIR / "tiny_flux"
TINY_T5_TOKENIZER = TINY_FLUX_CONFIG / "tokenizer_2"

# T5's special tokens at T5's ids (<pad>=0, </s>=1, <unk>=2) and its 100 sentinels, which T5 keeps
# at the end of the vocabulary in reverse order (<extra_id_0> is the last id).
T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
T5_EXTRA_IDS = 100
TINY_T5_TRAINED_VOCAB = 512  # an upper bound: the word list below gives fewer pieces than that

# The training text of the tiny T5 tokenizer: words of image captions, so that test prompts get
# whole-word pieces as well as sub-word ones. Fixed, so the tokenizer is too.
_CAPTION_WORDS = """a an the of in on at with and or by for from to under over near behind beside
photo picture painting drawing illustration sketch render portrait landscape closeup view scene image
cat cats dog dogs bird birds horse fish tree trees flower flowers house houses car cars boat city street
road river lake sea ocean beach mountain mountains forest field garden sky cloud clouds sun moon star stars
man woman men women boy girl child children person people face eyes hair hand hands smile dress shirt hat
red orange yellow green blue purple pink white black gray brown golden silver bright dark light colorful
small large big tiny huge old young new beautiful cute happy sad quiet busy wet dry warm cold soft sharp
sitting standing running walking flying swimming sleeping looking holding wearing playing reading eating
table chair window door wall floor room kitchen bed book cup plate bottle lamp clock mirror sofa
morning evening night sunset sunrise winter summer spring autumn rain snow fog storm
detailed realistic cinematic lighting style art digital oil watercolor anime studio quality high resolution
sks ohwx token subject concept background foreground center left right top bottom two three many
""".split()


def build_tiny_flux(seed: int = 0, guidance: bool = True) -> FluxModels:
    """A tiny FLUX.1-dev-shaped model (schnell-shaped without `guidance`) whose weights depend only on `seed`.

    Every parameter is perturbed after the default init (`tiny_sd.perturb`): RMSNorm scales off 1 and
    biases off 0, so a conversion that drops or swaps one changes the outputs. The global RNG is left as it was.
    """
    config_dir = TINY_FLUX_CONFIG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer_config = FluxTransformer2DModel.load_config(config_dir, subfolder="transformer")
        transformer = FluxTransformer2DModel.from_config(transformer_config, guidance_embeds=guidance)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
        t5 = T5EncoderModel(T5Config.from_pretrained(config_dir, subfolder="text_encoder_2"))
        for model in (transformer, vae, clip_l, t5):
            perturb(model)
            if model.dtype != torch.float32:  # diffusers warns about a cast that changes nothing
                model.to(dtype=torch.float32)
            model.eval().requires_grad_(False)
    return FluxModels(
        transformer=transformer,
        vae=vae,
        clip_l=clip_l,
        t5=t5,
        clip_tokenizer=build_clip_tokenizer(pad_token=EOS_TOKEN),  # FLUX's CLIP-L pads as SD1's does
        t5_tokenizer=load_t5_tokenizer(TINY_T5_TOKENIZER),
        noise_scheduler=flux_scheduler(),
    )


# A transformer at FLUX.1's real width (hidden 3072 = 24 heads x 128) with one block of each kind, tiny
# text widths: diffusers' kohya FLUX LoRA converter splits linear1 at that width only, so a test of
# diffusers loading our files needs it (2 GB in float32).
FLUX_WIDE_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 56, 56], guidance_embeds=True,
)


def build_flux_wide(seed: int = 0) -> FluxModels:
    """The tiny FLUX.1 parts (`build_tiny_flux(seed)`) around a FLUX.1-wide transformer (`FLUX_WIDE_TRANSFORMER`,
    seeded by `seed + 1`, every parameter moved off its init so zero-initialised output layers hide nothing)."""
    models = build_tiny_flux(seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer = FluxTransformer2DModel(**FLUX_WIDE_TRANSFORMER)
        with torch.no_grad():
            for parameter in transformer.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
    models.transformer = transformer.eval().requires_grad_(False)
    return models


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's sampling schedule (shift 3, resolution-dependent shift), from the tiny config folder."""
    return FlowMatchEulerDiscreteScheduler.from_pretrained(TINY_FLUX_CONFIG, subfolder="scheduler", local_files_only=True)


def save_flux_diffusers_folder(parts: FluxModels, path: str | os.PathLike) -> Path:
    """Write `parts` as a diffusers FLUX folder: model_index.json, transformer/, vae/, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/, as FluxPipeline.from_pretrained reads it."""
    parts.pipeline().save_pretrained(path)
    return Path(path)


def _own_storage(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with storage of its own: safetensors refuses views and tensors that share storage."""
    return {key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}


def bfl_transformer_state_dict(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """The transformer's weights in BFL layout, as flux1-dev.safetensors (no prefix) has them."""
    return _own_storage(diffusers_to_bfl(transformer.state_dict(), transformer.config))


def clip_l_state_dict(clip_l: CLIPTextModel) -> dict[str, torch.Tensor]:
    """CLIP-L's weights under `text_model.`, as ComfyUI's clip_l.safetensors has them.

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel's own state dict; the
    files in the wild have it, and readers (sd-scripts, ComfyUI, diffusers) expect it.
    """
    return _own_storage({"text_model." + key.removeprefix("text_model."): tensor
                         for key, tensor in clip_l.state_dict().items()})


def t5_state_dict(t5: T5EncoderModel) -> dict[str, torch.Tensor]:
    """T5's weights as a transformers T5EncoderModel has them (`shared.weight`, `encoder.*`), like t5xxl_fp16.safetensors.

    `encoder.embed_tokens.weight` is the same tensor as `shared.weight` in the model; the file holds
    both, as the released one does (its 9.79 GB are the 4.76B parameters in fp16 plus a second copy
    of the 32128 x 4096 embedding).
    """
    return _own_storage(t5.state_dict())


def bfl_ae_state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights in BFL's ae.safetensors layout.

    BFL's autoencoder is LDM's with the names unchanged (`encoder.down.0.block.0.norm1`,
    `encoder.mid.attn_1.q` as 1x1 convs, `decoder.up.3.upsample.conv`, ...) and without LDM's
    `quant_conv`/`post_quant_conv`, which a FLUX VAE config (use_quant_conv false) has no weights
    for: so it is `ldm_layout.vae_to_ldm` without the `first_stage_model.` prefix. diffusers reads
    ae.safetensors with the same LDM VAE converter.
    """
    return _own_storage(ldm_layout.vae_to_ldm(vae.state_dict(), vae.config, prefix=""))


def save_bfl_files(parts: FluxModels, folder: str | os.PathLike) -> tuple[Path, Path, Path, Path]:
    """Write `parts` as the four files FLUX users have; returns (transformer, clip_l, t5, ae) paths.

    The transformer file is named flux1-dev.safetensors, or flux1-schnell.safetensors when it has
    no guidance embedding. All four are float32 (the released files are bf16/fp16).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    variant = "dev" if parts.transformer.config.guidance_embeds else "schnell"
    files = {
        folder / f"flux1-{variant}.safetensors": bfl_transformer_state_dict(parts.transformer),
        folder / "clip_l.safetensors": clip_l_state_dict(parts.clip_l),
        folder / "t5xxl.safetensors": t5_state_dict(parts.t5),
        folder / "ae.safetensors": bfl_ae_state_dict(parts.vae),
    }
    for path, state_dict in files.items():
        write_state_dict(state_dict, path)
    transformer_file, clip_l_file, t5_file, ae_file = files
    return transformer_file, clip_l_file, t5_file, ae_file


def _caption_corpus() -> list[str]:
    """Fixed pseudo-captions over `_CAPTION_WORDS` (each word in several contexts, capitalised at the
    start of a caption, with commas and full stops), and every letter, digit and common punctuation
    mark, so that test prompts seldom meet <unk>."""
    words = _CAPTION_WORDS
    characters = string.ascii_letters + string.digits + string.punctuation
    lines = [" ".join(words), " ".join(characters), characters]
    for i in range(len(words)):
        short = [words[(i * k) % len(words)] for k in range(1, 9)]
        long = [words[(i * k + 7) % len(words)] for k in range(3, 40, 3)]
        lines.append(" ".join(short).capitalize() + ", " + " ".join(long) + ".")
        lines.append(" ".join(short[::-1]))
    return lines


def _train_unigram_pieces() -> list[tuple[str, float]]:
    """A Unigram vocabulary (piece, log-probability) trained on `_caption_corpus`, in a fixed order.

    The trainer's output order among equal scores, and the last bits of the scores, vary between
    runs (it is multithreaded); scores are rounded and pieces sorted by (score, piece) to fix the ids.
    """
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=TINY_T5_TRAINED_VOCAB, special_tokens=T5_SPECIAL_TOKENS, unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(_caption_corpus(), trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]["vocab"]
    pieces = sorted(
        ((piece, round(score, 6)) for piece, score in trained if piece not in T5_SPECIAL_TOKENS),
        key=lambda item: (-item[1], item[0]),
    )
    return [(token, 0.0) for token in T5_SPECIAL_TOKENS] + pieces


def build_tiny_t5_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """Train the tiny T5 tokenizer and save it to `folder` (the same files on every call).

    transformers' T5 tokenizer builds T5's pipeline around the Unigram vocabulary: whitespace split
    and Metaspace ("▁" before each word), and a post-processor that appends </s>. `sentencepiece`,
    which real T5 tokenizers are made with, is not needed.
    """
    sentinels = [(f"<extra_id_{index}>", 0.0) for index in reversed(range(T5_EXTRA_IDS))]
    tokenizer = T5TokenizerFast(vocab=_train_unigram_pieces() + sentinels, extra_ids=T5_EXTRA_IDS)
    tokenizer.save_pretrained(folder)
    return load_t5_tokenizer(folder)


if __name__ == "__main__":
    built = build_tiny_t5_tokenizer(TINY_T5_TOKENIZER)
    print(f"wrote {TINY_T5_TOKENIZER} ({len(built)} tokens)")
