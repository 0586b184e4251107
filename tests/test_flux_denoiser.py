"""FLUX.1's denoiser (library.families.flux.denoiser): packing, position ids, timesteps, guidance and
the T5 mask, checked against diffusers' FluxPipeline and transformer on tiny seeded models."""

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.families.flux.denoiser import (
    CLIP_TOKENS, FluxDenoiser, FluxTextStates, image_ids, pack_latents, unpack_latents,
)

TINY_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        axes_dims_rope=[4, 6, 6])


def _transformer(guidance: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_TRANSFORMER, guidance_embeds=guidance).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # the zero-initialised output layers would hide every input
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def _encoders() -> tuple[CLIPTextModel, T5EncoderModel]:
    torch.manual_seed(1)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                        vocab_size=1000, max_position_embeddings=77, projection_dim=32, eos_token_id=2))
    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    return clip.eval(), t5.eval()


def _text(batch: int = 2, length: int = 12) -> FluxTextStates:
    generator = torch.Generator().manual_seed(3)
    return FluxTextStates(torch.randn(batch, length, 32, generator=generator), torch.randn(batch, 32, generator=generator), None)


def test_packing_matches_diffusers_and_round_trips():
    latents = torch.randn(2, 16, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    ids = image_ids(8, 6, torch.device("cpu"), torch.float32)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32))


@torch.no_grad()
def test_predict_is_the_transformer_at_sigma_with_guidance():
    transformer = _transformer()
    denoiser = FluxDenoiser(transformer, clip_l=None, t5=None)
    latents, text = torch.randn(2, 16, 4, 4), _text()
    guidance = torch.tensor([3.5, 3.5])
    got = denoiser.predict(latents, torch.tensor([500.0, 250.0]), text, guidance=guidance)
    direct = transformer(hidden_states=pack_latents(latents), encoder_hidden_states=text.states,
                         pooled_projections=text.pooled, timestep=torch.tensor([0.5, 0.25]),
                         img_ids=image_ids(4, 4, torch.device("cpu"), torch.float32), txt_ids=torch.zeros(12, 3),
                         guidance=guidance).sample
    assert torch.equal(got, unpack_latents(direct, 4, 4)) and got.shape == latents.shape
    other = denoiser.predict(latents, torch.tensor([500.0, 250.0]), text, guidance=torch.tensor([1.0, 1.0]))
    assert not torch.allclose(got, other), "the guidance value reaches FLUX.1-dev's guidance embedding"
    with pytest.raises(ValueError, match="guidance"):
        denoiser.predict(latents, torch.tensor([500.0, 250.0]), text)
    told_default = FluxDenoiser(transformer, clip_l=None, t5=None, guidance_scale=3.5)
    assert torch.equal(told_default.predict(latents, torch.tensor([500.0, 250.0]), text), got), \
        "without the batch's guidance, the run's --guidance_scale"


@torch.no_grad()
def test_schnell_ignores_guidance():
    denoiser = FluxDenoiser(_transformer(guidance=False), clip_l=None, t5=None)
    latents, text, t = torch.randn(1, 16, 4, 4), _text(1), torch.tensor([700.0])
    assert torch.equal(denoiser.predict(latents, t, text), denoiser.predict(latents, t, text, guidance=torch.tensor([9.0])))


@torch.no_grad()
def test_encode_takes_clip_pooled_and_t5_states_and_masks_t5_padding():
    clip, t5 = _encoders()
    clip_ids = torch.randint(3, 1000, (2, CLIP_TOKENS))
    t5_ids = torch.tensor([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]])
    ids = torch.cat([clip_ids, t5_ids], dim=1)
    unmasked = FluxDenoiser(_transformer(), clip, t5).encode(ids)
    assert torch.equal(unmasked.pooled, clip(clip_ids).pooler_output)
    assert torch.equal(unmasked.states, t5(t5_ids).last_hidden_state) and unmasked.mask is None
    masked = FluxDenoiser(_transformer(), clip, t5, apply_t5_attn_mask=True).encode(ids)
    assert torch.equal(masked.mask, t5_ids != 0)


@torch.no_grad()
def test_with_the_mask_padding_states_do_not_reach_the_prediction():
    mask = torch.tensor([[True] * 4 + [False] * 8, [True] * 6 + [False] * 6])
    text = _text()
    noisy = text.states.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 32)
    latents, t, g = torch.randn(2, 16, 4, 4), torch.tensor([400.0, 600.0]), torch.tensor([3.5, 3.5])
    denoiser = FluxDenoiser(_transformer(), clip_l=None, t5=None)
    with_mask = [denoiser.predict(latents, t, FluxTextStates(s, text.pooled, mask), guidance=g) for s in (text.states, noisy)]
    assert torch.allclose(with_mask[0], with_mask[1], atol=1e-6), "masked padding changes nothing"
    without = [denoiser.predict(latents, t, FluxTextStates(s, text.pooled, None), guidance=g) for s in (text.states, noisy)]
    assert not torch.allclose(without[0], without[1], atol=1e-4), "unmasked padding is attended to"
