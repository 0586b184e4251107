"""Which clip skip and token length each row of evaluate_kps.py is sampled with; no model involved."""

import logging
from pathlib import Path

import pytest

from library.errors import UserInputError
from library.evaluation.kps_conditioning import Conditioning, choose_conditionings

NO_FLAGS = {"clip_skip": None, "max_token_length": None}


def test_each_lora_takes_its_training_metadata_and_the_base_row_the_first_lora_s():
    loras = [
        (Path("anime.safetensors"), {"ss_clip_skip": "2", "ss_max_token_length": "225"}),
        (Path("photo.safetensors"), {"ss_clip_skip": "2", "ss_max_token_length": "225", "ss_seed": "1"}),
    ]
    base, chosen = choose_conditionings(NO_FLAGS, loras)
    assert [c.conditioning for c in chosen] == [Conditioning(2, 225)] * 2
    assert base.conditioning == Conditioning(2, 225)
    assert base.as_json() == {"clip_skip": 2, "max_token_length": 225,
                              "from": {"clip_skip": "as anime", "max_token_length": "as anime"}}
    assert chosen[0].as_json()["from"] == {"clip_skip": "ss_clip_skip", "max_token_length": "ss_max_token_length"}


def test_none_or_no_metadata_means_the_defaults():
    loras = [(Path("sd_scripts.safetensors"), {"ss_clip_skip": "None", "ss_max_token_length": "None"}),
             (Path("civitai.safetensors"), {}),
             (Path("gui.safetensors"), {"ss_clip_skip": "1", "ss_max_token_length": "75"})]
    base, chosen = choose_conditionings(NO_FLAGS, loras)
    assert [c.conditioning for c in chosen] == [Conditioning(1, 75)] * 3 and base.conditioning == Conditioning(1, 75)
    assert chosen[1].origin == {"clip_skip": "default", "max_token_length": "default"}


def test_flags_override_the_metadata_for_every_row_base_included():
    loras = [(Path("a.safetensors"), {"ss_clip_skip": "2", "ss_max_token_length": "150"}),
             (Path("b.safetensors"), {"ss_clip_skip": "not read: the flag decides"})]
    base, chosen = choose_conditionings({"clip_skip": 1, "max_token_length": None}, loras)
    assert [c.conditioning for c in chosen] == [Conditioning(1, 150), Conditioning(1, 75)]
    assert base.conditioning == Conditioning(1, 150)
    assert base.origin == {"clip_skip": "--clip_skip", "max_token_length": "as a"}


def test_loras_that_disagree_are_warned_about(caplog):
    loras = [(Path("a.safetensors"), {"ss_clip_skip": "2"}), (Path("b.safetensors"), {"ss_clip_skip": "None"})]
    with caplog.at_level(logging.WARNING, logger="library.evaluation.kps_conditioning"):
        base, chosen = choose_conditionings(NO_FLAGS, loras)
    assert base.conditioning == Conditioning(2, 75) and chosen[1].conditioning == Conditioning(1, 75)
    assert len(caplog.records) == 1, "one warning: they agree on the token length"
    message = caplog.records[0].getMessage()
    assert "different clip_skip (a 2, b 1)" in message and "the base model with a's (2)" in message
    assert "Pass --clip_skip" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="library.evaluation.kps_conditioning"):
        choose_conditionings({"clip_skip": 2, "max_token_length": None}, loras)
    assert not caplog.records, "with the flag they no longer disagree"


@pytest.mark.parametrize("key, value, message", [
    ("ss_clip_skip", "two", r"bad\.safetensors has ss_clip_skip='two' .* \(1 or more, or None\); pass --clip_skip"),
    ("ss_clip_skip", "0", r"ss_clip_skip='0'"),
    ("ss_max_token_length", "100", r"ss_max_token_length='100' .* \(75, 150, 225, or None\); pass --max_token_length"),
])
def test_metadata_that_is_no_such_value_is_refused_with_the_file_and_key(key, value, message):
    with pytest.raises(UserInputError, match=message):
        choose_conditionings(NO_FLAGS, [(Path("bad.safetensors"), {key: value})])
