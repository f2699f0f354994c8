"""Output files that appear whole or not at all, and standard output that
may go away.

Every file a command writes (replay's --out, --diverged, --evidence,
stats -o) goes through :func:`open_output`; a failed write is a one-line
ColoError naming the file.  :func:`stdout_guard` is for what goes to
standard output: a reader that went away (``| head``) ends the output,
not the command.  While outputs are written, :func:`terminate_as_interrupt`
turns SIGTERM and SIGHUP into an exception, so that what was half-written
is removed on the way out.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys

from .errors import ColoError, os_error_text


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        # not there yet: the same path once symlinks are followed
        return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def open_output(path):
    """An output file that appears whole or not at all: written to a
    temporary file beside it and renamed into place once the command has
    succeeded; removed on an error or Ctrl-C (a partial pcap that looks
    valid is worse than none).  ``-`` is stdout.  A symlink's target is
    written (the link stays); what is not a regular file (/dev/null, a
    FIFO) and what is under /dev or /proc (/dev/stdout) is written as it is:
    renaming over it would replace the device, pipe or link with a file.
    A failed write (a full disk, a size limit) is a one-line error naming
    the file."""
    if path == "-":
        out = Output(sys.stdout.buffer, "standard output")
        yield out
        out.flush()
        return
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        special = False         # not there yet: made below
    if special or os.path.abspath(path).startswith(("/dev/", "/proc/")):
        # (/dev/stdout, /dev/fd/N: whatever they point to is written, never renamed over)
        try:
            f = open(path, "wb")
        except OSError as e:
            raise ColoError(f"{path}: cannot write: {os_error_text(e)}") from None
        with _writing(f, path) as out:
            yield out
        return
    real = os.path.realpath(path)
    import tempfile
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(real) + ".", suffix=".part",
                                   dir=os.path.dirname(real))
    except OSError as e:
        raise ColoError(f"{path}: cannot write: {os_error_text(e)}") from None
    try:
        with _writing(os.fdopen(fd, "wb"), path) as out:
            yield out
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, real)
        except OSError as e:
            raise ColoError(f"{path}: cannot write: {os_error_text(e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _writing(f, name: str):
    """``f`` as an Output, flushed at the end and closed whatever happens
    (after a failed write, closing would only fail again on the rest of
    the buffer: that error is not the one to report)."""
    try:
        out = Output(f, name)
        yield out
        out.flush()
    finally:
        with contextlib.suppress(OSError):
            f.close()


class Output:
    """An output file as the writers see it (they only call ``write``): a
    write that fails is the user's trouble, not an internal error.  A
    closed pipe on standard output is left to ``cli.main`` (BrokenPipeError)."""

    __slots__ = ("_f", "_name")

    def __init__(self, f, name: str) -> None:
        self._f = f
        self._name = name

    @property
    def name(self) -> str:
        """What messages call it (the writers' errors name it too)."""
        return self._name

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            raise self._trouble(e) from None

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            raise self._trouble(e) from None

    def _trouble(self, e: OSError) -> BaseException:
        if isinstance(e, BrokenPipeError):
            if self._name == "standard output":
                return e
            return ColoError(f"{self._name}: cannot write: its reader went away")
        return ColoError(f"{self._name}: cannot write: {os_error_text(e)}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str, text: str) -> None:
    """A scraper never sees half a file (see open_output)."""
    try:
        with open_output(path) as f:
            f.write(text.encode())
    except OSError as e:
        raise ColoError(f"{path}: cannot write: {os_error_text(e)}") from None


def silence_stdout() -> None:
    """The reader of our output went away (``| head``): not an error of ours.
    Point stdout at /dev/null so nothing more (not even the interpreter's
    final flush) complains."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@contextlib.contextmanager
def stdout_guard():
    """Around a command's output: a closed pipe ends the output, not the
    command, which still exits with the status it found."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) during a command that writes files: unwound like
    Ctrl-C, so that no partial output is left behind, and exits 128 + the
    signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_interrupt():
    """While the block runs, SIGTERM and SIGHUP raise Terminated instead of
    ending the process on the spot (which would leave the temporary files
    of the outputs behind)."""
    import signal

    def raise_terminated(signum, _frame):
        raise Terminated(signum)
    saved = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            saved[sig] = signal.signal(sig, raise_terminated)
    except ValueError:           # not the main thread: nothing to install
        pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
