"""`evaluate_kps.py`: the paper's PS / IS / KPS of LoRAs, the images they are computed on, CLIP
scoring, reports, and the check that a LoRA file fits the model.

May import: `library.cli` and everything below it.
"""
