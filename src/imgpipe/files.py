"""Small file-system helpers shared by the DAG build and the stages."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def walk_files(folder: Path | str) -> list[Path]:
    """Every file below `folder`, recursively, symlinked folders followed, in sorted order.

    (Path.rglob on Python < 3.13 silently skips symlinked subfolders.)
    """
    folder = Path(folder)
    files = []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        files.extend(Path(root) / name for name in names)
    return sorted((path for path in files if path.is_file()), key=lambda path: path.relative_to(folder).as_posix())


def error_text(error: BaseException) -> str:
    """'TypeName: message', or the type name alone when the message is empty."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# Why writing an output failed, by errno, and what to do about it. None of these says anything
# about the data being written: a stage that records a bad input and goes on must not record
# one of these as the input's fault (the image would be left out, the job would succeed, and
# the next run would find nothing to do).
WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on device", "free space there, then rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota (or have it raised), then rerun"),
    errno.EROFS: ("read-only file system", "make it writable or move the results elsewhere, then rerun"),
    errno.EACCES: ("permission denied", "give this user write access there, then rerun"),
    errno.EPERM: ("operation not permitted", "give this user write access there, then rerun"),
    errno.EFBIG: ("file too large", "raise the file-size limit (ulimit -f, or the file system's), then rerun"),
    errno.EIO: ("input/output error", "check the disk (dmesg), then rerun"),
}
# A write that failed without an errno (torch.save: "unexpected pos 29760 vs 29712") with less
# than this free where it wrote ran out of space.
FULL_BELOW_BYTES = 2**20


class OutputWriteError(OSError):
    """Writing a job's output failed: the job's failure, never an input's (see `writing`)."""


@contextlib.contextmanager
def writing(path: Path | str, then: str = "", partial: Path | None = None) -> Iterator[None]:
    """Any exception raised in the block is a failure to write ``path``: raised again as an
    :class:`OutputWriteError` that says the cause (no space left, read-only, ...), where, how
    much is free there, and what to do (``then``: what a rerun does, e.g. "training resumes
    from the last epoch"). The original stays attached as its ``__cause__``. ``partial``, a
    temporary file the block writes before renaming it to ``path``, is removed on failure: half
    a file is of no use, and on a full disk its space is wanted back.

    Where an error happened, not its type, tells a bad input from a bad output: Pillow raises
    OSError for a truncated image and for a full disk alike, so decode a file outside this
    block and write its result inside it.
    """
    try:
        yield
    except Exception as error:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        if isinstance(error, OutputWriteError):
            raise
        raise write_failure(error, path, then) from error


def write_failure(error: BaseException, path: Path | str, then: str = "", code: int | None = None) -> OutputWriteError:
    """The :class:`OutputWriteError` that says why writing ``path`` failed with ``error``
    (``code``: the errno, where the caller knows it and ``error`` does not carry it)."""
    code = code or _errno_in_chain(error)
    free, mount = free_space(path)
    if code not in WRITE_FAILURES and free is not None and free < FULL_BELOW_BYTES:
        code = errno.ENOSPC  # torch and others report a short write in their own words
    cause, advice = WRITE_FAILURES.get(code, ("failed", "see the error, then rerun"))
    where = f"; {_human_bytes(free)} free on {mount}" if free is not None else ""
    # the innermost error says it plainest: OSError's "No space left on device" rather than torch's
    # "unexpected pos 29760 vs 29712", sqlite3's "database or disk is full" rather than SQLAlchemy's page
    original = error_text(list(error_chain(error))[-1]).splitlines()[0]
    if len(original) > 300:
        original = original[:300] + "..."
    message = f"{cause} writing {path} ({original}{where}): {advice}" + (f"; {then}" if then else "")
    return OutputWriteError(code, message) if code is not None else OutputWriteError(message)


def write_json(path: Path | str, value, then: str = "") -> None:
    """``value`` as indented JSON (no final newline) at ``path``; a failure is an OutputWriteError."""
    with writing(path, then):
        Path(path).write_text(json.dumps(value, indent=2), encoding="utf-8")


def free_space(path: Path | str) -> tuple[int | None, str]:
    """(bytes free to this user, mount point) of the file system ``path`` is (or would be) on;
    (None, "") where even that cannot be found out."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None, ""
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return free, str(mount)


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then what it was raised from or while handling, and so on."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _errno_in_chain(error: BaseException) -> int | None:
    """The errno of ``error``, or of an OSError it was raised from or while handling (torch.save
    raises RuntimeError while handling the file's OSError)."""
    return next((link.errno for link in error_chain(error) if isinstance(link, OSError) and link.errno is not None),
                None)


def _human_bytes(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    scaled, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if scaled < 1024:
            break
        scaled, unit = scaled / 1024, bigger
    return f"{scaled:.1f} {unit}"


def prepend_to_pythonpath(folder: str) -> None:
    """Put `folder` first on PYTHONPATH, for the processes this one starts."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))


def read_optional_json(path: Path | str | None, what: str) -> dict | None:
    """A JSON file that adds information but is not needed: None when absent; damaged, a warning."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        log.warning("%s '%s' cannot be read (%s); going on without it. Rerun the job that writes it to restore %s",
                    what, path, error_text(error), what)
        return None

