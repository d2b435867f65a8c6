"""What a class's crawl has collected so far, kept across runs so that a crawl resumes.

A :class:`ClassStore` is a folder outside Snakemake's outputs (Snakemake deletes the
outputs of a job it reruns, and of one that was killed):

    files/        every body downloaded or imported, once per sha256, named 000000.jpg, ...
    journal.jsonl one line per URL or file tried: where it came from and what it gave

A body is written to a ``.part`` file and renamed into place before its journal line is
appended, so a kill leaves at most a ``.part`` file or a file without a line; both are
removed when the store is opened again. The journal is flushed after every line: a
SIGKILLed process loses nothing that was flushed (the OS has it).

Limits (:class:`CrawlLimits`) are not baked into the journal: it records what a file *is*
(decodable or not, its size and format), and the limits in force decide whether it is kept,
so changing ``crawl.min_size`` never downloads anything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgpipe.core.files import OutputWriteError, error_text, writing
from imgpipe.data.hashing import format_hash, perceptual_hashes
from imgpipe.data.images import IMAGE_EXTENSIONS, inspect_image
from imgpipe.data.nearmatch import DEFAULT_PIXEL_DIFFERENCE, PixelCheck, confirm

logger = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"
FILES = "files"
# What a journal line holds. "status" is what the body is (ok | corrupt) or that there was
# none (failed); limits turn ok into rejected only when a manifest is made.
RECORD_FIELDS = (
    "origin", "source", "engine", "query", "rank", "fetched_at", "http_status", "bytes", "content_type",
    "sha256", "stored", "status", "reason", "width", "height", "format", "phash", "phash_center", "final",
)
# "final" of a failure that asking again cannot change: for ever, or (CrawlLimits.setting) while
# the config key that caused it keeps its value.
ALWAYS = "always"
# The reason of a body refused for crawl.max_bytes starts so (the crawl writes it, the store reads it).
TOO_LARGE = "larger than crawl.max_bytes"
# What a rerun after a failed store write does: the store keeps what it has.
STORE_RERUN = "the crawl resumes from what the store has"
_STORED_NAME = re.compile(r"(\d{6,})(\.[a-z0-9]{1,5})?")


@dataclass(frozen=True)
class CrawlLimits:
    """What a crawled image must satisfy to be kept (config key ``crawl``)."""

    min_size: int = 32
    max_aspect: float = 10.0
    max_bytes: int = 50 * 2**20
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    formats: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF")
    timeout_s: float = 10.0
    time_budget_s: float | None = None
    # hosts (names, addresses, networks; perhaps with :port) fetched although they resolve to
    # loopback, private, link-local... addresses: see imgpipe.data.netguard
    allow_private_hosts: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, settings: dict | None) -> CrawlLimits:
        settings = dict(settings or {})
        if "formats" in settings:
            settings["formats"] = tuple(name.upper() for name in settings["formats"])
        if "allow_private_hosts" in settings:
            settings["allow_private_hosts"] = tuple(settings["allow_private_hosts"])
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in settings.items() if key in known})

    def setting(self, key: str) -> str:
        """``crawl.<name>=<value>`` of a key in force: a failure it caused stays final while this is the same."""
        name = key.removeprefix("crawl.")
        value = getattr(self, name)
        shown = ",".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else value
        return f"crawl.{name}={shown}"

    def rejection(self, record: dict) -> str:
        """Why a decodable image breaks a limit ("" when it is within all of them)."""
        width, height, image_format = record.get("width"), record.get("height"), record.get("format") or ""
        if width is None or height is None:
            return ""
        if min(width, height) < self.min_size:
            return f"too small: {width}x{height} px, below crawl.min_size {self.min_size}"
        if max(width, height) > self.max_aspect * min(width, height):
            ratio = max(width, height) / min(width, height)
            return f"aspect ratio {ratio:.1f} above crawl.max_aspect {self.max_aspect:g}"
        if width * height > self.max_pixels:
            return f"{width}x{height} = {width * height} pixels, above crawl.max_pixels {self.max_pixels}"
        if (record.get("bytes") or 0) > self.max_bytes:
            return f"{record['bytes']} bytes, above crawl.max_bytes {self.max_bytes}"
        if self.formats and image_format.upper() not in self.formats:
            return f"format {image_format} not in crawl.formats ({', '.join(self.formats)})"
        return ""


def effective_status(record: dict, limits: CrawlLimits) -> tuple[str, str]:
    """(status, reason) of a journal record under ``limits``: ok | rejected | corrupt | failed."""
    if record["status"] != "ok":
        return record["status"], record["reason"]
    reason = limits.rejection(record)
    return ("rejected", reason) if reason else ("ok", "")


_CANDIDATE_CHUNK = 16  # candidates of one new image pixel-tested at once


@dataclass
class TargetCounter:
    """Counts new, valid, non-duplicate images of a class towards its target.

    Duplicate means the same bytes, or (with ``near_distance``) a near duplicate of an image
    already counted, as the dedupe stage decides it (imgpipe.data.nearmatch.confirm): perceptual
    hashes within that many bits (whole or center) make a candidate, and the pixels of the
    stored files (in ``files``) confirm it, within ``near_pixel_difference`` gray levels.
    """

    target: int | None
    near_distance: int | None = None
    files: Path | None = None  # the store's files folder: records name their file in it ("stored")
    near_pixel_difference: float | None = None
    count: int = 0
    _shas: set = field(default_factory=set)
    # counted images' (whole, center) hashes, in an array that doubles when full: one
    # vectorised comparison per offer (100,000 images: ~1e10 popcounts in all, seconds)
    _hashes: np.ndarray = field(default_factory=lambda: np.zeros((1024, 2), dtype=np.uint64))
    _stored: list = field(default_factory=list)  # the file of each counted hash row
    _check: PixelCheck | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        if self._check is None:
            difference = DEFAULT_PIXEL_DIFFERENCE if self.near_pixel_difference is None else self.near_pixel_difference
            self._check = PixelCheck(difference)

    @property
    def reached(self) -> bool:
        return self.target is not None and self.count >= self.target

    def fresh(self) -> TargetCounter:
        """An empty counter with the same settings (sharing the decoded thumbnails)."""
        return TargetCounter(self.target, self.near_distance, self.files, self.near_pixel_difference,
                             _check=self._check)

    def offer(self, record: dict, limits: CrawlLimits) -> bool:
        """Count ``record`` if it is a kept image unlike every counted one; True if counted."""
        if effective_status(record, limits)[0] != "ok":
            return False
        with self._lock:
            if self.reached or record["sha256"] in self._shas:
                return False
            # (a store written before center hashes existed has only the whole one: it stands for both)
            values = [int(record[key], 16) for key in ("phash", "phash_center") if record.get(key)]
            if self.near_distance and values and record.get("stored") and self.files is not None:
                hashes = np.array([values[0], values[-1]], dtype=np.uint64)
                if self._near_a_counted_one(hashes, str(self.files / record["stored"])):
                    return False
                if len(self._stored) == len(self._hashes):
                    self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
                self._hashes[len(self._stored)] = hashes
                self._stored.append(str(self.files / record["stored"]))
            self._shas.add(record["sha256"])
            self.count += 1
            return True

    def _near_a_counted_one(self, hashes: np.ndarray, file: str) -> bool:
        known = self._hashes[:len(self._stored)]
        if not len(known):
            return False
        bits = np.bitwise_count(known[:, :, None] ^ hashes[None, None, :]).reshape(len(known), -1).min(axis=1)
        within = np.flatnonzero(bits <= self.near_distance)
        # Nearest first (then in counting order), in chunks: a copy is usually confirmed by its
        # nearest candidate, and the rest need no pixel test (this runs under the counter's lock).
        ordered = within[np.argsort(bits[within], kind="stable")]
        for start in range(0, len(ordered), _CANDIDATE_CHUNK):
            candidates = ordered[start:start + _CANDIDATE_CHUNK]
            verdict = confirm(known[candidates], np.repeat(hashes[None], len(candidates), axis=0),
                              [self._stored[k] for k in candidates], [file] * len(candidates), self.near_distance,
                              self._check)
            if verdict["confirmed"].any():
                return True
        return False


class ClassStore:
    """One class's downloads and journal (see the module docstring). Thread-safe."""

    def __init__(self, root: Path | str, limits: CrawlLimits | None = None):
        self.root = Path(root)
        self.limits = limits or CrawlLimits()  # what decides whether a failure is worth trying again
        self.files = self.root / FILES
        self.files.mkdir(parents=True, exist_ok=True)
        self.journal_path = self.root / JOURNAL
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._storing: dict[str, threading.Event] = {}  # sha256 being written by a thread -> done
        self.records = self._read_journal()
        self.latest: dict[str, dict] = {}
        self.stored_by_sha: dict[str, str] = {}
        # stored name -> the record that stored it: every file the journal refers to
        self._first_record_of: dict[str, dict] = {}
        for record in self.records:
            self._index(record)
        self._remove_leftovers()
        self._next_seq = 1 + max((_seq_of(name) for name in self._first_record_of), default=-1)
        self._journal = self.journal_path.open("a", encoding="utf-8")
        self._write_failed: OutputWriteError | None = None

    # -- reading what is there

    def _read_journal(self) -> list[dict]:
        if not self.journal_path.exists():
            return []
        records, good_bytes = [], 0
        with self.journal_path.open("rb") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                    if not line.endswith(b"\n"):
                        raise ValueError("no newline")
                except ValueError:
                    # a line cut by a kill is the last one; what follows it (nothing) is lost
                    logger.warning("%s: dropping a torn last line (%d bytes)", self.journal_path, len(line))
                    break
                records.append(record)
                good_bytes += len(line)
        if good_bytes != self.journal_path.stat().st_size:
            with self.journal_path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return records

    def _index(self, record: dict) -> None:
        self.latest[record["origin"]] = record
        if record.get("stored"):
            self.stored_by_sha.setdefault(record["sha256"], record["stored"])
            self._first_record_of.setdefault(record["stored"], record)

    def _remove_leftovers(self) -> None:
        for path in self.files.iterdir():
            if path.name not in self._first_record_of:
                logger.info("%s: removing %s, left by an interrupted crawl", self.root, path.name)
                path.unlink()

    # -- what is known

    def is_final(self, origin: str) -> bool:
        """True if ``origin`` was tried and trying again cannot change the answer.

        A body that arrived (good or not), an HTTP 4xx (but 408 and 429, which say "later") and
        a failure the crawl marked final (a redirect loop, a refused address or scheme, a body too
        slow for crawl.timeout_s) are final; network errors, time-outs and 5xx are tried again on
        the next run. A failure caused by a limit is tried again once that limit changes.
        """
        record = self.latest.get(origin)
        if record is None:
            return False
        if record["status"] != "failed":
            return True
        final = record.get("final") or ""
        if final:
            return final == ALWAYS or final == self.limits.setting(final.split("=", 1)[0])
        status = record.get("http_status")
        if record["reason"].startswith(TOO_LARGE):
            return (record.get("bytes") or 0) > self.limits.max_bytes  # tried again once the limit is raised
        return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)

    def claim(self, origin: str) -> bool:
        """Reserve ``origin`` for this thread: False if it is final or another thread has it."""
        with self._lock:
            if origin in self._in_flight or self.is_final(origin):
                return False
            self._in_flight.add(origin)
            return True

    def release(self, origin: str) -> None:
        with self._lock:
            self._in_flight.discard(origin)

    def path(self, stored: str) -> Path:
        return self.files / stored

    # -- adding

    def add_body(self, body: bytes, provenance: dict) -> dict:
        """Keep a downloaded body or a local file's bytes and journal what it is.

        The caller reads a local file: an error reading it is that input's (a `failed` row),
        never the store's, which `writing` would report as a failure to write the store.
        A body whose sha256 is already stored is not written again: its record points at the
        stored file. Returns the journal record.
        """
        sha, size = hashlib.sha256(body).hexdigest(), len(body)
        while True:  # the same bytes from two URLs at once: the second waits and reuses the first's file
            with self._lock:
                existing = self.stored_by_sha.get(sha)
                busy = self._storing.get(sha)
                if existing is None and busy is None:
                    seq = self._next_seq
                    self._next_seq += 1
                    self._storing[sha] = threading.Event()
                    break
            if existing is not None:
                break
            busy.wait()
        if existing is not None:
            first = self._first_record_of[existing]
            found = {key: first.get(key)
                     for key in ("status", "reason", "width", "height", "format", "phash", "phash_center")}
            return self._append({**provenance, "bytes": size, "sha256": sha, "stored": existing, **found})

        try:
            return self._store_new(body, provenance, sha, size, seq)
        finally:
            with self._lock:
                self._storing.pop(sha).set()

    def _store_new(self, body: bytes, provenance: dict, sha: str, size: int, seq: int) -> dict:
        part = self.files / f".{seq:06d}.part"
        with writing(part, STORE_RERUN, partial=part):
            part.write_bytes(body)
        check = inspect_image(part)  # crawl.max_pixels is applied by CrawlLimits.rejection, not here
        described = {**provenance, "bytes": size, "sha256": sha, "status": "ok" if check.ok else "corrupt",
                     "reason": check.reason, "width": check.width, "height": check.height, "format": check.format or ""}
        if check.format is None:
            # Not an image at all (an HTML page, a text file, a script): its record says so, and
            # nothing of it is kept, here or in the results.
            part.unlink()
            return self._append(described)
        # named by what Pillow found, never by the URL or file name it came under
        name = f"{seq:06d}{IMAGE_EXTENSIONS.get(check.format, '.bin')}"
        hashes = ("", "")
        if check.ok:
            try:
                hashes = tuple(map(format_hash, perceptual_hashes(part)))
            except Exception as error:  # noqa: BLE001 - decodable but not hashable (odd EXIF): still an image
                logger.warning("%s: no perceptual hash (%s)", provenance["origin"], error_text(error))
        with writing(self.files / name, STORE_RERUN):
            os.replace(part, self.files / name)
        return self._append({**described, "stored": name, "phash": hashes[0], "phash_center": hashes[1]})

    def add_failure(self, provenance: dict, reason: str, final: str = "") -> dict:
        """Journal an origin that gave no body (HTTP error, network error, too large); ``final``:
        :data:`ALWAYS` or a :meth:`CrawlLimits.setting` for a failure that asking again cannot change."""
        return self._append({**provenance, "status": "failed", "reason": reason, "final": final})

    def _append(self, record: dict) -> dict:
        record = {key: record.get(key) for key in RECORD_FIELDS}
        record["fetched_at"] = record["fetched_at"] or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key in ("query", "engine", "content_type", "sha256", "stored", "reason", "format", "phash",
                    "phash_center", "final"):
            record[key] = record[key] or ""
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            if self._write_failed is not None:
                # a line may be half written: nothing is appended to it (the next run drops a torn last line)
                raise self._write_failed
            try:
                with writing(self.journal_path, STORE_RERUN):
                    self._journal.write(line)
                    self._journal.flush()
            except OutputWriteError as error:
                self._write_failed = error
                raise
            self.records.append(record)
            self._index(record)
        return record

    def close(self) -> None:
        with self._lock, writing(self.journal_path, STORE_RERUN):
            try:
                if self._write_failed is None:
                    self._journal.flush()
                    os.fsync(self._journal.fileno())
            finally:
                self._journal.close()

    def __enter__(self) -> ClassStore:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:
            self.close()
        except OSError as close_error:  # (a full disk fails the flush again) the error that ended the crawl is the news
            logger.warning("%s: closing the journal failed too: %s", self.journal_path, error_text(close_error))


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (no second copy on disk), copying where links fail."""
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)


def _seq_of(name: str) -> int:
    match = _STORED_NAME.fullmatch(name)
    return int(match.group(1)) if match else -1

