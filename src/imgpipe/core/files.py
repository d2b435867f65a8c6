"""Small file-system helpers shared by the DAG build and the stages."""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


FOLLOW_KEY = "follow_outside_links"


@dataclass(frozen=True)
class Found:
    """One thing below a folder: a file to read (``status`` ""), or why a path gives none
    (``failed``: a dangling link, a link out of the folder, not a regular file, unreadable;
    ``skipped``: a folder already walked under another path, through a link)."""

    path: Path
    status: str = ""
    reason: str = ""


def walk_folder(folder: Path | str, follow_outside_links: bool = False) -> list[Found]:
    """Every file below ``folder``, recursively, and every path that gives none with why, in sorted order.

    Symbolic links are followed while they stay inside the folder; one that leaves it (to
    ``/etc/passwd``, a home folder) is not, unless ``follow_outside_links``. Each real folder is
    walked once (by device and inode), so ``loop -> .`` costs one line, not a file count that
    grows with every loop. (Path.rglob on Python < 3.13 skips symlinked folders; os.walk with
    followlinks=True walks loops to the depth of the path limit and ignores unreadable folders.)
    """
    folder = Path(folder)
    inside = os.path.realpath(folder)
    found: list[Found] = []
    walked: dict[tuple[int, int], Path] = {}
    # real folders before linked ones, each in name order: a folder reached both ways is listed
    # under its own path, the same on every run
    pending, pending_links = deque([folder]), deque()
    while pending or pending_links:
        directory = (pending or pending_links).popleft()
        try:
            status = directory.stat()
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            found.append(Found(directory, "failed", f"folder not readable: {error_text(error)}"))
            continue
        real = (status.st_dev, status.st_ino)
        if real in walked:
            first = walked[real].relative_to(folder).as_posix()
            first = "the folder itself" if first == "." else first
            found.append(Found(directory, "skipped", f"a link to a folder already walked ({first}): its files are "
                                                     f"listed once"))
            continue
        walked[real] = directory
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                refusal = _link_refusal(path, inside, follow_outside_links)
                if refusal:
                    found.append(Found(path, "failed", refusal))
                    continue
            if entry.is_dir():
                (pending_links if entry.is_symlink() else pending).append(path)
            elif entry.is_file():
                found.append(Found(path))
            else:
                found.append(Found(path, "failed", "not a regular file (a FIFO, socket or device): not read"))
    return sorted(found, key=lambda item: item.path.relative_to(folder).as_posix())


def _link_refusal(link: Path, inside: str, follow_outside_links: bool) -> str:
    """Why a symbolic link below a folder is not followed ("" when it is)."""
    target = os.path.realpath(link)
    if not os.path.exists(target):
        return f"dangling symbolic link: its target {os.readlink(link)} does not exist"
    if follow_outside_links or os.path.commonpath([inside, target]) == inside:
        return ""
    return (f"symbolic link to {target}, outside the folder: not followed (set {FOLLOW_KEY}: true on the "
            f"folder source to import what such links point to)")


def walk_files(folder: Path | str, follow_outside_links: bool = False) -> list[Path]:
    """The files :func:`walk_folder` finds below ``folder`` (sorted), without what gives none."""
    return [item.path for item in walk_folder(folder, follow_outside_links) if not item.status]


def read_text_lines(path: Path | str, key: str) -> list[str]:
    """The lines of a hand-kept list (a URL list, an exclusion list): UTF-8 text.

    A byte-order mark (Windows editors write one) is dropped: left in, it sticks to the
    first entry, which then matches nothing. Other encodings fail naming ``key``, the file
    and the first byte that is not UTF-8.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        offset = error.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise ValueError(
            f"config key '{key}': {path} is not UTF-8 text: byte {offset} (line {line}) is "
            f"{data[offset:offset + 1]!r}. Save the file as UTF-8 (an editor's 'Save with encoding' or "
            f"`iconv -f latin1 -t utf-8`) and run again") from None


def read_list_entries(path: Path | str, key: str) -> list[tuple[int, str, str]]:
    """(line number, entry, comment) of each entry of a hand-kept list: one entry per line, blank
    lines ignored; a comment starts at a ``#`` at the start of a line or after whitespace (so URL
    fragments survive)."""
    entries = []
    for number, line in enumerate(read_text_lines(path, key), start=1):
        parts = re.split(r"(?:^|\s)#", line, maxsplit=1)
        entry, comment = parts[0].strip(), (parts[1].strip() if len(parts) > 1 else "")
        if entry:
            entries.append((number, entry, comment))
    return entries


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
    # "unexpected pos 29760 vs 29712", sqlite3's "database or disk is full" rather than SQLAlchemy's page;
    # but not past the error that carries the cause (a write failing while a refused URL was being
    # recorded was handling that refusal, which is not why it failed)
    chain = list(error_chain(error))
    carrier = next((link for link in chain if isinstance(link, OSError) and link.errno == code), None)
    original = error_text(carrier if carrier is not None else chain[-1]).splitlines()[0]
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

