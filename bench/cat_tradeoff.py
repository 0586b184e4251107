"""How to choose `--cat_weight` (alpha): drift against learning, plain LoRA and CAT at several alphas.

    .venv/bin/python -m bench.cat_tradeoff [--model tiny|small] [--alphas 0.25 0.5 1 2 4] [--steps 150]
        [--cat_prompts_row] [--budget_row [--budget X]] [--plot docs/cat_tradeoff.png] [--threads 1]

Builds the model (seeded random weights; `tiny`: configs/models/tiny_sd_v1, U-Net 1M parameters;
`small`: configs/models/small_sd_v1, 17.6M) as a diffusers folder and the demo dataset (4 images of
"sks teapot", 64 px), then trains one LoRA per setting with `train_network_cat.main(argv)` in this
process, everything else equal (seed, steps, learning rate, data, rank 4, U-Net and text encoder):
plain LoRA (`--cat_weight 0`), CAT at each alpha, and on request two steered runs:
`--cat_prompts_row` (alpha 1, and the CAT term also preserves K prompts drawn per step from a file of
class and unrelated scenes, `--cat_prompts`) and `--budget_row` (`--cat_drift_budget X`: alpha adapted
so that the CAT term's running mean stays near X; X is `--budget`, or by default the mean `loss/cat`
of the fixed-alpha run closest to 1 over its last steps). A trainer that does not know a flag yet
skips its row with a note.

Every model number is measured through diffusers alone: `StableDiffusionPipeline.from_pretrained` of
the model folder, `pipe.load_lora_weights(<the written .safetensors>)`, its text encoder and U-Net;
the base is the same pipeline before loading (checked equal again after `unload_lora_weights`).

- drift on a prompt set: the mean, over the set's prompts and the timesteps `TIMESTEPS`, of the mean
  squared difference between the adapted and the base U-Net's predictions, at latents and noise drawn
  once from the seed (one latent per prompt, the same for every LoRA): library.cat.preservation's
  `prediction_drift`, computed through diffusers.
- trigger-free drift: on the training captions with the trigger stripped
  (`library.cat.captions.trigger_free_caption`), the prompts CAT's term is trained on.
- held-out drift: on `HELD_OUT_PROMPTS`, prompts that share no word with any training caption (nor
  with the `--cat_prompts_row` file): generalisation to prompts training never saw; checked at start.
- trigger change: the same measure on the training captions, trigger included: what the LoRA learned.
- loss drop: the mean `loss/main` (the plain denoising loss) of the first `--loss_window` logged steps
  minus that of the last ones, read from the run's TensorBoard event files.
- cat term: the mean `loss/cat` over the last `--loss_window` steps (what `--cat_drift_budget` targets);
  alpha: the run's `--cat_weight`, or the mean logged `cat/alpha` over those steps for the budget row.

Prints a table and writes a PNG (PIL only): held-out drift (filled) and trigger-free drift (hollow)
against the trigger change, one point per setting, plain LoRA in red.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny": "tiny_sd_v1", "small": "small_sd_v1"}  # configs/models/<name>
TRIGGER = "sks"
RESOLUTION = 64
TIMESTEPS = (100, 300, 500, 700, 900)
# Scenes far from the training captions: no word in common with them (checked by `check_held_out`).
HELD_OUT_PROMPTS = (
    "mountains under stormy clouds",
    "two dogs running along the beach",
    "the city skyline at night",
    "portrait with long red hair",
    "bicycle leaning against brick wall",
    "green forest after rain",
    "sailboat drifting across calm water",
    "old man reading the newspaper",
)
# The --cat_prompts_row's file: the class and unrelated scenes, none of them held out, no word shared with them.
CAT_PROMPTS = (
    "a photo of a teapot", "a teapot on a table", "a cup of coffee", "a kettle on a stove",
    "a vase of flowers", "a photo of a cat", "a plate of food", "a chair in a room",
)


@dataclass(frozen=True)
class Setting:
    name: str
    alpha: float
    extra: tuple[str, ...] = ()  # trainer flags beyond --cat_weight


@dataclass(frozen=True)
class Row:
    name: str
    alpha: float  # --cat_weight, or the budget run's mean logged cat/alpha at the end
    held_out: float
    trigger_free: float
    trigger: float
    loss_drop: float
    cat_term: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CAT's drift/learning trade-off against --cat_weight")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss_window", type=int, default=None,
                        help="logged steps averaged at each end for the loss drop (default: a fifth of --steps)")
    parser.add_argument("--cat_prompts_row", action="store_true", help="add a run with --cat_prompts (alpha 1)")
    parser.add_argument("--cat_prompts_per_step", type=int, default=2)
    parser.add_argument("--cat_prompts_weight", type=float, default=1.0)
    parser.add_argument("--budget_row", action="store_true", help="add a run with --cat_drift_budget")
    parser.add_argument("--budget", type=float, default=None,
                        help="X for --budget_row (default: the final loss/cat of the fixed-alpha run closest to 1)")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "cat_tradeoff.png"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model's operations are too small to share, and "
                             "2 threads on a 2-core machine that runs anything else were 10x slower here)")
    parser.add_argument("--work_dir", default=None, help="keep the model, data, LoRAs and logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps < 2 or any(a <= 0 for a in args.alphas):
        parser.error("--steps must be at least 2 and every --alphas value > 0 (plain LoRA, alpha 0, is always run)")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    window = args.loss_window or max(1, args.steps // 5)
    started = time.time()
    with contextlib.ExitStack() as stack:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        stack.callback(torch.set_num_threads, threads)  # main() may run inside a test session: put it back
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        model, images, captions = prepare(work, args.model, args.seed)
        check_held_out(HELD_OUT_PROMPTS, [*captions, *CAT_PROMPTS])
        probe = DiffusersProbe(model, {
            "held_out": list(HELD_OUT_PROMPTS),
            "trigger_free": [trigger_free(c) for c in captions],
            "trigger": captions,
        }, args.seed)
        settings = [Setting("plain LoRA", 0.0)] + [Setting(f"CAT {alpha:g}", alpha) for alpha in args.alphas]
        if args.cat_prompts_row:
            prompts_file = work / "cat_prompts.txt"
            prompts_file.write_text("\n".join(CAT_PROMPTS) + "\n", encoding="utf-8")
            settings.append(Setting("CAT 1 + prompts", 1.0, (
                "--cat_prompts", str(prompts_file), "--cat_prompts_per_step", str(args.cat_prompts_per_step),
                "--cat_prompts_weight", str(args.cat_prompts_weight))))
        rows: list[Row] = []
        for setting in settings:
            row = run_setting(setting, work, model, images, probe, args, window)
            if row is not None:
                rows.append(row)
        if args.budget_row:
            budget = args.budget if args.budget is not None else _budget_from(rows)
            row = run_setting(Setting(f"budget {budget:.3g}", 1.0, ("--cat_drift_budget", f"{budget:.6g}")),
                              work, model, images, probe, args, window)
            if row is not None:
                rows.append(row)
    print_table(rows, args, window, time.time() - started)
    write_plot(rows, Path(args.plot), f"{args.model} SD model, {args.steps} steps, lr {args.learning_rate:g}")
    print(f"plot: {args.plot}")
    return rows


# --- model, data, training -----------------------------------------------------------------------


def prepare(work: Path, model: str, seed: int) -> tuple[Path, Path, list[str]]:
    """(diffusers model folder, image folder, training captions) of the seeded model and the demo dataset."""
    from library.families.model_parts import MODEL_CONFIGS_DIR
    from library.testing.demo_data import write_demo_dataset
    from library.testing.tiny_sd import build_tiny_sd, save_diffusers_folder

    folder = save_diffusers_folder(build_tiny_sd(seed=seed, config_dir=MODEL_CONFIGS_DIR / MODELS[model]),
                                   work / "model")
    images = write_demo_dataset(work / "data", size=RESOLUTION, seed=seed) / "train"
    captions = sorted(path.read_text(encoding="utf-8").strip() for path in images.glob("*/*.txt"))
    return folder, images, captions


def trigger_free(caption: str) -> str:
    from library.cat.captions import trigger_free_caption

    return trigger_free_caption(caption, [TRIGGER])


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def check_held_out(held_out: tuple[str, ...] | list[str], seen: list[str]) -> None:
    """Refuse a held-out prompt that shares a word with any prompt training sees (captions, --cat_prompts)."""
    seen_words = set().union(*map(words, seen))
    for prompt in held_out:
        shared = words(prompt) & seen_words
        if shared:
            raise ValueError(f"held-out prompt {prompt!r} shares {sorted(shared)} with the training captions or "
                             "cat prompts: pick words that training never sees, or drift there is not generalisation")


def trainer_argv(setting: Setting, work: Path, model: Path, images: Path, args: argparse.Namespace) -> list[str]:
    run = work / "runs" / re.sub(r"[^a-z0-9.]+", "_", setting.name.lower())
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(images),
        "--caption_extension", ".txt", "--resolution", str(RESOLUTION),
        "--output_dir", str(run), "--output_name", "lora", "--network_module", "networks.lora_cat",
        "--network_dim", "4", "--network_alpha", "4", "--learning_rate", str(args.learning_rate),
        "--optimizer_type", "AdamW", "--lr_scheduler", "constant", "--max_train_steps", str(args.steps),
        "--train_batch_size", "2", "--seed", str(args.seed), "--max_data_loader_n_workers", "0",
        "--cat_trigger", TRIGGER, "--cat_weight", f"{setting.alpha:g}",
        "--log_with", "tensorboard", "--logging_dir", str(run / "logs"), *setting.extra,
    ]


def rejected(argv: list[str]) -> str | None:
    """Why the trainer's parser refuses `argv` (e.g. a flag it does not have yet), or None when it accepts it."""
    from library.cli.train_args import parse_args as parse_train_args
    from library.errors import UserInputError

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parse_train_args(argv)
    except SystemExit:  # argparse: an unknown flag or a bad value, said on stderr
        return errors.getvalue().strip().splitlines()[-1] if errors.getvalue().strip() else "refused"
    except UserInputError as error:
        return str(error)
    return None


def run_setting(setting: Setting, work: Path, model: Path, images: Path, probe: DiffusersProbe,
                args: argparse.Namespace, window: int) -> Row | None:
    """Train `setting` and measure it; None (with a printed note) when the trainer refuses its flags."""
    import train_network_cat

    argv = trainer_argv(setting, work, model, images, args)
    reason = rejected(argv) if setting.extra else None
    if reason:
        print(f"skipping {setting.name!r}: the trainer refuses {' '.join(setting.extra[::2])}: {reason}")
        return None
    print(f"training {setting.name} ({args.steps} steps)", file=sys.stderr, flush=True)
    code = train_network_cat.main(argv)
    if code != 0:
        raise SystemExit(f"bench.cat_tradeoff: training {setting.name!r} exited with {code}")
    run = Path(argv[argv.index("--output_dir") + 1])
    scalars = read_scalars(run / "logs")
    drift = probe.drift(run / "lora.safetensors")
    main_loss, cat_loss = scalars["loss/main"], scalars["loss/cat"]
    alphas = scalars.get("cat/alpha")
    return Row(setting.name, statistics.fmean(alphas[-window:]) if alphas else setting.alpha,
               drift["held_out"], drift["trigger_free"], drift["trigger"],
               statistics.fmean(main_loss[:window]) - statistics.fmean(main_loss[-window:]),
               statistics.fmean(cat_loss[-window:]))


def read_scalars(logs: Path) -> dict[str, list[float]]:
    """Every scalar tag of the run's TensorBoard event files, values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {path.parent for path in logs.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every step
    events.Reload()
    return {tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)] for tag in events.Tags()["scalars"]}


def _budget_from(rows: list[Row]) -> float:
    """The final CAT term of the fixed-alpha run closest to alpha 1: a budget the trainer can actually hold."""
    fixed = [row for row in rows if row.name.startswith("CAT ") and "prompts" not in row.name]
    if not fixed:
        raise SystemExit("bench.cat_tradeoff: --budget_row needs --budget or at least one fixed-alpha row")
    return min(fixed, key=lambda row: abs(math.log(row.alpha))).cat_term


# --- measuring through diffusers -------------------------------------------------------------------


class DiffusersProbe:
    """The base pipeline's U-Net predictions on each prompt set, and each LoRA's drift from them,
    all through diffusers' own loading (`from_pretrained`, `load_lora_weights`)."""

    def __init__(self, model: Path, prompt_sets: dict[str, list[str]], seed: int) -> None:
        from diffusers import StableDiffusionPipeline

        self.pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        unet, tokenizer = self.pipe.unet, self.pipe.tokenizer
        size = RESOLUTION // self.pipe.vae_scale_factor
        gen = torch.Generator().manual_seed(seed + 1000)
        self.inputs = {}
        for name, prompts in prompt_sets.items():
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            latents = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=gen)
            self.inputs[name] = (ids, latents, torch.randn(latents.shape, generator=gen))
        self.base = self.predictions()

    def predictions(self) -> dict[str, torch.Tensor]:
        """Per prompt set: the U-Net's predictions at every timestep, stacked (timesteps, prompts, C, H, W)."""
        out = {}
        with torch.no_grad():
            for name, (ids, latents, noise) in self.inputs.items():
                states = self.pipe.text_encoder(ids)[0]
                steps = []
                for t in TIMESTEPS:
                    timesteps = torch.full((len(ids),), t, dtype=torch.long)
                    noisy = self.pipe.scheduler.add_noise(latents, noise, timesteps)
                    steps.append(self.pipe.unet(noisy, timesteps, states).sample)
                out[name] = torch.stack(steps)
        return out

    def drift(self, lora: Path) -> dict[str, float]:
        """Mean squared difference between the predictions with `lora` loaded and the base ones, per set."""
        self.pipe.load_lora_weights(str(lora))
        adapted = self.predictions()
        self.pipe.unload_lora_weights()
        restored = self.predictions()
        if any(not (restored[name] - self.base[name]).abs().max() < 1e-6 for name in self.base):
            raise RuntimeError(f"unload_lora_weights did not restore the base pipeline after {lora}")
        return {name: (adapted[name] - self.base[name]).square().mean().item() for name in self.base}


# --- output ------------------------------------------------------------------------------------------


def print_table(rows: list[Row], args: argparse.Namespace, window: int, seconds: float) -> None:
    print(f"\n{args.model} SD model ({MODELS[args.model]}), {args.steps} steps, lr {args.learning_rate:g}, rank 4, "
          f"batch 2, seed {args.seed}; drift through diffusers at t={','.join(map(str, TIMESTEPS))}; "
          f"loss drop: first {window} - last {window} steps")
    header = ("setting", "alpha", "held-out", "trigger-free", "trigger", "loss drop", "cat term")
    print(f"{header[0]:<18}" + "".join(f"{h:>13}" for h in header[1:]))
    for row in rows:
        print(f"{row.name:<18}{row.alpha:>13.3g}{row.held_out:>13.5f}{row.trigger_free:>13.5f}{row.trigger:>13.5f}"
              f"{row.loss_drop:>13.5f}{row.cat_term:>13.5f}")
    print(f"wall time {seconds:.0f} s")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]: steps of 1, 2 or 5 times a power of ten."""
    span = (high - low) or abs(high) or 1.0
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9) * step
    return [first + i * step for i in range(math.ceil((high - first) / step - 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 times powers of ten from the last one at or below `low` to the first at or above `high`."""
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5)]
    below = max(t for t in ticks if t <= low * (1 + 1e-9))
    above = min(t for t in ticks if t >= high * (1 - 1e-9))
    return [t for t in ticks if below <= t <= above]


PLAIN, CAT, OTHER, GREY = (200, 30, 30), (30, 80, 200), (20, 150, 60), (90, 90, 90)


def write_plot(rows: list[Row], path: Path, title: str) -> None:
    """Held-out drift (filled) and trigger-free drift (hollow, same x) on a log scale against the trigger
    change, one point per row labelled with its alpha or name; plain LoRA as red squares. PIL only."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 960, 660, 100, 40, 90, 80
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x_values = [r.trigger for r in rows]
    floor = 1e-6  # a drift of exactly 0 still gets a place on the log axis
    y_values = [max(y, floor) for r in rows for y in (r.held_out, r.trigger_free)]
    pad = 0.1 * ((max(x_values) - min(x_values)) or max(x_values) or 1.0)
    xs = nice_ticks(max(0.0, min(x_values) - pad), max(x_values) + pad)
    ys = log_ticks(min(y_values), max(y_values))

    def at(x: float, y: float) -> tuple[float, float]:
        fraction = math.log(max(y, floor) / ys[0]) / math.log(ys[-1] / ys[0])
        return (left + (x - xs[0]) / (xs[-1] - xs[0]) * (width - left - right),
                height - bottom - fraction * (height - top - bottom))

    for x in xs:
        px, _ = at(x, ys[0])
        draw.line([(px, top), (px, height - bottom)], fill=(230, 230, 230))
        draw.text((px, height - bottom + 6), f"{x:g}", fill="black", font=small, anchor="mt")
    for y in ys:
        _, py = at(xs[0], y)
        draw.line([(left, py), (width - right, py)], fill=(230, 230, 230))
        draw.text((left - 8, py), f"{y:g}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) / 2, height - 30), "learning: change on trigger prompts (MSE vs base)",
              fill="black", font=font, anchor="mm")
    axis = Image.new("RGB", (height - top - bottom, 24), "white")
    ImageDraw.Draw(axis).text((axis.width / 2, 12), "drift without the trigger (MSE vs base, log scale)",
                              fill="black", font=font, anchor="mm")
    image.paste(axis.rotate(90, expand=True), (14, top))
    draw.text((left, 14), title, fill="black", font=font)
    _legend(draw, left, 40, small, ((PLAIN, True, True, "plain LoRA"), (CAT, True, False, "CAT, fixed alpha"),
                                    (OTHER, True, False, "CAT steered (--cat_prompts, --cat_drift_budget)")))
    _legend(draw, left, 60, small, ((GREY, True, False, "held-out prompts (no word of the captions)"),
                                    (GREY, False, False, "trigger-free training captions")))

    for row in rows:
        plain = row.name == "plain LoRA"
        fixed = row.name.startswith("CAT ") and "prompts" not in row.name
        color = PLAIN if plain else CAT if fixed else OTHER
        label = "plain LoRA" if plain else f"alpha {row.alpha:g}" if fixed else row.name
        for y, filled in ((row.trigger_free, False), (row.held_out, True)):  # filled on top where they meet
            _marker(draw, at(row.trigger, y), color, filled, square=plain)
        px, py = at(row.trigger, row.held_out)
        draw.text((px + 10, py), label, fill=color, font=small, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _marker(draw, center: tuple[float, float], color, filled: bool, square: bool) -> None:
    px, py = center
    r = 5 if filled else 7  # a hollow marker under a filled one stays visible as a ring
    box = [px - r, py - r, px + r, py + r]
    (draw.rectangle if square else draw.ellipse)(box, fill=color if filled else "white", outline=color, width=2)


def _legend(draw, x: float, y: float, font, entries) -> None:
    for color, filled, square, text in entries:
        _marker(draw, (x + 6, y + 7), color, filled, square)
        draw.text((x + 16, y + 7), text, fill=color, font=font, anchor="lm")
        x += 26 + draw.textlength(text, font=font)


if __name__ == "__main__":
    main()
