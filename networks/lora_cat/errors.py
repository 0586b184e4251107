"""The one exception type for mistakes a user can make.

Every message is a sentence that names the bad value, where it came from (file, key, flag)
and how to fix it. Code raises `UserInputError` instead of `assert` for anything a user
controls; a bare traceback is reserved for bugs.
"""


class UserInputError(ValueError):
    """Bad user input: a flag, a config key, a file that does not fit."""
