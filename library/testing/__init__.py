"""Test-only models and converters: the tiny SD model with seeded random weights (and its LDM
single-file writer), the tiny open_clip model, the demo dataset. Used by tests, the demo and the
benchmarks; nothing else in `library` imports this package.

May import: everything in `library`.
"""
