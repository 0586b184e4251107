"""Shared test setup: no hub access, the tiny SD models written once per session in every user format,
and LyCORIS' class-level preset put back after each test that asks for it."""

import os

# Set before anything imports huggingface_hub, which reads it once: no test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from library.testing.tiny_sd import build_tiny_sd, save_diffusers_folder, save_single_file  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # tests/test_gpu.py: `pytest -m gpu` selects them (bench/gpu_check.sh); without CUDA they skip.
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (run by bench/gpu_check.sh)")


@dataclass(frozen=True)
class TinySDFiles:
    """One tiny model (rebuild it with `build_tiny_sd(seed, v2)`) saved as a user would have it."""

    seed: int
    v2: bool
    folder: Path
    safetensors: Path
    ckpt: Path


def _write_tiny_sd(root: Path, seed: int, v2: bool) -> TinySDFiles:
    """Build the tiny model once and write it as a diffusers folder, a .safetensors and a .ckpt."""
    models = build_tiny_sd(seed=seed, v2=v2)
    return TinySDFiles(
        seed=seed,
        v2=v2,
        folder=save_diffusers_folder(models, root / "diffusers"),
        safetensors=save_single_file(models, root / "model.safetensors"),
        ckpt=save_single_file(models, root / "model.ckpt"),
    )


@pytest.fixture(scope="session")
def tiny_sd_v1_files(tmp_path_factory: pytest.TempPathFactory) -> TinySDFiles:
    """The tiny SD1-shaped model (seed 0) in every format; read-only for tests."""
    return _write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v1"), seed=0, v2=False)


@pytest.fixture(scope="session")
def tiny_sd_v2_files(tmp_path_factory: pytest.TempPathFactory) -> TinySDFiles:
    """The tiny SD2-shaped model (seed 1) in every format; read-only for tests."""
    return _write_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v2"), seed=1, v2=True)


# LyCORIS keeps the preset of its last create_network in class attributes of LycorisNetworkKohya.
_LYCORIS_PRESET_STATE = ["ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                         "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                         "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"]


@pytest.fixture
def lycoris_preset_state():
    """Put LyCORIS' class-level preset back after the test, so no test sees another's preset."""
    from lycoris.kohya import LycorisNetworkKohya

    saved = {name: copy.deepcopy(getattr(LycorisNetworkKohya, name)) for name in _LYCORIS_PRESET_STATE}
    yield
    for name, value in saved.items():
        setattr(LycorisNetworkKohya, name, value)
