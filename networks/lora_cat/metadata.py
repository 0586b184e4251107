"""The metadata a LoRA `.safetensors` file carries, written the way sd-scripts writes it.

Three groups of string keys end up in the file's header:

- `ss_*` training keys: any value, turned into text by `str()` (`stringify_metadata`);
- `sshs_model_hash` / `sshs_legacy_hash`: the hashes sd-webui-additional-networks and A1111 index
  LoRAs by, computed on the tensors plus the `ss_*` keys only (`model_hashes`, `with_model_hashes`);
- `modelspec.*`: the SAI model spec 1.0.1 keys for an SD1/SD2, SDXL or FLUX.1 LoRA (`modelspec_metadata`).

Reference read for compatibility: sd-scripts `library/train_util.py` (`precalculate_safetensors_hashes`,
`addnet_hash_safetensors`, `addnet_hash_legacy`, `get_sai_model_spec`) and `library/sai_model_spec.py`
(`build_metadata`).
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Mapping

import safetensors.torch
import torch

from .errors import UserInputError

HASHED_METADATA_PREFIX = "ss_"
HEADER_LENGTH_BYTES = 8
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000
LEGACY_HASH_HEX_DIGITS = 8

SAI_MODEL_SPEC_VERSION = "1.0.1"
IMPLEMENTATION_DIFFUSERS = "diffusers"
# sd-scripts' implementation of an SDXL LoRA (its U-Net names are Stability's layout, not diffusers').
IMPLEMENTATION_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
SDXL_MODEL_VERSION = "sdxl_base_v1-0"
FLUX_MODEL_VERSION = "flux1"  # sd-scripts' ss_base_model_version for FLUX.1 dev and schnell
IMPLEMENTATION_FLUX = "https://github.com/black-forest-labs/flux"
# FLUX.1's modelspec architectures (the variant is not in ss_base_model_version; the model tells it).
FLUX_ARCHITECTURES = ("flux-1-dev", "flux-1-schnell")
PREDICTION_EPSILON = "epsilon"
PREDICTION_V = "v"

# `ss_base_model_version` (sd-scripts' `get_model_version_str_for_sd1_sd2`, and `sdxl_base_v1-0` for
# every SDXL model) -> modelspec architecture. The `_v` suffix means --v_parameterization; SD2 without
# it is the 512-px epsilon model. SDXL's version has no such suffix (a v-prediction SDXL keeps it).
ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1",
    "sd_v1_v": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-512",
    "sd_v2_v": "stable-diffusion-v2-768-v",
    SDXL_MODEL_VERSION: "stable-diffusion-xl-v1-base",
    FLUX_MODEL_VERSION: "flux-1-dev",
}
LORA_ADAPTER_SUFFIX = "/lora"


def stringify_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """Every value through `str()`, as sd-scripts does before saving: None becomes "None".

    `True` becomes "True", `1e-4` becomes "0.0001". Values meant to be JSON (`ss_network_args`,
    `ss_datasets`, `ss_tag_frequency`, ...) must already be JSON strings (`json.dumps`): a dict
    passed here would come out as Python's repr, which readers of the file cannot parse.
    """
    return {key: str(value) for key, value in metadata.items()}


def hashed_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The keys the hashes cover: only `ss_*`, so editing a title or description later keeps them valid."""
    return {key: value for key, value in metadata.items() if key.startswith(HASHED_METADATA_PREFIX)}


def serialise_for_hashing(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The in-memory safetensors file the hashes are taken from: the tensors plus the `ss_*` keys.

    An empty `ss_*` set is still passed as `{}` (not None), as sd-scripts does: it writes an empty
    `__metadata__` entry, which changes the header length and so the legacy hash.
    """
    return safetensors.torch.save(dict(state_dict), hashed_metadata(metadata))


def tensor_data_sha256(file_bytes: bytes) -> str:
    """sha256 hex of everything after the 8-byte little-endian header length and the JSON header."""
    header_length = int.from_bytes(file_bytes[:HEADER_LENGTH_BYTES], "little")
    data = memoryview(file_bytes)[HEADER_LENGTH_BYTES + header_length :]
    return hashlib.sha256(data).hexdigest()


def legacy_hash(file_bytes: bytes) -> str:
    """The old A1111 model hash: first 8 hex digits of sha256 over 0x10000 bytes at offset 0x100000.

    A buffer shorter than 0x100000 bytes (any small LoRA) hashes an empty slice, giving "e3b0c442",
    exactly as sd-scripts' seek-then-read does.
    """
    window = memoryview(file_bytes)[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return hashlib.sha256(window).hexdigest()[:LEGACY_HASH_HEX_DIGITS]


def model_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """`(sshs_model_hash, sshs_legacy_hash)` for the tensors as they will be saved (cast them first).

    Metadata values must already be strings (see `stringify_metadata`); keys other than `ss_*` are
    ignored, so `modelspec.*` and the hash keys themselves do not feed the hashes.
    """
    file_bytes = serialise_for_hashing(state_dict, metadata)
    return tensor_data_sha256(file_bytes), legacy_hash(file_bytes)


def with_model_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """A copy of `metadata` with `sshs_model_hash` and `sshs_legacy_hash` added (the input is untouched)."""
    model_hash, old_hash = model_hashes(state_dict, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": old_hash}


def modelspec_metadata(
    *,
    model_version: str,
    title: str,
    resolution: tuple[int, int] | int,
    timestamp: float,
    architecture: str | None = None,
    v_parameterization: bool | None = None,
    trigger_phrase: str | None = None,
    clip_skip: int | None = None,
    timestep_range: tuple[int, int] | None = None,
    description: str | None = None,
    author: str | None = None,
    tags: str | None = None,
    license: str | None = None,
    implementation_version: str | None = None,
    usage_hint: str | None = None,
    thumbnail: str | None = None,
    merged_from: str | None = None,
    preprocessor: str | None = None,
    is_negative_embedding: str | None = None,
) -> dict[str, str]:
    """The `modelspec.*` keys sd-scripts writes for an SD1/SD2, SDXL or FLUX.1 LoRA.

    `architecture` is the model's own (FLUX.1: "flux-1-dev" or "flux-1-schnell"); by default the
    one `model_version` implies. FLUX.1 LoRAs carry no `prediction_type`, as sd-scripts writes them.

    Always written: `sai_model_spec` ("1.0.1"), `architecture` (from `model_version`, the
    `ss_base_model_version` value), `implementation` ("diffusers"; Stability's generative-models URL
    for SDXL), `title`, `resolution` ("WxH", the training resolution: "1024x1024" for SDXL at 1024),
    `date` (local time, whole seconds, ISO 8601 without zone: "2024-05-01T13:45:00") and
    `prediction_type` ("v" or "epsilon", see `prediction_type`). Written only when given:
    `trigger_phrase`, `encoder_layer` (the clip skip, as text), `timestep_range` ("min,max"),
    `description`, `author`, `tags`, `license`, `implementation_version`, `usage_hint`, `thumbnail`
    (a data URL), `merged_from`, `preprocessor`, `is_negative_embedding`. sd-scripts gets
    `timestep_range` from --min_timestep/--max_timestep (0 and 1000 fill a missing end) and the
    others from the --metadata_* flags.
    """
    spec = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": lora_architecture(model_version, architecture),
        "modelspec.implementation": implementation(model_version),
        "modelspec.title": title,
        "modelspec.resolution": resolution_text(resolution),
        "modelspec.date": iso_date(timestamp),
    }
    if model_version != FLUX_MODEL_VERSION:
        spec["modelspec.prediction_type"] = prediction_type(model_version, v_parameterization)
    optional = {
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.encoder_layer": None if clip_skip is None else str(clip_skip),
        "modelspec.timestep_range": None if timestep_range is None else f"{timestep_range[0]},{timestep_range[1]}",
        "modelspec.description": description,
        "modelspec.author": author,
        "modelspec.tags": tags,
        "modelspec.license": license,
        "modelspec.implementation_version": implementation_version,
        "modelspec.usage_hint": usage_hint,
        "modelspec.thumbnail": thumbnail,
        "modelspec.merged_from": merged_from,
        "modelspec.preprocessor": preprocessor,
        "modelspec.is_negative_embedding": is_negative_embedding,
    }
    return {**spec, **{key: value for key, value in optional.items() if value is not None}}


def lora_architecture(model_version: str, architecture: str | None = None) -> str:
    """`stable-diffusion-v1/lora`, `stable-diffusion-v2-512/lora`, `stable-diffusion-v2-768-v/lora`,
    `stable-diffusion-xl-v1-base/lora`, `flux-1-dev/lora` or `flux-1-schnell/lora`."""
    if model_version not in ARCHITECTURES:
        raise UserInputError(
            f"model version {model_version!r} (ss_base_model_version, set by the model family, --v2 and "
            f"--v_parameterization) is not one this trainer writes; expected one of {', '.join(ARCHITECTURES)}. "
            "SD3 and later models are not supported by this trainer."
        )
    if architecture is not None and model_version == FLUX_MODEL_VERSION and architecture not in FLUX_ARCHITECTURES:
        raise ValueError(f"FLUX.1 architecture {architecture!r}: expected one of {', '.join(FLUX_ARCHITECTURES)}")
    return (architecture or ARCHITECTURES[model_version]) + LORA_ADAPTER_SUFFIX


def implementation(model_version: str) -> str:
    """"diffusers" for SD1/SD2 LoRAs; Stability's generative-models URL for SDXL ones, Black Forest Labs'
    repository for FLUX.1 ones, as sd-scripts writes."""
    lora_architecture(model_version)  # rejects unknown versions with a clear message
    if model_version == FLUX_MODEL_VERSION:
        return IMPLEMENTATION_FLUX
    return IMPLEMENTATION_STABILITY_AI if model_version == SDXL_MODEL_VERSION else IMPLEMENTATION_DIFFUSERS


def prediction_type(model_version: str, v_parameterization: bool | None = None) -> str:
    """"v" for a v-parameterised model, else "epsilon".

    sd-scripts writes it from --v_parameterization; without that flag given (None) it is read from
    the version: the `_v` versions (`sd_v2_v`, `sd_v1_v`) are "v", and `sdxl_base_v1-0`, which is the
    same for a v-prediction SDXL, is "epsilon".
    """
    lora_architecture(model_version)  # rejects unknown versions with a clear message
    if v_parameterization is None:
        v_parameterization = model_version.endswith("_v")
    return PREDICTION_V if v_parameterization else PREDICTION_EPSILON


def resolution_text(resolution: tuple[int, int] | int) -> str:
    """"512x512" from 512 or (512, 512); "640x448" from (640, 448), width first."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size):
        raise UserInputError(
            f"--resolution {resolution!r}: expected one positive size or a width,height pair, e.g. 512 or 512,768."
        )
    return f"{size[0]}x{size[1]}"


def iso_date(timestamp: float) -> str:
    """Local time of `timestamp` to the second, ISO 8601 without zone, as sd-scripts writes `modelspec.date`."""
    return datetime.datetime.fromtimestamp(int(timestamp)).isoformat()
