"""Fingerprints of local sources by content, so reruns follow content, not clocks.

A class's crawl (and a predict folder's job) reruns when its fingerprint changes. Built
from sizes and modification times, a bare `touch` of an unchanged URL list re-crawled the
class and everything after it; built from file contents, only a real change does. The
sha256 of each file is cached by (path, size, mtime, inode), so a DAG build reads only
new or changed files: a 100,000-image folder is hashed once, then only stat-ed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from imgpipe.core.files import Found, walk_folder

log = logging.getLogger(__name__)

CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class FileHashCache:
    """sha256 per file, reused while a file's size, mtime and inode stay the same.

    Kept in a JSON file (by default none: in memory only); `save` writes it atomically
    when something was added.
    """

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else None
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, ValueError) as error:
                log.warning("file hash cache %s is unreadable (%s); hashing again", self.path, error)

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key = os.path.abspath(path)  # no symlink resolution: one lookup per file, not one per folder level
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.entries.get(key)
        if entry is not None and entry[:3] == stamp:
            return entry[3]
        digest = file_sha256(path)
        self.entries[key] = stamp + [digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not (self.path and self.changed):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(self.entries))
        partial.replace(self.path)
        self.changed = False


def content_fingerprint(path: Path, cache: FileHashCache, skip=None, follow_outside_links: bool = False) -> str:
    """'files=N sha256=...' over a file, or every file below a folder (but those `skip` says
    True of): relative paths and contents, so adding, removing, renaming or editing a file
    changes it and touching none does. The folder is walked as the crawl walks it
    (imgpipe.core.files.walk_folder), so a new dangling link, which the crawl lists, changes it too."""
    found = [Found(path)] if path.is_file() else walk_folder(path, follow_outside_links)
    found = [item for item in found if item.status or skip is None or not skip(item.path)]
    digest = hashlib.sha256()
    for item in found:
        relative = item.path.name if item.path == path else item.path.relative_to(path).as_posix()
        content = f"{item.status}: {item.reason}" if item.status else cache.sha256(item.path)
        digest.update(f"{relative}\0{content}\n".encode("utf-8"))
    files = sum(not item.status for item in found)
    return f"files={files} sha256={digest.hexdigest()[:16]}"
