"""FLUX.1 (dev and schnell): the BFL <-> diffusers transformer layout (`bfl_layout`) and its T5 tokenizer (`tokenizers`)."""
