"""Errors that the command line reports as one clear line."""


class DhfError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible model or index.

    The CLI prints ``Error: <message>`` and exits with status 1 (no traceback unless
    ``--debug``). Library users can catch it like any exception.
    """
