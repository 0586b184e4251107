"""Every way a user's TOML file can fail to read gets one sentence naming the file and the fix."""

import pytest

from library.config.toml_file import read_toml
from library.errors import UserInputError


def _error(path, **kwargs) -> str:
    with pytest.raises(UserInputError) as error:
        read_toml(path, f"--my_file {path}", 'name = "x"', **kwargs)
    return str(error.value)


def test_the_failures_and_their_sentences(tmp_path):
    assert "does not exist; check the path." in _error(tmp_path / "missing.toml")
    assert "is a folder; give a file." in _error(tmp_path, missing_hint="give a file")
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert "cannot be read as UTF-8 text" in _error(latin)
    windows = tmp_path / "windows.toml"
    windows.write_text('image_dir = "C:\\lora\\img"\n', encoding="utf-8")
    message = _error(windows, path_example="image_dir")
    assert "is not valid TOML" in message and "image_dir = 'C:\\lora\\img'" in message
    unquoted = tmp_path / "unquoted.toml"
    unquoted.write_text("name = my run\n", encoding="utf-8")
    assert 'strings need quotes, e.g. name = "x"' in _error(unquoted, path_example="image_dir")


def test_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfname = \"x\"\n")
    assert read_toml(path, "f", "e") == {"name": "x"}
