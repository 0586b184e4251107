"""FLUX.1's text side as the benches use it: fixed random T5 states and CLIP-L pooled vectors for two
captions (the trigger one and the trigger-free one), looked up through the trainer's own text-encoder
cache, as training with `--cache_text_encoder_outputs` looks them up. No text encoder is built."""

from __future__ import annotations

T5_TOKENS = 256  # schnell's T5 length (dev trains with 512): a CPU-sized text stream


def cached_flux_denoiser(transformer, device, t5_tokens: int = T5_TOKENS):
    """(denoiser, trigger ids, free ids): the FLUX denoiser behind a cache of two captions' states, and
    each caption's ids (batch 1; `expand` them to the batch)."""
    import torch

    from library.families.flux.denoiser import FluxDenoiser, FluxTextStates
    from library.training.text_cache import CachedTextDenoiser, TextEncoderCache

    config = transformer.config
    generator = torch.Generator().manual_seed(1)
    captions = [torch.full((1,), index, dtype=torch.int64) for index in range(2)]
    cache = TextEncoderCache.of(
        (ids, FluxTextStates(torch.randn(1, t5_tokens, config.joint_attention_dim, generator=generator),
                             torch.randn(1, config.pooled_projection_dim, generator=generator), None))
        for ids in captions
    )
    denoiser = FluxDenoiser(transformer, None, None, guidance_scale=1.0)
    return CachedTextDenoiser(denoiser, cache, torch.device(device)), captions[0], captions[1]
