"""Contrastive Adapter Training itself: the objective (`objective`), the network-module contract and its
multiplier switch (`network_protocol`), the trigger-free caption (`captions`, with the caption weight
syntax it must rewrite, `caption_weights`) and the preservation measures on fixed inputs (`preservation`).

May import: `library.errors`, `library.config`.
"""
