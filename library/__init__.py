"""Shared code for the CAT trainer: model loading, the LoRA layer, file format, metadata."""
