"""The one exception type that users of ovdense see.

Every error caused by the user's input (a missing file, an unreadable image, an empty class
list, an unknown method, weights that cannot be found) is raised as :class:`OvdenseError`
with a message that says what went wrong and what to do. The CLI prints it as one line and
exits non-zero. Bugs inside the library raise ordinary exceptions.
"""


class OvdenseError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
