"""The Stable Diffusion tokenizer (CLIP's BPE), built offline from the vocabulary open_clip ships.

SD1 and SD2 both tokenize with OpenAI CLIP's byte-level BPE. No hub download is possible on our
machines, so the transformers `CLIPTokenizer` is built from `bpe_simple_vocab_16e6.txt.gz`, the merge
list inside the installed open_clip package, with the vocabulary laid out exactly as CLIP lays it
out: the 256 byte symbols, the same with "</w>", one entry per merge, then the two special tokens.
That gives the ids every SD checkpoint was trained with ("sks" -> 48136, "<|endoftext|>" -> 49407).

SD1 pads with "<|endoftext|>"; SD2 (OpenCLIP) pads with "!" (id 0).

Before its BPE, CLIP cleans the text with ftfy (curly quotes, ligatures, full-width letters, HTML
entities, mojibake); transformers 5's CLIPTokenizer does not, so the tokenizer built here adds it.
"""

import functools
import gzip
import importlib.util
from pathlib import Path
from typing import Any

import ftfy
from transformers import CLIPTokenizer

from library.errors import UserInputError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD2_PAD_TOKEN = "!"
VOCAB_SIZE = 49408

# CLIP keeps the first 49152 - 256 - 2 merges of the file (after its version line), so that the
# vocabulary comes out at 49408 entries; the file holds more merges than that.
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Where the installed open_clip package keeps CLIP's BPE merge list.

    The package is located, not imported: importing open_clip pulls in torchvision and timm.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ImportError(
            "open_clip_torch is not installed, and it ships CLIP's vocabulary: pip install -r requirements.txt"
        )
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (GPT-2's byte-level BPE alphabet).

    Printable Latin-1 bytes map to themselves; the other bytes (control characters, space, ...)
    map to code points from 256 upwards, so that no BPE symbol is whitespace. The insertion order,
    printable bytes first and then the others in byte order, is the order of CLIP's vocabulary.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + i) for i, byte in enumerate(others)})
    return table


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and BPE merge list, read from open_clip's file.

    Cached and shared between callers: treat both as read-only.
    """
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as merges_file:
        lines = merges_file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> CLIPTokenizer:
    """A transformers `CLIPTokenizer` with SD's exact ids, built without any download.

    `pad_token` is "<|endoftext|>" for SD1 and "!" for SD2. Reading the merge list is the slow part
    and is cached; the tokenizer itself is built fresh on each call (a few ms), so no caller can
    change another's tokenizer (copies of a transformers CLIP tokenizer lose its decode fix).
    """
    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise UserInputError(
            f"The pad token {pad_token!r} given to build_clip_tokenizer is not in CLIP's vocabulary; "
            f"use {EOS_TOKEN!r} (SD1) or {SD2_PAD_TOKEN!r} (SD2)."
        )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)
    return with_clip_text_cleaning(tokenizer)


def clean_clip_text(text: str) -> str:
    """The text cleaning CLIP applies before its BPE, as sd-scripts' tokenizer does it.

    ftfy's `fix_text` ("don’t" -> "don't", "ﬁ" -> "fi", "Ｈｅｌｌｏ" -> "Hello", "&amp;" -> "&", mojibake
    "Ã©" -> "é"), then runs of whitespace collapsed to one space. Lowercasing is left to the tokenizer.
    This is transformers 4's Python CLIPTokenizer with ftfy installed (what sd-scripts and the diffusers
    pipelines of that time tokenize with). OpenAI's and open_clip's `basic_clean` also call
    `html.unescape` twice after ftfy, which differs only where ftfy leaves entities alone on purpose:
    in text that holds a "<" ("<lora:x:1> &amp; cat" keeps its "&amp;" here).
    """
    return " ".join(ftfy.fix_text(text).split())


def with_clip_text_cleaning(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """Make `tokenizer` run `clean_clip_text` on every text it encodes; returns the same object.

    transformers 5's CLIPTokenizer only NFC-normalises, collapses whitespace and lowercases (in Rust),
    so "the dog’s toy" would get other ids than SD was trained with. Every encoding path (`__call__`,
    `encode`, `tokenize`) goes through `_encode_plus`, which is wrapped on this instance rather than in
    a subclass: the object stays a plain `CLIPTokenizer`, so a pipeline saved with it writes
    "transformers", "CLIPTokenizer" into model_index.json and loads anywhere (transformers wraps this
    tokenizer's decode per instance in the same way). The partial survives pickling and deepcopy.
    """
    tokenizer._encode_plus = functools.partial(_encode_plus_cleaned, tokenizer)
    return tokenizer


def _encode_plus_cleaned(tokenizer: CLIPTokenizer, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
    """CLIPTokenizer._encode_plus on the cleaned text (single texts, batches and pre-split words alike)."""
    return CLIPTokenizer._encode_plus(tokenizer, _clean_texts(text), text_pair=_clean_texts(text_pair), **kwargs)


def _clean_texts(texts: Any) -> Any:
    """`clean_clip_text` on a string, or on each string of a (nested) list or tuple; None stays None."""
    if isinstance(texts, str):
        return clean_clip_text(texts)
    if isinstance(texts, (list, tuple)):
        return type(texts)(_clean_texts(text) for text in texts)
    return texts
