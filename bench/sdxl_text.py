"""SDXL's text side as the benches use it: fixed random text states for two captions (the trigger one
and the trigger-free one), looked up through the trainer's own text-encoder cache, as training with
`--cache_text_encoder_outputs` looks them up. No text encoder is built."""

from __future__ import annotations

TOKENS = 77  # one 77-token window per caption, as SDXL encodes prompts without --max_token_length


def cached_sdxl_denoiser(unet, device):
    """(denoiser, trigger ids, free ids): the SDXL denoiser behind a cache of two captions' states,
    and each caption's ids (batch 1; `expand` them to the batch). The pooled width is what the
    text-time embedding takes beside the six size/crop numbers (2816 - 6 * 256 = 1280 for SDXL base)."""
    import torch

    from library.families.sdxl.denoiser import SDXLDenoiser, SDXLTextStates
    from library.training.text_cache import CachedTextDenoiser, TextEncoderCache

    config = unet.config
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    generator = torch.Generator().manual_seed(1)
    captions = [torch.full((1,), index, dtype=torch.int64) for index in range(2)]
    cache = TextEncoderCache.of(
        (ids, SDXLTextStates(torch.randn(1, TOKENS, config.cross_attention_dim, generator=generator),
                             torch.randn(1, pooled_width, generator=generator)))
        for ids in captions
    )
    return CachedTextDenoiser(SDXLDenoiser(unet, None, None), cache, torch.device(device)), captions[0], captions[1]
