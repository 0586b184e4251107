"""`UserInputError`, the one exception type for mistakes a user can make (see its docstring).

It is defined with the network module (`networks/lora_cat/errors.py`), which must work inside an
sd-scripts checkout without this package; everything here raises and catches that same class.
"""

from networks.lora_cat.errors import UserInputError

__all__ = ["UserInputError"]
