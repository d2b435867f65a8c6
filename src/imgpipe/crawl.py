"""The crawl stage: collect one class's raw images from its sources, verify each, record its origin.

Sources (one dict each, exactly one kind key):

- ``{"folder": "dir"}``: every file below ``dir`` (recursive, sorted), copied.
- ``{"digits": 3}``: scikit-learn's builtin 8x8 handwritten digits of that class, as PNG.
- ``{"engine": "bing", "queries": [...], "max_num": 100, "filters": {...}, "threads": 4}``:
  an icrawler search-engine crawl per query (bing, baidu, google, flickr).
- ``{"urls": "urls.txt"}``: one URL per line, downloaded with icrawler's UrlListCrawler.

Every file is fully decoded with :func:`imgpipe.images.inspect_image`: good ones are stored as
``out_dir/{source_index:02d}_{seq:06d}{ext}``, undecodable ones under ``out_dir/rejected/``,
and URLs that gave no file become manifest rows with status ``failed``. Nothing is dropped
without a manifest row saying why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pandas as pd
import requests
from icrawler import ImageDownloader
from icrawler.builtin import BaiduImageCrawler, BingImageCrawler, FlickrImageCrawler, GoogleImageCrawler, UrlListCrawler
from icrawler.builtin.baidu import BaiduFeeder
from icrawler.builtin.bing import BingFeeder
from icrawler.builtin.google import GoogleFeeder
from icrawler.utils import Signal
from PIL import Image

from imgpipe.files import error_text, walk_files
from imgpipe.images import IMAGE_EXTENSIONS, ImageCheck, inspect_image

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "file",
    "class",
    "source",
    "source_index",
    "query",
    "origin",
    "sha256",
    "status",
    "reason",
    "width",
    "height",
    "format",
]

ENGINES = {
    "bing": BingImageCrawler,
    "baidu": BaiduImageCrawler,
    "google": GoogleImageCrawler,
    "flickr": FlickrImageCrawler,
}
# Flickr takes search parameters instead of filters; the others validate filters in their feeder.
_ENGINE_FEEDERS = {"bing": BingFeeder, "baidu": BaiduFeeder, "google": GoogleFeeder}

_SOURCE_KEYS = {
    "folder": {"folder"},
    "digits": {"digits"},
    "engine": {"engine", "queries", "max_num", "filters", "threads", "api_key"},
    "urls": {"urls", "threads"},
}
DEFAULT_MAX_NUM = 100
DEFAULT_THREADS = 4
DOWNLOAD_TIMEOUT_S = 10
DOWNLOAD_ATTEMPTS = 3
MAX_DOWNLOAD_BYTES = 50 * 2**20
PROGRESS_EVERY = 100
_SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")


@dataclass(frozen=True)
class Fetched:
    """One file a source produced, or one URL that produced none (``path`` None, ``reason`` says why)."""

    origin: str
    path: Path | None
    check: ImageCheck | None = None
    reason: str = ""
    query: str = ""


def crawl_class(class_name: str, sources: list[dict], out_dir: Path | str) -> pd.DataFrame:
    """Collect one class's images from ``sources`` into ``out_dir`` (absent or empty) and return the manifest.

    The manifest has one row per file or failed URL, columns :data:`MANIFEST_COLUMNS`, ordered
    by source index, then sequence. All sources are checked before anything is downloaded.
    """
    out_dir = Path(out_dir)
    checked = [_check_source(class_name, index, source) for index, source in enumerate(sources)]
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"crawl output folder {out_dir} is not empty: remove it and run again")

    rows: list[dict] = []
    for index, (kind, source) in enumerate(checked):
        writer = _SourceWriter(out_dir, class_name, kind, index)
        logger.info("class %r: sources[%d] %s %s", class_name, index, kind, _describe(kind, source))
        with tempfile.TemporaryDirectory(prefix=".staging-", dir=out_dir) as staging:
            for batch in _fetch_source(kind, source, Path(staging)):
                writer.store(batch, copy=kind == "folder")
        logger.info("class %r: sources[%d] done: %s", class_name, index, _count_statuses(writer.rows))
        rows.extend(writer.rows)

    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"source_index": "int64", "width": "Int64", "height": "Int64"})
    logger.info("class %r: %d rows: %s", class_name, len(manifest), _count_statuses(rows))
    return manifest


def _fetch_source(kind: str, source: dict, staging: Path) -> Iterator[list[Fetched]]:
    """The source's files in order, in batches (one per engine query); downloads go to ``staging``."""
    if kind == "folder":
        yield _folder_files(Path(source["folder"]))
    elif kind == "digits":
        yield _write_digits(source["digits"], staging)
    elif kind == "urls":
        yield download_urls(read_url_list(source["urls"]), staging, threads=source.get("threads", DEFAULT_THREADS))
    else:
        for number, query in enumerate(source["queries"]):
            yield crawl_engine_query(
                source["engine"],
                query,
                staging / f"query{number}",
                max_num=source.get("max_num", DEFAULT_MAX_NUM),
                filters=source.get("filters") or None,
                threads=source.get("threads", DEFAULT_THREADS),
                api_key=_flickr_api_key(source) if source["engine"] == "flickr" else None,
            )


def crawl_engine_query(
    engine: str,
    query: str,
    download_dir: Path,
    *,
    max_num: int = DEFAULT_MAX_NUM,
    filters: dict | None = None,
    threads: int = DEFAULT_THREADS,
    api_key: str | None = None,
    feeder_cls=None,
) -> list[Fetched]:
    """Run one icrawler search-engine crawl for ``query`` into ``download_dir``.

    At most ``max_num`` decodable images are kept. ``feeder_cls`` replaces the engine's
    feeder (the part that builds result-page URLs), e.g. to point the real parser and
    downloader at a local server.
    """
    options = dict(
        downloader_cls=RecordingDownloader,
        downloader_threads=threads,
        storage={"backend": "FileSystem", "root_dir": str(download_dir)},
        extra_downloader_args={"label": f"{engine} {query!r}"},
    )
    if feeder_cls is not None:
        options["feeder_cls"] = feeder_cls
    if engine == "flickr":
        crawler = FlickrImageCrawler(apikey=api_key, **options)
        crawler.crawl(max_num=max_num, text=query, **(filters or {}))
    else:
        crawler = ENGINES[engine](**options)
        crawler.crawl(keyword=query, filters=filters, max_num=max_num)
    fetched = [dataclasses.replace(item, query=query) for item in crawler.downloader.results()]
    if not fetched:
        logger.warning(
            "%s returned no image URLs for %r: the engine may have changed its result page "
            "(icrawler's parser finds nothing) or blocked the request",
            engine,
            query,
        )
    else:
        images = sum(item.check is not None and item.check.ok for item in fetched)
        log = logger.warning if images < max_num else logger.info
        log("%s %r: %d of max_num %d images from %d URLs", engine, query, images, max_num, len(fetched))
    return fetched


def read_url_list(path: Path | str) -> list[str]:
    """The URLs in a URL-list file: one per line, blank lines and ``#`` comments skipped, duplicates dropped."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    listed = [line for line in lines if line and not line.startswith("#")]
    urls = list(dict.fromkeys(listed))
    if len(urls) < len(listed):
        logger.warning("%s: %d duplicate URLs listed, each downloaded once", path, len(listed) - len(urls))
    return urls


def download_urls(urls: list[str], download_dir: Path, *, threads: int = DEFAULT_THREADS) -> list[Fetched]:
    """Download ``urls`` into ``download_dir`` with icrawler's UrlListCrawler; results in list order."""
    if not urls:
        return []
    crawler = UrlListCrawler(
        downloader_cls=RecordingDownloader,
        downloader_threads=threads,
        storage={"backend": "FileSystem", "root_dir": str(download_dir)},
        extra_downloader_args={"label": "url list"},
    )
    crawler.crawl(urls, max_num=0)  # 0: no limit (the default, 1000, would cut long lists)
    position = {url: number for number, url in enumerate(urls)}
    return sorted(crawler.downloader.results(), key=lambda item: position[item.origin])


class RecordingDownloader(ImageDownloader):
    """icrawler's image downloader, changed so that every URL it is given ends up in :meth:`results`.

    ImageDownloader loses images silently, so this one differs:
    - each task becomes a :class:`Fetched`: the file, or why there is none (HTTP status,
      network error after retries, size cap), instead of a log line only;
    - files are kept whatever they hold and verified with ``inspect_image``; the original
      ``keep_file`` drops non-images without a word and dies on a decompression bomb;
    - ``max_num`` counts decodable images;
    - workers stop when the parser has finished, not after 5 s without a new URL
      (which loses the rest of a crawl whenever a result page is slow).
    """

    def __init__(self, thread_num, signal, session, storage, label="", max_bytes=MAX_DOWNLOAD_BYTES):
        super().__init__(thread_num, signal, session, storage)
        self.label = label
        self.max_bytes = max_bytes
        self._records: list[tuple[int, Fetched]] = []
        self._started = 0

    def results(self) -> list[Fetched]:
        """What each URL gave, in the order the downloader took them from its queue."""
        return [item for _, item in sorted(self._records, key=lambda record: record[0])]

    def worker_exec(self, max_num, default_ext="jpg", req_timeout=DOWNLOAD_TIMEOUT_S, **kwargs):
        self.max_num = max_num
        while not self.signal.get("reach_max_num"):
            try:
                task = self.in_queue.get(timeout=0.1)
            except queue.Empty:
                if self.signal.get("parser_exited"):
                    break
                continue
            try:
                self.download(task, default_ext, req_timeout)
            finally:
                self.in_queue.task_done()

    def download(self, task, default_ext, timeout=DOWNLOAD_TIMEOUT_S, max_retry=DOWNLOAD_ATTEMPTS, **kwargs):
        url = task["file_url"]
        task["success"], task["filename"] = False, None
        with self.lock:
            if self.reach_max_num():
                self.signal.set(reach_max_num=True)
                return False
            seq = self._started
            self._started += 1
        try:
            content, reason = self._fetch(url, timeout, max_retry)
            if content is None:
                logger.info("%s: no file from %s: %s", self.label, url, reason)
                self._record(seq, Fetched(origin=url, path=None, reason=reason))
                return False
            filename = f"{seq:06d}{_kept_suffix(urlparse(url).path)}"
            self.storage.write(filename, content)
            path = Path(self.storage.root_dir) / filename
            check = inspect_image(path)
        except Exception as error:  # an exception would end this worker thread and strand its queue
            logger.exception("%s: downloading %s failed", self.label, url)
            self._record(seq, Fetched(origin=url, path=None, reason=f"download error: {error_text(error)}"))
            return False
        with self.lock:
            if check.ok:
                if self.reach_max_num():  # other threads filled max_num meanwhile
                    path.unlink()
                    return False
                self.fetched_num += 1
        self._record(seq, Fetched(origin=url, path=path, check=check))
        task["success"], task["filename"] = True, filename
        return check.ok

    def _fetch(self, url: str, timeout: float, attempts: int) -> tuple[bytes | None, str]:
        """(content, "") or (None, reason). Network errors are retried; HTTP errors are final."""
        reason = ""
        for _ in range(attempts):
            try:
                with self.session.get(url, timeout=timeout, stream=True) as response:
                    if response.status_code != 200:
                        return None, f"HTTP {response.status_code} {response.reason}".strip()
                    return self._read_capped(response)
            except requests.RequestException as error:
                reason = f"request failed after {attempts} attempts: {error_text(error)}"
        return None, reason

    def _read_capped(self, response) -> tuple[bytes | None, str]:
        too_large = f"larger than the {self.max_bytes} byte download limit"
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return None, too_large
        chunks, size = [], 0
        for chunk in response.iter_content(2**16):
            size += len(chunk)
            if size > self.max_bytes:
                return None, too_large
            chunks.append(chunk)
        return b"".join(chunks), ""

    def _record(self, seq: int, item: Fetched) -> None:
        with self.lock:
            self._records.append((seq, item))
            if len(self._records) % PROGRESS_EVERY == 0:
                logger.info("%s: %d URLs tried, %d images", self.label, len(self._records), self.fetched_num)


class _SourceWriter:
    """Places one source's files under their final names and makes their manifest rows."""

    def __init__(self, out_dir: Path, class_name: str, kind: str, index: int):
        self.out_dir = out_dir
        self.base = {"class": class_name, "source": kind, "source_index": index}
        self.index = index
        self.rows: list[dict] = []
        self.seq = 0

    def store(self, fetched: list[Fetched], copy: bool = False) -> None:
        for item in fetched:
            row = {**self.base, "query": item.query, "origin": item.origin}
            if item.path is None:
                self.rows.append(
                    {
                        **row,
                        "file": "",
                        "sha256": "",
                        "status": "failed",
                        "reason": item.reason,
                        "width": None,
                        "height": None,
                        "format": "",
                    }
                )
                continue
            check = item.check or inspect_image(item.path)
            stem = f"{self.index:02d}_{self.seq:06d}"
            self.seq += 1
            if check.ok:
                target = self.out_dir / (stem + (IMAGE_EXTENSIONS.get(check.format) or _kept_suffix(item.path.name)))
            else:
                target = self.out_dir / "rejected" / (stem + _kept_suffix(item.path.name))
                target.parent.mkdir(exist_ok=True)
            if copy:
                shutil.copyfile(item.path, target)
            else:
                shutil.move(item.path, target)
            self.rows.append(
                {
                    **row,
                    "file": str(target),
                    "sha256": _sha256(target),
                    "status": "ok" if check.ok else "corrupt",
                    "reason": check.reason,
                    "width": check.width,
                    "height": check.height,
                    "format": check.format or "",
                }
            )
            if self.seq % PROGRESS_EVERY == 0:
                logger.info("sources[%d]: %d files stored", self.index, self.seq)


def _check_source(class_name: str, index: int, source: dict) -> tuple[str, dict]:
    """The source's kind, after checking it can be used; ValueError/FileNotFoundError otherwise."""
    where = f"class {class_name!r} sources[{index}]"
    kinds = [kind for kind in ("folder", "digits", "urls", "engine") if kind in source]
    if len(kinds) != 1:
        raise ValueError(f"{where}: needs exactly one of folder, digits, engine, urls; got keys {sorted(source)}")
    kind = kinds[0]
    unknown = set(source) - _SOURCE_KEYS[kind]
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)} for a {kind} source (allowed: {sorted(_SOURCE_KEYS[kind])})"
        )
    for key in ("threads", "max_num"):
        value = source.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{key}: must be a positive integer, got {value!r}")

    if kind == "folder":
        folder = Path(source["folder"])
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}.folder: folder {folder} does not exist (class {class_name!r})")
    elif kind == "digits":
        digit = source["digits"]
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
            raise ValueError(f"{where}.digits: must be an integer 0-9, got {digit!r}")
    elif kind == "urls":
        if not Path(source["urls"]).is_file():
            raise FileNotFoundError(f"{where}.urls: URL list file {source['urls']} does not exist")
    else:
        _check_engine_source(where, source)
    return kind, source


def _check_engine_source(where: str, source: dict) -> None:
    engine = source["engine"]
    if engine not in ENGINES:
        raise ValueError(f"{where}.engine: {engine!r} is not one of {', '.join(ENGINES)}")
    queries = source["queries"]
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ValueError(f"{where}.queries: must be a non-empty list of non-empty strings, got {queries!r}")
    filters = source.get("filters") or None
    if filters is not None and not isinstance(filters, dict):
        raise ValueError(f"{where}.filters: must be a mapping, got {filters!r}")
    if engine == "flickr":
        _flickr_api_key(source, where)
    elif filters:
        # icrawler checks filters inside its feeder thread, where an error only kills the
        # thread and the crawl quietly returns nothing; check them here instead.
        try:
            _ENGINE_FEEDERS[engine](1, Signal(), None).get_filter().apply(filters)
        except (KeyError, ValueError, TypeError, AssertionError) as error:
            raise ValueError(f"{where}.filters: {error}") from None


def _flickr_api_key(source: dict, where: str = "a flickr source") -> str:
    key = source.get("api_key") or os.environ.get("FLICKR_API_KEY")
    if not key:
        raise ValueError(f"{where}: engine flickr needs an API key: set api_key in the source or FLICKR_API_KEY")
    return key


def _folder_files(folder: Path) -> list[Fetched]:
    return [Fetched(origin=str(path), path=path) for path in walk_files(folder)]


def _write_digits(digit: int, staging: Path) -> list[Fetched]:
    from sklearn.datasets import load_digits  # ~5 s import; only digits sources pay it

    digits = load_digits()
    fetched = []
    for number in (digits.target == digit).nonzero()[0]:
        pixels = (digits.images[number] * (255 / 16)).round().astype("uint8")
        path = staging / f"{number:04d}.png"
        Image.fromarray(pixels).save(path)  # 2-D uint8 gives mode L
        fetched.append(Fetched(origin=f"sklearn:digits#{number}", path=path))
    return fetched


def _kept_suffix(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if _SUFFIX.fullmatch(suffix) else ".bin"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(kind: str, source: dict) -> str:
    if kind == "engine":
        return f"{source['engine']} queries {source['queries']} (max_num {source.get('max_num', DEFAULT_MAX_NUM)})"
    return repr(source[kind])


def _count_statuses(rows: list[dict]) -> str:
    counts = Counter(row["status"] for row in rows)
    return ", ".join(f"{counts[status]} {status}" for status in ("ok", "corrupt", "failed"))
