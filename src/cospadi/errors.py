"""The one exception type users see for bad input."""


class CospadiError(Exception):
    """Bad input or an unrecoverable condition, with a one-line message that says
    what is wrong and what to do. The CLI prints it as `error: <message>` and exits 2."""
