"""Network modules for `--network_module` (kohya sd-scripts contract)."""
