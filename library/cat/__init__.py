"""Contrastive Adapter Training itself: the objective (`objective`), the network-module contract and its
multiplier switch (`network_protocol`), the trigger-free caption (`captions`) and the preservation
measures on fixed inputs (`preservation`).

May import: `library.errors`, `library.config`.
"""
