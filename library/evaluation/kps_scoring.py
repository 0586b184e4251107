"""From generated image files to PS, IS and KPS per adapter, with every pairwise similarity kept.

Images are embedded from the PNG files on disk (not from the pipeline's output in memory), so the
scores can be recomputed from the saved images alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import Tensor

from library.evaluation.kps_clip import ClipEmbedder
from library.evaluation.kps_images import PlannedImage, PromptPair
from library.evaluation.kps_metrics import Score, identity_score, knowledge_preservation_score, pairwise_similarities, prompt_score


@dataclass
class AdapterScores:
    """The three scores of one adapter (IS None without training images) and the similarities behind them."""

    prompt: Score
    identity: Score | None
    preservation: Score
    similarities: dict[str, list[dict]]  # "prompt", "preservation", "identity": one row per pair


def score_adapters(
    embedder: ClipEmbedder,
    adapter_names: Sequence[str],
    files: dict[PlannedImage, Path],
    pairs: Sequence[PromptPair],
    training_images: Sequence[Path],
) -> dict[str, AdapterScores]:
    """PS, IS and KPS of each adapter from the image files of `files`."""
    # Each distinct file and text is embedded once; roles that share an image share its embedding.
    images = sorted(set(files.values()) | set(training_images))
    image_embeddings = dict(zip(images, embedder.images(images)))
    texts = sorted({pair.caption_part for pair in pairs})
    text_embeddings = dict(zip(texts, embedder.texts(texts)))

    results = {}
    for name in adapter_names:
        mine = {(image.role, image.source, image.seed): path for image, path in files.items() if image.adapter == name}
        prompt_rows, preservation_rows, identity_rows = [], [], []
        for role, source, seed in sorted(mine):
            generated = mine[(role, source, seed)]
            if role == "with_trigger":
                text, without = pairs[source].caption_part, mine[("without_trigger", source, seed)]
                prompt_rows.append({
                    "prompt_index": source, "seed": seed, "text": text, "image": str(generated),
                    "similarity": _similarity(text_embeddings[text], image_embeddings[generated]),
                })
                preservation_rows.append({
                    "prompt_index": source, "seed": seed, "without_trigger": str(without), "with_trigger": str(generated),
                    "similarity": _similarity(image_embeddings[without], image_embeddings[generated]),
                })
            elif role == "identity":
                original = training_images[source]
                identity_rows.append({
                    "training_index": source, "seed": seed, "original": str(original), "generated": str(generated),
                    "similarity": _similarity(image_embeddings[original], image_embeddings[generated]),
                })
        results[name] = AdapterScores(
            prompt=prompt_score(_values(prompt_rows)),
            identity=identity_score(_values(identity_rows)) if identity_rows else None,
            preservation=knowledge_preservation_score(_values(preservation_rows)),
            similarities={"prompt": prompt_rows, "preservation": preservation_rows, "identity": identity_rows},
        )
    return results


def _similarity(a: Tensor, b: Tensor) -> float:
    return pairwise_similarities(a[None], b[None])[0]


def _values(rows: list[dict]) -> list[float]:
    return [row["similarity"] for row in rows]
