"""Shared code for the CAT trainer: model loading, the LoRA layer, file format, metadata."""

import logging

# bitsandbytes warns at import, on every CPU machine, about an optional 4-bit kernel package that
# LoRA training never uses; the line only confuses users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
