"""The one exception type for mistakes a user can fix.

Raised anywhere in embed/, heads/ or store/; cli.py prints its message as one line and
exits non-zero, with no traceback. Messages name the problem and the fix.
"""


class UserError(Exception):
    """A problem with the user's input, options or data, with a message saying how to fix it."""
