"""The one exception type for user errors: the CLI prints its message (no traceback) and exits non-zero.

`quoted` is how a message shows a value that came from outside: a bounded repr, so a 50 MB title, a
megabyte-long key or a 5000-digit integer never ends up whole in an error line.
"""

import reprlib


class UserError(Exception):
    """Bad input from the user (a file, an id, a config value); the message names the problem."""


class _Bounded(reprlib.Repr):
    """reprlib with every size limit small; huge integers are described instead of converted to digits."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxstring = self.maxother = self.maxlong = limit
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4
        self.maxlevel = 2

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 4 * self.maxlong:  # str() of a 4300-digit int raises; long ones are cut anyway
            return f"<{'-' if x < 0 else ''}{x.bit_length()}-bit integer>"
        return super().repr_int(x, level)


_QUOTE = {60: _Bounded(60)}


def quoted(value, limit: int = 60) -> str:
    """repr(value) cut to about `limit` characters (a long string is cut before it is repr'd; a container's repr,
    whose every item is bounded, is cut as a whole at 3 x limit)."""
    if limit not in _QUOTE:
        _QUOTE[limit] = _Bounded(limit)
    text = _QUOTE[limit].repr(value)
    return text if len(text) <= 3 * limit else text[:3 * limit] + "..."
