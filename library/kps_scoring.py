"""From generated image files to PS, IS and KPS per adapter, with every pairwise similarity kept.

Images are embedded from the PNG files on disk (not from the pipeline's output in memory), so the
scores can be recomputed from the saved images alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from library.kps_clip import ClipEmbedder
from library.kps_images import PlannedImage, PromptPair
from library.kps_metrics import Score, identity_score, knowledge_preservation_score, pairwise_similarities, prompt_score


@dataclass
class AdapterScores:
    """The three scores of one adapter (IS None without training images) and the similarities behind them."""

    prompt: Score
    identity: Score | None
    preservation: Score
    similarities: dict[str, list[dict]] = field(default_factory=dict)


def score_adapters(
    embedder: ClipEmbedder,
    adapter_names: Sequence[str],
    files: dict[PlannedImage, Path],
    pairs: Sequence[PromptPair],
    training_images: Sequence[Path],
) -> dict[str, AdapterScores]:
    """PS, IS and KPS of each adapter from the image files of `files`."""
    images = sorted(set(files.values()) | set(training_images))
    image_embeddings = dict(zip(images, embedder.images(images)))
    texts = sorted({pair.caption_part for pair in pairs})
    text_embeddings = dict(zip(texts, embedder.texts(texts)))
    by_role = {(image.adapter, image.role, image.source, image.seed): path for image, path in files.items()}

    def similarities(left: list, right: list[Path], left_embeddings: dict) -> list[float]:
        return pairwise_similarities(
            torch.stack([left_embeddings[x] for x in left]), torch.stack([image_embeddings[p] for p in right])
        )

    results = {}
    for name in adapter_names:
        with_trigger = sorted((k, p) for k, p in by_role.items() if k[0] == name and k[1] == "with_trigger")
        keys = [key for key, _ in with_trigger]
        generated = [path for _, path in with_trigger]
        without = [by_role[(name, "without_trigger", source, seed)] for _, _, source, seed in keys]
        captions = [pairs[source].caption_part for _, _, source, _ in keys]
        prompt_sims = similarities(captions, generated, text_embeddings)
        preservation_sims = similarities(without, generated, image_embeddings)

        identity = sorted((k, p) for k, p in by_role.items() if k[0] == name and k[1] == "identity")
        originals = [training_images[source] for (_, _, source, _), _ in identity]
        identity_sims = similarities(originals, [p for _, p in identity], image_embeddings) if identity else []

        results[name] = AdapterScores(
            prompt=prompt_score(prompt_sims),
            identity=identity_score(identity_sims) if identity_sims else None,
            preservation=knowledge_preservation_score(preservation_sims),
            similarities={
                "prompt": [
                    {"prompt_index": k[2], "seed": k[3], "text": t, "image": str(p), "similarity": s}
                    for k, t, p, s in zip(keys, captions, generated, prompt_sims)
                ],
                "preservation": [
                    {"prompt_index": k[2], "seed": k[3], "without_trigger": str(w), "with_trigger": str(p), "similarity": s}
                    for k, w, p, s in zip(keys, without, generated, preservation_sims)
                ],
                "identity": [
                    {"training_index": k[2], "seed": k[3], "original": str(o), "generated": str(p), "similarity": s}
                    for (k, p), o, s in zip(identity, originals, identity_sims)
                ],
            },
        )
    return results
