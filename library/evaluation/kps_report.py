"""What `evaluate_kps.py` writes: results.json, results.md (the paper's Table 1 shape) and one grid per adapter."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from library.evaluation.kps_images import PlannedImage, PromptPair, save_png
from library.evaluation.kps_metrics import Score
from library.evaluation.kps_scoring import AdapterScores

GRID_COLUMNS = ("base: y", "LoRA: y", "LoRA: y_T")  # y without the trigger, y_T with it
LABEL_HEIGHT = 14


def results_json(
    settings: dict, conditioning: dict[str, dict], scores: dict[str, AdapterScores], files: dict[PlannedImage, Path],
    pairs: Sequence[PromptPair], generated: int,
) -> dict:
    """Every score, every image with its role, and every pairwise similarity; `conditioning`: by adapter, how its
    prompts were encoded (clip skip, token length, where each came from)."""
    return {
        "settings": settings,
        "conditioning": conditioning,
        "images_generated": generated,
        "images_reused": len(set(files.values())) - generated,
        "prompts": [asdict(pair) for pair in pairs],
        "scores": {
            name: {"PS": _score(s.prompt), "IS": _score(s.identity), "KPS": _score(s.preservation)}
            for name, s in scores.items()
        },
        "images": [{**asdict(image), "path": str(path)} for image, path in files.items()],
        "similarities": {name: s.similarities for name, s in scores.items()},
    }


def results_table(scores: dict[str, AdapterScores]) -> str:
    """A Markdown table shaped like the paper's Table 1, with the number of similarities (and clamped) per score."""
    lines = [
        "| adapter | PS | IS | KPS | n (PS/KPS) | n (IS) | clamped PS / IS / KPS |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        identity_n = s.identity.count if s.identity else 0
        clamped = " / ".join(str(x.clamped) if x else "-" for x in (s.prompt, s.identity, s.preservation))
        lines.append(
            f"| {name} | {_value(s.prompt)} | {_value(s.identity)} | {_value(s.preservation)} "
            f"| {s.prompt.count} | {identity_n} | {clamped} |"
        )
    return "\n".join(lines) + "\n"


def write_grid(
    path: Path, adapter: str, base: str, files: dict[PlannedImage, Path], prompt_count: int, seed: int
) -> None:
    """Rows: prompts (first seed); columns: base model without trigger, adapter without, adapter with."""
    by_role = {(i.adapter, i.role, i.source): p for i, p in files.items() if i.seed == seed}
    columns = ((base, "without_trigger"), (adapter, "without_trigger"), (adapter, "with_trigger"))  # GRID_COLUMNS
    rows = [[by_role[(name, role, k)] for name, role in columns] for k in range(prompt_count)]
    with Image.open(rows[0][0]) as first:
        width, height = first.size
    grid = Image.new("RGB", (width * len(GRID_COLUMNS), LABEL_HEIGHT + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(GRID_COLUMNS):
        draw.text((column * width + 2, 1), label, fill="black")
    for r, row in enumerate(rows):
        for c, image_path in enumerate(row):
            with Image.open(image_path) as image:
                grid.paste(image.convert("RGB"), (c * width, LABEL_HEIGHT + r * height))
    save_png(grid, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _score(score: Score | None) -> dict | None:
    return asdict(score) if score is not None else None


def _value(score: Score | None) -> str:
    return f"{score.value:.4f}" if score is not None else "-"
