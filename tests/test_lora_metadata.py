"""LoRA file metadata: str() of values, sd-scripts' two model hashes, and the modelspec keys."""

from __future__ import annotations

import datetime
import hashlib
import json
import re

import pytest
import safetensors.torch
import torch

from library.errors import UserInputError
from networks.lora_cat.metadata import (
    model_hashes,
    modelspec_metadata,
    serialise_for_hashing,
    stringify_metadata,
    with_model_hashes,
)

SHA256_OF_NOTHING = hashlib.sha256(b"").hexdigest()


def small_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {
        f"{name}.lora_down.weight": torch.randn(4, 32, generator=generator),
        f"{name}.lora_up.weight": torch.zeros(32, 4),
        f"{name}.alpha": torch.tensor(4.0),
    }


def big_state_dict() -> dict[str, torch.Tensor]:
    """Over 0x110000 bytes of tensor data, so the legacy hash window is full of real data."""
    generator = torch.Generator().manual_seed(1)
    return {"lora_te_x.lora_down.weight": torch.randn(300_000, generator=generator)}


def independent_hashes(state_dict, metadata) -> tuple[str, str]:
    """The hashes recomputed here from the serialised bytes, parsing the header ourselves."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(state_dict, ss_only)
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    assert header.get("__metadata__", {}) == ss_only  # the bytes hashed carry exactly the ss_ keys
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


METADATA = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "modelspec.title": "mine"}


def test_stringify_turns_every_value_into_its_str() -> None:
    metadata = {"ss_seed": 42, "ss_clip_skip": None, "ss_v2": False, "ss_lr": 1e-4, "ss_args": '{"a": 1}'}
    out = stringify_metadata(metadata)
    assert out == {"ss_seed": "42", "ss_clip_skip": "None", "ss_v2": "False", "ss_lr": "0.0001", "ss_args": '{"a": 1}'}


def test_model_hash_is_sha256_of_the_tensor_data_region() -> None:
    state_dict = small_state_dict()
    assert model_hashes(state_dict, METADATA) == independent_hashes(state_dict, METADATA)


def test_legacy_hash_of_a_buffer_under_one_mebibyte_is_the_hash_of_nothing() -> None:
    state_dict = small_state_dict()
    assert len(serialise_for_hashing(state_dict, METADATA)) < 0x100000
    assert model_hashes(state_dict, METADATA)[1] == SHA256_OF_NOTHING[:8] == "e3b0c442"


def test_legacy_hash_reads_the_window_at_one_mebibyte_of_a_large_file() -> None:
    state_dict = big_state_dict()
    model_hash, legacy = model_hashes(state_dict, METADATA)
    assert (model_hash, legacy) == independent_hashes(state_dict, METADATA)
    assert legacy != SHA256_OF_NOTHING[:8]


def test_hashes_change_when_a_tensor_changes() -> None:
    before = model_hashes(big_state_dict(), METADATA)
    changed = big_state_dict()
    changed["lora_te_x.lora_down.weight"][0x100000 // 4] += 1.0  # inside the legacy window
    after = model_hashes(changed, METADATA)
    assert after[0] != before[0]
    assert after[1] != before[1]


def test_hashes_ignore_keys_that_are_not_ss() -> None:
    state_dict = big_state_dict()
    edited = {**METADATA, "modelspec.title": "renamed", "modelspec.author": "someone", "sshs_model_hash": "x"}
    assert model_hashes(state_dict, edited) == model_hashes(state_dict, METADATA)


def test_an_ss_key_moves_the_header_and_so_the_legacy_hash_but_not_the_model_hash() -> None:
    state_dict = big_state_dict()
    model_hash, legacy = model_hashes(state_dict, METADATA)
    new_model_hash, new_legacy = model_hashes(state_dict, {**METADATA, "ss_training_comment": "more text"})
    assert new_model_hash == model_hash
    assert new_legacy != legacy


def test_with_model_hashes_adds_both_keys_to_a_copy() -> None:
    state_dict = small_state_dict()
    metadata = dict(METADATA)
    out = with_model_hashes(state_dict, metadata)
    assert metadata == METADATA  # input untouched
    assert {k: out[k] for k in METADATA} == METADATA
    assert (out["sshs_model_hash"], out["sshs_legacy_hash"]) == independent_hashes(state_dict, METADATA)
    assert re.fullmatch(r"[0-9a-f]{64}", out["sshs_model_hash"])


def test_hashes_match_a_file_written_with_the_hash_keys_added(tmp_path) -> None:
    """The saved file's tensor region is what was hashed, even though its header has more keys."""
    state_dict = small_state_dict()
    metadata = with_model_hashes(state_dict, METADATA)
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file(state_dict, path, metadata)
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert hashlib.sha256(data[8 + header_length :]).hexdigest() == metadata["sshs_model_hash"]


@pytest.mark.parametrize(
    ("version", "architecture", "prediction"),
    [
        ("sd_v1", "stable-diffusion-v1/lora", "epsilon"),
        ("sd_v1_v", "stable-diffusion-v1/lora", "v"),
        ("sd_v2", "stable-diffusion-v2-512/lora", "epsilon"),
        ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "v"),
    ],
)
def test_modelspec_required_keys_per_model_version(version: str, architecture: str, prediction: str) -> None:
    timestamp = 1_700_000_000.75
    spec = modelspec_metadata(model_version=version, title="my_lora", resolution=512, timestamp=timestamp)
    assert spec == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": "my_lora",
        "modelspec.resolution": "512x512",
        "modelspec.date": datetime.datetime.fromtimestamp(1_700_000_000).isoformat(),
        "modelspec.prediction_type": prediction,
    }


def test_modelspec_date_is_whole_seconds_without_zone() -> None:
    spec = modelspec_metadata(model_version="sd_v1", title="t", resolution=512, timestamp=1_700_000_000.999)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", spec["modelspec.date"])


def test_modelspec_optional_keys_when_given() -> None:
    spec = modelspec_metadata(
        model_version="sd_v2_v", title="t", resolution=(768, 640), timestamp=0.0, trigger_phrase="sks dog",
        clip_skip=2, timestep_range=(0, 1000), description="d", author="a", tags="x,y", license="mit",
        implementation_version="cat-lora/1.0", usage_hint="say sks", thumbnail="data:image/png;base64,AA==",
        merged_from="a, b", preprocessor="canny", is_negative_embedding="false",
    )
    assert spec["modelspec.resolution"] == "768x640"
    assert (spec["modelspec.usage_hint"], spec["modelspec.thumbnail"], spec["modelspec.merged_from"],
            spec["modelspec.preprocessor"], spec["modelspec.is_negative_embedding"]) == (
        "say sks", "data:image/png;base64,AA==", "a, b", "canny", "false")
    assert spec["modelspec.trigger_phrase"] == "sks dog"
    assert spec["modelspec.encoder_layer"] == "2"
    assert spec["modelspec.timestep_range"] == "0,1000"
    assert spec["modelspec.description"] == "d"
    assert spec["modelspec.author"] == "a"
    assert spec["modelspec.tags"] == "x,y"
    assert spec["modelspec.license"] == "mit"
    assert spec["modelspec.implementation_version"] == "cat-lora/1.0"
    assert all(isinstance(value, str) for value in spec.values())


def test_modelspec_leaves_out_unset_optional_keys() -> None:
    spec = modelspec_metadata(model_version="sd_v1", title="t", resolution=512, timestamp=0.0)
    for key in ("trigger_phrase", "encoder_layer", "timestep_range", "description", "author", "tags", "license",
                "usage_hint", "thumbnail", "merged_from", "preprocessor", "is_negative_embedding"):
        assert f"modelspec.{key}" not in spec


def test_unknown_model_version_is_a_user_error_naming_it() -> None:
    with pytest.raises(UserInputError, match=r"'sd3_medium'.*sd_v1, sd_v1_v, sd_v2, sd_v2_v, sdxl_base_v1-0"):
        modelspec_metadata(model_version="sd3_medium", title="t", resolution=1024, timestamp=0.0)


@pytest.mark.parametrize("resolution", [0, (512,), (512, 0), (512, 512, 512), (512.0, 512)])
def test_bad_resolution_is_a_user_error_naming_it(resolution) -> None:
    with pytest.raises(UserInputError, match=re.escape(repr(resolution))):
        modelspec_metadata(model_version="sd_v1", title="t", resolution=resolution, timestamp=0.0)
