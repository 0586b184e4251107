"""Peak GPU memory and seconds per training step on full-size shapes with random weights.

    python3 -m bench.gpu_table --out table.json [--budget 300] [--models sd15 sdxl] [--steps 5]

Each row trains `networks.lora_cat` (rank 16) with the real objective (`library.cat.objective.cat_step`)
on random latents, as the trainer sets a run up: the frozen model in the run's precision, the adapters
in float32 under autocast (fp16 with torch's loss scaler, as accelerate gives it), the optimizer built
by `library.training.optimizers.build_optimizer`.

- `sd15`: SD 1.5's U-Net and text encoder (`configs/models/sd_v1`) at 512 px, LoRA on both, real
  captions encoded every step.
- `sdxl`: SDXL base 1.0's U-Net (`configs/models/sdxl_base`) at 1024 px, LoRA on the U-Net only, with
  fixed random text states as `--cache_text_encoder_outputs` gives them (no text encoder built).
- `flux`: FLUX.1-dev's transformer (`configs/models/flux_dev`, 11.9B parameters) at 1024 px, LoRA on the
  transformer only (sd-scripts' default targets, fused qkv/linear1 included), fixed random T5/CLIP-L
  states (512 T5 tokens) as `--cache_text_encoder_outputs` gives them, guidance 1.0.
- `tiny`, `tiny_sdxl`, `tiny_flux`: the test models' shapes at 64 px, for running the same code on a CPU.

The configurations (precision, gradient checkpointing, attention, optimizer, batch) come in an order
of importance, each measured for plain LoRA, CAT sequential and CAT batched; rows stop being started
when the next configuration would not finish within `--budget` seconds. The JSON file is rewritten
after every row, so a run stopped from outside keeps what it measured. Peak memory is the row's
`torch.cuda.max_memory_allocated` / `max_memory_reserved`, weights included (one model on the GPU
at a time); seconds are the median of `--steps` steps after `--warmup` steps.

Targets (issue 13): SD 1.5 CAT sequential at 512 px, fp16, checkpointing, AdamW8bit under 6 GB peak;
CAT sequential within 1.05x of plain LoRA's peak; CAT's step time within 2.6x of plain LoRA's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelShape:
    family: str  # "sd", "sdxl" or "flux"
    config: str  # folder under configs/models
    resolution: int


MODELS = {
    "sd15": ModelShape("sd", "sd_v1", 512),
    "sdxl": ModelShape("sdxl", "sdxl_base", 1024),
    "tiny": ModelShape("sd", "tiny_sd_v1", 64),
    "tiny_sdxl": ModelShape("sdxl", "tiny_sdxl", 64),
    "flux": ModelShape("flux", "flux_dev", 1024),
    "tiny_flux": ModelShape("flux", "tiny_flux", 64),
}
# name -> (CAT weight, mode); weight 0 is plain LoRA (no reference pass, no second adapted pass).
METHODS = {"plain LoRA": (0.0, "sequential"), "CAT sequential": (1.0, "sequential"), "CAT batched": (1.0, "batched")}
RANK, ALPHA = 16, 8
GB = 1e9


@dataclass(frozen=True)
class Setting:
    """One configuration of the table; each is measured for every method."""

    model: str
    precision: str  # "fp16", "bf16", "fp8" (--fp8_base: weights in fp8, computed in bf16), or "fp32" for a CPU
    checkpointing: bool
    attention: str  # "sdpa" or "xformers"
    optimizer: str  # "AdamW" or "AdamW8bit"
    batch: int


# The most important first: the memory target's configuration, then what each choice costs.
PRIORITY = [
    ("sd15", "fp16", True, "sdpa", "AdamW8bit", 1),
    ("sd15", "fp16", False, "sdpa", "AdamW", 1),
    ("sdxl", "bf16", True, "sdpa", "AdamW8bit", 1),
    ("flux", "bf16", True, "sdpa", "AdamW8bit", 1),
    ("flux", "fp8", True, "sdpa", "AdamW8bit", 1),
    ("sd15", "bf16", True, "sdpa", "AdamW8bit", 1),
    ("sd15", "fp16", True, "xformers", "AdamW8bit", 1),
    ("sd15", "fp16", True, "sdpa", "AdamW8bit", 4),
    ("sd15", "fp16", True, "sdpa", "AdamW", 1),
    ("sdxl", "fp16", True, "sdpa", "AdamW8bit", 1),
    ("sdxl", "bf16", False, "sdpa", "AdamW", 1),
    ("sdxl", "bf16", True, "xformers", "AdamW8bit", 1),
    ("sdxl", "bf16", True, "sdpa", "AdamW8bit", 4),
]


def planned_settings(models: list[str], precisions: tuple[str, ...] = ("fp16", "bf16", "fp8")) -> list[Setting]:
    """PRIORITY's settings for `models`, then every other combination (model by model, in `models` order)."""
    first = [Setting(*row) for row in PRIORITY if row[0] in models and row[1] in precisions]
    rest = [
        Setting(model, precision, checkpointing, attention, optimizer, batch)
        for model in models
        for precision, checkpointing, attention, optimizer, batch in itertools.product(
            precisions, (True, False), ("sdpa", "xformers"), ("AdamW8bit", "AdamW"), (1, 4))
    ]
    return first + [s for s in rest if s not in first]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GPU memory and speed: plain LoRA vs CAT on full-size shapes")
    parser.add_argument("--out", type=Path, required=True, help="JSON file, rewritten after every row")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["sd15", "sdxl", "flux"])
    parser.add_argument("--precisions", nargs="+", choices=["fp16", "bf16", "fp8", "fp32"], default=["fp16", "bf16", "fp8"])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; no setting is started that would end later")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (optimizer state, kernels)")
    parser.add_argument("--max_settings", type=int, default=None, help="stop after this many settings")
    parser.add_argument("--device", default="cuda", help="cuda (the table's purpose) or cpu (to test this script)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0 (got {args.steps}, {args.warmup})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_table: no CUDA device here (torch.cuda.is_available() is False); nothing measured.")
        return 0
    device = torch.device(args.device)
    deadline = time.monotonic() + args.budget
    settings = planned_settings(args.models, tuple(args.precisions))[: args.max_settings]
    report = {"device": describe_device(device), "planned_settings": len(settings), "rows": [], "stopped": None}
    bench = Bench(device)
    estimates: dict[str, float] = {}  # model -> seconds one row took
    for index, setting in enumerate(settings):
        cost = 3 * estimates.get(setting.model, FIRST_ROW_GUESS.get(setting.model, 10.0))
        if time.monotonic() + cost > deadline:
            report["stopped"] = (f"time budget: {index} of {len(settings)} settings measured; the next "
                                 f"({setting.model}) would take about {cost:.0f} s")
            break
        for method in METHODS:
            started = time.monotonic()
            row = bench.measure(setting, method, args.steps, args.warmup)
            report["rows"].append(row)
            if row["status"] == "ok":
                estimates[setting.model] = max(estimates.get(setting.model, 0.0), time.monotonic() - started)
            _write(args.out, report)
            print(_row_line(row), file=sys.stderr, flush=True)
    else:
        report["stopped"] = f"all {len(settings)} settings measured"
    bench.release()
    _write(args.out, report)
    return 0


# Seconds a first row of a model may take (build, warm-up, steps) before one has been measured.
FIRST_ROW_GUESS = {"sd15": 20.0, "sdxl": 45.0, "flux": 120.0}


def describe_device(device) -> dict:
    import torch

    facts = {"type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        facts.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     total_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / GB, 1))
    return facts


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(report, indent=1))
    temporary.replace(path)


def _row_line(row: dict) -> str:
    s = row["setting"]
    head = f"{s['model']} {s['precision']} ckpt={s['checkpointing']} {s['attention']} {s['optimizer']} b{s['batch']} {row['method']}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row['reason']})"
    return f"{head}: {row['seconds']:.3f} s/step, peak allocated {_gb(row['peak_allocated_bytes'])} GB"


# --- the measurement -------------------------------------------------------------------------------


class Bench:
    """The model being measured, kept between rows of the same model (one model on the device at a time)."""

    def __init__(self, device) -> None:
        self.device = device
        self.model_name: str | None = None
        self.parts = None

    def release(self) -> None:
        self.parts = None
        self.model_name = None
        _free(self.device)

    def measure(self, setting: Setting, method: str, steps: int, warmup: int) -> dict:
        """One row: a fresh network and optimizer on the setting's model; never raises for a row that fails."""
        import torch

        row = {"setting": asdict(setting), "method": method, "resolution": MODELS[setting.model].resolution,
               "status": "ok", "reason": None}
        missing = _missing_for(setting, self.device)
        if missing:
            return {**row, "status": "skipped", "reason": missing}
        network = None
        try:
            parts = self._parts(setting)
            _free(self.device)
            _reset_peak(self.device)
            weights = _allocated(self.device)
            network = _network(parts, self.device, setting.checkpointing)
            row.update(_timed_steps(parts, network, setting, method, steps, warmup, self.device))
            row.update(peak_allocated_bytes=_peak(self.device, "allocated"), peak_reserved_bytes=_peak(self.device, "reserved"),
                       weights_bytes=weights, lora_params=sum(p.numel() for p in network.parameters()))
        except torch.cuda.OutOfMemoryError as error:
            row.update(status="oom", reason=str(error).splitlines()[0][:200])
        except Exception as error:  # a row that breaks is reported, and the table goes on
            row.update(status="failed", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
        finally:
            if network is not None:
                network.restore()
            del network
            _free(self.device)
        return row

    def _parts(self, setting: Setting) -> "ModelParts":
        from library.families.family import compute_dtype
        from library.training.fp8_weights import store_in_fp8

        dtype = _dtype(setting.precision)
        fp8 = setting.precision == "fp8"
        key = setting.model + (" fp8" if fp8 else "")  # fp8 storage is one-way: such rows get a model of their own
        if self.model_name != key:
            self.release()
            self.parts = build_parts(setting.model, self.device)
            self.model_name = key
            if fp8:
                for model in self.parts.frozen:
                    model.to(dtype=dtype)
                    store_in_fp8(model)
        parts = self.parts
        for model in parts.frozen:
            if compute_dtype(model) != dtype:
                model.to(dtype=dtype)
        set_attention(parts.unet, setting.attention)
        set_checkpointing(parts, setting.checkpointing)
        parts.dtype = dtype
        return parts


DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp8": "bfloat16", "fp32": "float32"}  # fp8: the compute dtype


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


@dataclass
class ModelParts:
    unet: object
    text_encoder: object | None  # None: U-Net only (SDXL with cached text states)
    denoiser: object
    make_batch: object  # batch size -> CATBatch on the device
    dtype: object = None

    @property
    def frozen(self) -> list:
        return [m for m in (self.unet, self.text_encoder) if m is not None]


def build_parts(model: str, device) -> ModelParts:
    """The model's frozen parts with seeded random weights, built directly on `device`."""
    import torch
    from diffusers import UNet2DConditionModel

    from library.families.model_parts import MODEL_CONFIGS_DIR

    shape = MODELS[model]
    folder = MODEL_CONFIGS_DIR / shape.config
    torch.manual_seed(0)
    if shape.family == "flux":
        return _flux_parts(folder, shape, device)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = _sd_text_encoder(folder) if shape.family == "sd" else None
    for part in (unet, text_encoder):
        if part is not None:
            part.requires_grad_(False)
    if shape.family == "sd":
        return _sd_parts(unet, text_encoder, shape, device)
    return _sdxl_parts(unet, shape, device)


def _sd_text_encoder(folder: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))


def _sd_parts(unet, text_encoder, shape: ModelShape, device) -> ModelParts:
    import torch

    from library.cat.objective import CATBatch
    from library.families.clip_tokenizer import build_clip_tokenizer
    from library.families.sd.denoiser import SDDenoiser

    tokenizer = build_clip_tokenizer()

    def make_batch(batch: int):
        latents, noise = _latents(unet, shape, batch, device)
        ids = tokenizer(["a photo of sks teapot"] * batch, padding="max_length", return_tensors="pt").input_ids
        free = tokenizer(["a photo of teapot"] * batch, padding="max_length", return_tensors="pt").input_ids
        return CATBatch(latents, torch.full((batch,), 500, device=device), noise, ids.to(device), free.to(device),
                        torch.ones(batch, device=device))

    return ModelParts(unet, text_encoder, SDDenoiser(unet, text_encoder), make_batch)


def _sdxl_parts(unet, shape: ModelShape, device) -> ModelParts:
    """Fixed text states for two captions (trigger and trigger-free), looked up as the trainer's
    text-encoder cache does (`bench.sdxl_text`)."""
    import torch

    from bench.sdxl_text import cached_sdxl_denoiser
    from library.cat.objective import CATBatch
    from library.families.sdxl.denoiser import uncropped_time_ids

    denoiser, trigger_ids, free_ids = cached_sdxl_denoiser(unet, device)
    captions = [trigger_ids, free_ids]

    def make_batch(batch: int):
        latents, noise = _latents(unet, shape, batch, device)
        trigger, free = (ids.expand(batch, 1).to(device) for ids in captions)
        return CATBatch(latents, torch.full((batch,), 500, device=device), noise, trigger, free,
                        torch.ones(batch, device=device), conditioning={"time_ids": uncropped_time_ids(latents, 8)})

    return ModelParts(unet, None, denoiser, make_batch)


def _flux_parts(folder: Path, shape: ModelShape, device) -> ModelParts:
    """FLUX.1's transformer alone, behind fixed T5/CLIP-L states for two captions (`bench.flux_text`),
    told guidance 1.0 as a LoRA run with sd-scripts' suggested --guidance_scale is."""
    import torch
    from diffusers import FluxTransformer2DModel

    from bench.flux_text import cached_flux_denoiser
    from library.cat.objective import CATBatch

    with torch.device(device):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
    transformer.requires_grad_(False)
    denoiser, trigger_ids, free_ids = cached_flux_denoiser(transformer, device, t5_tokens=512)

    def make_batch(batch: int):
        generator = torch.Generator().manual_seed(0)
        size = shape.resolution // 8
        latents = torch.randn(batch, 16, size, size, generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        trigger, free = (ids.expand(batch, 1).to(device) for ids in (trigger_ids, free_ids))
        return CATBatch(latents, torch.full((batch,), 500.0, device=device), noise, trigger, free,
                        torch.ones(batch, device=device), conditioning={"guidance": torch.ones(batch, device=device)})

    return ModelParts(transformer, None, denoiser, make_batch)


def _latents(unet, shape: ModelShape, batch: int, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    size = shape.resolution // 8
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=generator)
    return latents.to(device), torch.randn(latents.shape, generator=generator).to(device)


def set_attention(unet, attention: str) -> None:
    """PyTorch's scaled_dot_product_attention, or xformers' memory-efficient kernel (as `--xformers` sets it)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif type(unet).__name__ == "FluxTransformer2DModel":  # FLUX's own processor is SDPA already
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        unet.set_attn_processor(FluxAttnProcessor())
    else:
        unet.set_attn_processor(AttnProcessor2_0())


def set_checkpointing(parts: ModelParts, enabled: bool) -> None:
    """As the trainer sets `--gradient_checkpointing` (training mode, which diffusers and transformers need)."""
    if enabled:
        parts.unet.enable_gradient_checkpointing()
    else:
        parts.unet.disable_gradient_checkpointing()
    parts.unet.train(enabled)
    if parts.text_encoder is not None:
        text_encoder = parts.text_encoder
        if enabled:
            (getattr(text_encoder, "activation_checkpointing_enable", None) or text_encoder.gradient_checkpointing_enable)()
        else:
            (getattr(text_encoder, "activation_checkpointing_disable", None) or text_encoder.gradient_checkpointing_disable)()
        text_encoder.train(enabled)


def _network(parts: ModelParts, device, checkpointing: bool):
    """`networks.lora_cat` as the trainer builds it (float32 adapters); U-Net only without a text encoder."""
    import networks.lora_cat as lora_cat

    network = lora_cat.create_network(1.0, RANK, ALPHA, None, parts.text_encoder, parts.unet)
    network.apply_to(parts.text_encoder, parts.unet, apply_text_encoder=parts.text_encoder is not None)
    if checkpointing:
        network.enable_gradient_checkpointing()
    network.prepare_grad_etc(parts.text_encoder, parts.unet)
    return network.to(device)


def _timed_steps(parts: ModelParts, network, setting: Setting, method: str, steps: int, warmup: int, device) -> dict:
    import torch

    from library.cat.objective import cat_step
    from library.training.optimizers import build_optimizer

    alpha, mode = METHODS[method]
    groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
    optimizer, _ = build_optimizer(groups, setting.optimizer, 1e-4, {})
    scaler = torch.amp.GradScaler(device.type) if setting.precision == "fp16" else None
    batch = parts.make_batch(setting.batch)
    autocast = setting.precision != "fp32"

    def mse(prediction, target):
        return (prediction.float() - target.float()).square().mean(dim=(1, 2, 3))

    def backward(loss, last: bool) -> None:
        with torch.autocast(device.type, enabled=False):  # autocast is for the forward passes, as in training
            (scaler.scale(loss) if scaler else loss).backward()

    skipped = 0

    def step() -> None:
        nonlocal skipped
        with torch.autocast(device.type, dtype=parts.dtype, enabled=autocast):
            cat_step(parts.denoiser, network, batch, alpha, mode, mse, backward)
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            skipped += scaler.get_scale() < scale  # random weights may overflow fp16: the step is skipped
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _synchronize(device)
        started = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return {"seconds": statistics.median(times), "steps": steps, "warmup": warmup, "skipped_steps": skipped}


def _missing_for(setting: Setting, device) -> str | None:
    """Why a setting cannot run here (a package or a device it needs), or None."""
    if setting.attention == "xformers":
        if device.type != "cuda":
            return "xformers needs CUDA"
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed"
    if "8bit" in setting.optimizer and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device) -> int | None:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _peak(device, kind: str) -> int | None:
    import torch

    if device.type != "cuda":
        return None  # the table is about GPU memory; a CPU run only checks that the code runs
    return torch.cuda.max_memory_allocated(device) if kind == "allocated" else torch.cuda.max_memory_reserved(device)


# --- the report: one markdown table and the targets ------------------------------------------------


def _key_of(row: dict) -> tuple:
    return tuple(sorted(row["setting"].items()))


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each measured row with `memory_x_plain` and `time_x_plain` against plain LoRA's row of the same setting."""
    plain = {_key_of(r): r for r in rows if r["method"] == "plain LoRA" and r["status"] == "ok"}
    result = []
    for row in rows:
        base = plain.get(_key_of(row))
        ratios = {"memory_x_plain": None, "time_x_plain": None}
        if row["status"] == "ok" and base is not None:
            if row.get("peak_allocated_bytes") and base.get("peak_allocated_bytes"):
                ratios["memory_x_plain"] = row["peak_allocated_bytes"] / base["peak_allocated_bytes"]
            ratios["time_x_plain"] = row["seconds"] / base["seconds"]
        result.append({**row, **ratios})
    return result


def markdown_table(rows: list[dict]) -> str:
    """The rows as one markdown table (GB = 10^9 bytes)."""
    header = ("| model | px | batch | precision | checkpointing | attention | optimizer | method | "
              "peak allocated GB | peak reserved GB | x plain memory | s/step | x plain time | note |")
    lines = [header, "|" + " --- |" * header.count(" | ") + " --- |"]
    for row in with_ratios(rows):
        s = row["setting"]
        cells = [s["model"], str(row["resolution"]), str(s["batch"]), s["precision"], "on" if s["checkpointing"] else "off",
                 s["attention"], s["optimizer"], row["method"]]
        if row["status"] == "ok":
            cells += [_gb(row.get("peak_allocated_bytes")), _gb(row.get("peak_reserved_bytes")),
                      _ratio(row["memory_x_plain"]), f"{row['seconds']:.3f}", _ratio(row["time_x_plain"]),
                      f"{row['skipped_steps']} fp16 steps skipped" if row.get("skipped_steps") else ""]
        else:
            cells += ["", "", "", "", "", f"{row['status']}: {row['reason']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GB:.2f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


MEMORY_TARGET_SETTING = Setting("sd15", "fp16", True, "sdpa", "AdamW8bit", 1)


def targets(rows: list[dict]) -> list[dict]:
    """The three targets, each with the measured value, the limit, whether it is met (None: not
    measured) and a sentence saying by how much."""
    rows = with_ratios(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    found = [r for r in ok if r["method"] == "CAT sequential" and r["setting"] == asdict(MEMORY_TARGET_SETTING)]
    peak = found[0].get("peak_allocated_bytes") if found else None
    memory = _target("SD 1.5 CAT sequential, 512 px, fp16, checkpointing, AdamW8bit, batch 1: peak allocated",
                     None if peak is None else peak / GB, 6.0, "GB")
    sequential = [r["memory_x_plain"] for r in ok if r["method"] == "CAT sequential" and r["memory_x_plain"] is not None]
    ratio = _target("CAT sequential's peak memory against plain LoRA's, worst setting",
                    max(sequential) if sequential else None, 1.05, "x")
    times = [r["time_x_plain"] for r in ok if r["method"] != "plain LoRA" and r["time_x_plain"] is not None]
    speed = _target("CAT's step time against plain LoRA's, worst setting and mode", max(times) if times else None, 2.6, "x")
    return [memory, ratio, speed]


def _target(name: str, value: float | None, limit: float, unit: str) -> dict:
    if value is None:
        return {"target": name, "value": None, "limit": limit, "unit": unit, "met": None, "detail": "not measured"}
    met = value <= limit
    detail = (f"{value:.2f} {unit}, within {limit:g} {unit}" if met else
              f"{value:.2f} {unit}: missed by {value - limit:.2f} {unit} ({(value / limit - 1) * 100:.0f}% over {limit:g} {unit})")
    return {"target": name, "value": value, "limit": limit, "unit": unit, "met": met, "detail": detail}


def targets_markdown(found: list[dict]) -> str:
    marks = {True: "met", False: "MISSED", None: "not measured"}
    return "\n".join(f"- {marks[t['met']]}: {t['target']} <= {t['limit']:g} {t['unit']}: {t['detail']}" for t in found)


if __name__ == "__main__":
    sys.exit(main())
