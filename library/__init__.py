"""The CAT trainer's shared code, in packages that depend on each other in one direction only.

From the top (may import anything below it) to the bottom (imports nothing of ours but the adapter):

    testing       tiny seeded models and converters for tests, the demo and benchmarks
    evaluation    evaluate_kps.py: PS / IS / KPS, generated images, CLIP scoring, reports
    cli           the command line and --config_file -> TrainConfig
    training      the training run: setup, the loop and its parts (noise, losses, optimizers, state, files)
    sampling      side trips during a run: sample images, samplers, the drift probe, the state guard
    data | families   datasets to batches and latents  |  model families behind one interface (SD 1.x/2.x)
    cat           the CAT objective, the network contract it switches, trigger-free captions
    config        the typed run configuration (dataclasses)
    errors        UserInputError

`networks.lora_cat` (the adapter) sits under all of them and imports none of them. The order is
written once, as import-linter contracts in `.importlinter`, and `tests/test_layers.py` checks it.
"""

import logging

# bitsandbytes warns at import, on every CPU machine, about an optional 4-bit kernel package that
# LoRA training never uses; the line only confuses users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
