"""FLUX.1's second tokenizer: T5 v1.1's SentencePiece Unigram, read from a diffusers folder's `tokenizer_2/`.

FLUX's first tokenizer is CLIP-L's, built offline like SD1's (`library.families.clip_tokenizer`,
padding with <|endoftext|>). The T5 one cannot be rebuilt from anything installed, so it is read
from the folder a user's FLUX model came with (FLUX.1-dev and -schnell on the Hub both have
`tokenizer_2/`). transformers 5 reads its `tokenizer.json` with the `tokenizers` library alone:
neither `sentencepiece` nor a download is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import T5TokenizerFast

from library.errors import UserInputError

# T5's fixed special ids: what FLUX's text encoder was trained with and what its padding relies on.
PAD_TOKEN_ID = 0
EOS_TOKEN_ID = 1


def load_t5_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """The T5 tokenizer saved in `folder` (a `tokenizer_2/` folder), offline; its pad and eos ids are checked.

    A tokenizer with other special ids would encode prompts the T5 encoder was never trained on,
    silently; that is refused here with the folder named.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise UserInputError(
            f"The T5 tokenizer folder {folder} has neither tokenizer.json nor spiece.model; "
            "give the tokenizer_2/ folder of a diffusers FLUX.1 model."
        )
    tokenizer = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
    if (tokenizer.pad_token_id, tokenizer.eos_token_id) != (PAD_TOKEN_ID, EOS_TOKEN_ID):
        raise UserInputError(
            f"The tokenizer in {folder} has pad id {tokenizer.pad_token_id} and eos id {tokenizer.eos_token_id}; "
            f"a T5 tokenizer for FLUX.1 has pad {PAD_TOKEN_ID} and eos {EOS_TOKEN_ID}."
        )
    return tokenizer
