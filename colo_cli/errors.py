"""How errors leave colo-compare: one base class, one exit status each,
one way to say what the operating system said.

Every error meant for the user is a :class:`ColoError` (or a subclass
named after where it arises: ``CaptureError``, ``ServeError``...).  Its
``str()`` is the whole message, one line, naming what it is about (a file,
an option and its value); the command line (``cli.main``) catches it in
one place, prints ``colo-compare: MESSAGE`` on stderr and exits with the
error's ``exit_status``.  Nothing below the command line prints an error
or exits.

Exit statuses, like diff(1)/cmp(1): 0 same (or a clean stop), 1 a
divergence, 2 trouble, 130 interrupted (128 + the signal's number for
another signal).
"""

from __future__ import annotations

import os

EXIT_SAME = 0
EXIT_DIVERGE = 1
EXIT_TROUBLE = 2
EXIT_INTERRUPTED = 130


class ColoError(Exception):
    """An error to report in one line (``str(e)``) and exit with
    ``exit_status`` (trouble, unless a subclass says otherwise)."""

    exit_status = EXIT_TROUBLE


def os_error_text(e: OSError) -> str:
    """What went wrong, in the words every message of colo-compare uses:
    the system's reason for the error number, in lower case ("address
    already in use", "no such file or directory"), without the number or
    the file name (the message names what it is about itself).

    The error number's own text, not ``strerror``: asyncio replaces that
    with sentences of its own ("Connect call failed ('127.0.0.1', 9)",
    "error while attempting to bind on address ...").  An OSError without
    a number is its message."""
    if e.errno is None:
        return str(e)
    text = os.strerror(e.errno)
    return text[:1].lower() + text[1:]


def one_line(text: str) -> str:
    """Errors are one line, whatever a file name holds."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")
