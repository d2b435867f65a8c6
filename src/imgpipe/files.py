"""Small file-system helpers shared by the DAG build and the stages."""

from __future__ import annotations

import codecs
import json
import logging
import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

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

