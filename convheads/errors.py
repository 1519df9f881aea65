"""The one exception type convheads raises for bad input.

It subclasses ValueError so callers can catch it like any argument error; command lines print
its message alone (no traceback), so every message names the problem and the fix.
"""


class ConvHeadsError(ValueError):
    """Bad input to convheads: the message says what is wrong and how to fix it."""
