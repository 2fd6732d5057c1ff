"""The one exception type for user errors: the CLI prints its message (no traceback) and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (a file, an id, a config value); the message names the problem."""
