"""The crawl stage: collect one class's raw images from its sources, verify each, record its origin.

Sources (one dict each, exactly one kind key; the config schema and ``imgpipe.config.validation``
validate them before any job runs):

- ``{"folder": "dir"}``: every file below ``dir`` (recursive, sorted), imported; links that
  leave the folder are not followed unless ``follow_outside_links`` (imgpipe.core.files.walk_folder).
- ``{"digits": 3}``: scikit-learn's builtin 8x8 handwritten digits of that class, as PNG.
- ``{"engine": "bing", "queries": [...], "query_suffixes": [...], "max_num": 100, ...}``:
  an icrawler search-engine crawl per query (bing, baidu, google, flickr).
- ``{"urls": "urls.txt"}``: one URL per line, downloaded with icrawler's downloader.
- ``{"greedy": "https://site/"}``: every image linked from the site's pages
  (icrawler's GreedyImageCrawler).

Everything goes through the class's :class:`~imgpipe.data.crawlstore.ClassStore`, kept across
runs: a rerun after a kill, a new query or a higher target never fetches a URL (or imports
a file) it already has, and a body already stored under another URL is not stored twice.
With a class ``target``, sources are tried in order (queries in order) until that many
new, valid, non-duplicate images are kept; otherwise the log, the summary and MLflow say
"exhausted at N of target".

The manifest has one row per URL or file the sources named: kept files are hard-linked
to ``out_dir/<sha256 prefix>.<ext>`` (:func:`content_name`), rejected and corrupt images to
``out_dir/rejected/``, and URLs that gave nothing (or were not tried, the target being
reached) and files that are not images have no file. Nothing is dropped without a row
saying why.

Every request goes through :mod:`imgpipe.data.netguard`: http and https only, and no loopback,
private or link-local address unless ``crawl.allow_private_hosts`` names it, checked at
every redirect hop.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin

import pandas as pd
import requests
import urllib3
from icrawler import ImageDownloader
from icrawler.builtin import (
    BaiduImageCrawler,
    BingImageCrawler,
    FlickrImageCrawler,
    GoogleImageCrawler,
    GreedyImageCrawler,
    UrlListCrawler,
)
from icrawler.builtin.bing import BingParser
from icrawler.builtin.greedy import GreedyParser
from PIL import Image

from imgpipe.core.files import (
    FOLLOW_KEY,
    OutputWriteError,
    error_text,
    read_text_lines,
    walk_folder,
)
from imgpipe.core.fingerprints import FileHashCache
from imgpipe.core.manifests import RAW_COLUMNS
from imgpipe.data import synthetic
from imgpipe.data.boxes import is_box_annotation
from imgpipe.data.crawlstore import (
    ALWAYS,
    TOO_LARGE,
    ClassStore,
    CrawlLimits,
    TargetCounter,
    effective_status,
    link_or_copy,
)
from imgpipe.data.netguard import AddressPolicy, RefusedURL, target_of

logger = logging.getLogger(__name__)
# Sources that import files from this machine (the others fetch URLs).
LOCAL_SOURCES = ("folder", "digits", "synthetic")

DEFAULT_MAX_NUM = 100
DEFAULT_THREADS = 4
DOWNLOAD_ATTEMPTS = 3
MAX_REDIRECTS = 10  # a chain this long is a trap or a misconfigured site (browsers stop at about 20)
PROGRESS_EVERY = 100
# How deep into an engine's results a query looks for its images, as a multiple of the
# images it still needs: results also hold dead links, duplicates and junk.
RESULT_DEPTH_FACTOR = 3
# icrawler's parser gives a page up after 3 requests of up to 5 s each: a site crawl waits that
# long without a new URL before it takes a page as lost (it ends at once when every page is parsed)
_PAGE_GIVE_UP_S = 3 * 5


class ParsedBingParser(BingParser):
    """Bing's parser, reading each result's metadata as JSON.

    icrawler's BingParser finds the image URL with a regular expression ending in ``.jpg``, so
    every PNG, WebP or GIF result (and every URL with a query string after .jpg) is lost.
    """

    def parse(self, response):
        import html
        import json

        from bs4 import BeautifulSoup

        soup = BeautifulSoup(response.content.decode("utf-8", "ignore"), "lxml")
        for div in soup.find_all("div", class_="imgpt"):
            anchor = div.find("a")
            if anchor is None or not anchor.get("m"):
                continue
            try:
                url = json.loads(html.unescape(anchor["m"])).get("murl")
            except (ValueError, AttributeError):
                continue
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                yield {"file_url": url}


class SiteParser(GreedyParser):
    """icrawler's greedy parser, fixed for real sites.

    GreedyParser ignores relative ``<img src>`` (most sites use them) and images without an
    image extension, and feeds every in-site link back however often it was seen, so two
    pages that link to each other are fetched forever. This one resolves every ``src`` and
    ``href`` against the page, and yields each page and each image URL once.
    """

    _PAGE_SUFFIXES = ("", ".html", ".htm", ".shtml", ".php", ".asp", ".aspx", ".jsp")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seen: set[str] = set()
        self._seen_lock = threading.Lock()
        self.pages_parsed = 0

    def site_finished(self) -> bool:
        """True once the site's pages are all parsed: a page was, and none waits or is being read.

        icrawler's parser marks a page done (``task_done``) after it has queued the page's images
        and links, so nothing is lost between the two. A page that never loads is never marked
        done: then the crawl ends on the downloader's idle time instead.
        """
        return self.pages_parsed > 0 and self.in_queue.unfinished_tasks == 0

    def _first_time(self, url: str) -> bool:
        with self._seen_lock:
            if url in self._seen:
                return False
            self._seen.add(url)
            return True

    def parse(self, response, domains):
        from urllib.parse import urljoin, urlsplit

        from bs4 import BeautifulSoup

        self._first_time(response.url.split("#", 1)[0].rstrip("/"))  # the start page is fed, not linked
        with self._seen_lock:
            self.pages_parsed += 1
        soup = BeautifulSoup(response.content.decode("utf-8", "ignore"), "lxml")
        def resolve(link: str) -> str:
            try:
                return urljoin(response.url, link.strip()).split("#", 1)[0]
            except ValueError:  # e.g. "http://[x/" (a bad IPv6 host): one broken link, not the end of the crawl
                logger.info("greedy: ignoring malformed link %r on %s", link, response.url)
                return ""

        for tag in soup.find_all("img", src=True):
            url = resolve(tag["src"])
            if url.startswith(("http://", "https://")) and self._first_time(url):
                yield {"file_url": url}
        for tag in soup.find_all("a", href=True):
            url = resolve(tag["href"]).rstrip("/")
            if not url.startswith(("http://", "https://")) or not self._first_time(url):
                continue
            suffix = Path(urlsplit(url).path).suffix.lower()
            if re.fullmatch(r"\.(jpe?g|png|gif|bmp|webp|tiff?)", suffix):
                yield {"file_url": url}
            elif suffix in self._PAGE_SUFFIXES and self.is_in_domain(url, domains):
                yield url  # a page of the site: icrawler feeds it back to be parsed


ENGINES = {
    "bing": BingImageCrawler,
    "baidu": BaiduImageCrawler,
    "google": GoogleImageCrawler,
    "flickr": FlickrImageCrawler,
}
_ENGINE_PARSERS = {"bing": ParsedBingParser}


def engine_queries(class_name: str, source: dict) -> list[str]:
    """The queries of an engine source: ``queries`` (default: the class name), each also with every suffix."""
    bases = source.get("queries") or [class_name.replace("_", " ")]
    suffixes = source.get("query_suffixes") or []
    return [query for base in bases for query in [base, *(f"{base} {suffix}" for suffix in suffixes)]]


@dataclass
class QueryOutcome:
    """What one query (or one URL list, folder, site) gave in this run."""

    source_index: int
    source: str
    engine: str = ""
    query: str = ""
    urls_seen: int | None = None  # None: not run (already complete, or target reached)
    new_images: int = 0
    images: int = 0


@dataclass
class _ClassCrawl:
    """The state of one class's crawl while its sources run in order."""

    class_name: str
    store: ClassStore
    limits: CrawlLimits
    counter: TargetCounter
    file_hashes: FileHashCache
    deadline: float | None
    feeder_cls: type | None = None  # replaces the engines' feeders (tests: a local server)
    outcomes: list[QueryOutcome] = field(default_factory=list)
    stopped_by_time: bool = False

    def out_of_time(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped_by_time = True
        return self.stopped_by_time

    def done(self) -> bool:
        return self.counter.reached or self.out_of_time()

    def not_tried_reason(self) -> str:
        if self.counter.reached:
            return f"not tried: target {self.counter.target} reached"
        return f"not tried: crawl.time_budget_s {self.limits.time_budget_s:g} s spent"

    def replay(self, record: dict, outcome: QueryOutcome) -> dict:
        """The row of a record fetched by an earlier run, counted towards the target.

        Rows past the target are marked skipped by _capped_at_target, so the data is the same
        whatever the store holds: a lower target gives the first images, not all ever fetched.
        """
        outcome.images += self.counter.offer(record, self.limits)
        return record

    def replay_all(self, records: list[dict], outcome: QueryOutcome) -> list[dict]:
        return [self.replay(record, outcome) for record in records]


def crawl_class(
    class_name: str,
    sources: list[dict],
    out_dir: Path | str,
    store_dir: Path | str | None = None,
    *,
    limits: CrawlLimits | None = None,
    target: int | None = None,
    near_distance: int | None = None,
    near_pixel_difference: float | None = None,
    file_hashes: FileHashCache | None = None,
    feeder_cls=None,
) -> tuple[pd.DataFrame, dict]:
    """Collect one class's images from ``sources`` into ``out_dir`` (absent or empty).

    ``store_dir`` keeps what was fetched across runs (default: ``<out_dir>.store`` beside
    it). Returns the manifest (columns :data:`~imgpipe.core.manifests.RAW_COLUMNS`, ordered by
    source, then by list or result order) and a summary (see :func:`summarize_crawl`).
    ``feeder_cls`` replaces the engines' feeders (tests point the real parsers at a local
    server with it).
    """
    out_dir = Path(out_dir)
    store_dir = Path(store_dir) if store_dir is not None else out_dir.with_name(out_dir.name + ".store")
    limits = limits or CrawlLimits()
    checked = [_source_kind(class_name, index, source) for index, source in enumerate(sources)]
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"crawl output folder {out_dir} is not empty: remove it and run again")

    started = time.monotonic()
    deadline = started + limits.time_budget_s if limits.time_budget_s else None
    with ClassStore(store_dir, limits) as store:
        counter = TargetCounter(target, near_distance if target else None, store.files, near_pixel_difference)
        if store.records:
            logger.info("class %r: resuming: %d URLs/files already tried", class_name, len(store.latest))
        crawl = _ClassCrawl(class_name, store, limits, counter, file_hashes or FileHashCache(), deadline, feeder_cls)
        rows: list[dict] = []
        for index, (kind, source) in enumerate(checked):
            logger.info("class %r: sources[%d] %s %s", class_name, index, kind, _describe(class_name, kind, source))
            fetch = {"folder": _folder_rows, "digits": _digits_rows, "synthetic": _synthetic_rows,
                     "urls": _url_list_rows, "engine": _engine_rows, "greedy": _greedy_rows}[kind]
            source_rows = fetch(crawl, index, source)
            rows.extend({**row, "source": kind, "source_index": index} for row in source_rows)
            logger.info("class %r: sources[%d] done: %s", class_name, index, _count_statuses(rows, limits, index))
        _fail_if_every_engine_is_dead(crawl)
        query_caps = {index: source["max_num"] for index, (kind, source) in enumerate(checked)
                      if kind in ("engine", "greedy") and source.get("max_num")}
        rows, final = _capped_at_target(rows, counter.fresh(), limits, query_caps)
        manifest = _materialise(rows, class_name, out_dir, store, limits)
    summary = summarize_crawl(crawl, final, manifest)
    log = logger.info if target is None or final.reached else logger.warning
    log("class %r: %s; %s (%.1f s)", class_name, summary["outcome"], _count_statuses(rows, limits),
        time.monotonic() - started)
    return manifest, summary


# ----------------------------------------------------------------------- sources


def _folder_rows(crawl: _ClassCrawl, index: int, source: dict) -> list[dict]:
    folder = Path(source["folder"])
    outcome = QueryOutcome(index, "folder", query=str(folder), urls_seen=0)
    rows = []
    for found in walk_folder(folder, source.get(FOLLOW_KEY, False)):
        path = found.path
        if found.status:  # a dangling link, a link out of the folder, a loop: a row says why, nothing is read
            rows.append({"origin": str(path), "status": found.status, "reason": found.reason})
            continue
        if is_box_annotation(path, source.get("boxes")):
            continue
        try:
            sha = crawl.file_hashes.sha256(path)
        except OSError as error:  # one unreadable input (no permission, an I/O error): its row, not the job's end
            rows.append(_unreadable(str(path), error))
            continue
        rows.append(_local_item(crawl, outcome, str(path), sha, path.read_bytes))
        if len(rows) % PROGRESS_EVERY == 0:
            logger.info("sources[%d]: %d files imported", index, len(rows))
    crawl.outcomes.append(outcome)
    return rows


def _digits_rows(crawl: _ClassCrawl, index: int, source: dict) -> list[dict]:
    from sklearn.datasets import load_digits  # ~5 s import; only digits sources pay it

    digits = load_digits()
    outcome = QueryOutcome(index, "digits", query=str(source["digits"]), urls_seen=0)

    def png(number) -> bytes:
        pixels = (digits.images[number] * (255 / 16)).round().astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")  # 2-D uint8 gives mode L
        return buffer.getvalue()

    rows = [_local_item(crawl, outcome, f"sklearn:digits#{number}", None, lambda number=number: png(number))
            for number in (digits.target == source["digits"]).nonzero()[0]]
    crawl.outcomes.append(outcome)
    return rows


def _synthetic_rows(crawl: _ClassCrawl, index: int, source: dict) -> list[dict]:
    chosen = synthetic.settings(source)
    outcome = QueryOutcome(index, "synthetic", query=f"digit {chosen['digit']}", urls_seen=0)
    rows = [_local_item(crawl, outcome, origin, None, lambda item=item: synthetic.render(chosen, item))
            for origin, item in synthetic.items(source)]
    crawl.outcomes.append(outcome)
    return rows


def _local_item(crawl: _ClassCrawl, outcome: QueryOutcome, origin: str, sha: str | None, body) -> dict:
    """The record of one local file (or generated image): the stored one while its content is the same."""
    outcome.urls_seen += 1
    record = crawl.store.latest.get(origin)
    if record is not None and sha in (None, record["sha256"]):
        return crawl.replay(record, outcome)
    if crawl.done():
        return _not_tried(origin, crawl)
    provenance = {"origin": origin, "source": outcome.source, "sha256": sha, "rank": outcome.urls_seen}
    try:
        # read here, not in the store: inside its `writing` block a read error would be reported
        # as a failure to write the store (a cached sha256 means the file was not read until now)
        content = body()
    except OSError as error:
        return _unreadable(origin, error)
    record = crawl.store.add_body(content, provenance)
    counted = crawl.counter.offer(record, crawl.limits)
    outcome.images += counted
    outcome.new_images += counted
    return record


def _unreadable(origin: str, error: OSError) -> dict:
    return {"origin": origin, "status": "failed", "reason": f"unreadable: {error_text(error)}; not imported"}


def _url_list_rows(crawl: _ClassCrawl, index: int, source: dict) -> list[dict]:
    urls = read_url_list(source["urls"], f"classes.{crawl.class_name}.sources[{index}].urls")
    outcome = QueryOutcome(index, "urls", query=str(source["urls"]), urls_seen=len(urls))
    rows = {url: crawl.replay(crawl.store.latest[url], outcome) for url in urls if crawl.store.is_final(url)}
    pending = [url for url in urls if url not in rows]  # never tried, or a failure worth trying again
    if pending and not crawl.done():
        logger.info("sources[%d]: %d of %d URLs to download", index, len(pending), len(urls))
        _run_crawler(UrlListCrawler, crawl, outcome, source.get("threads", DEFAULT_THREADS),
                     {"url_list": pending, "max_num": 0}, "url list")
        outcome.urls_seen = len(urls)  # the list, not only what was downloaded this time
    crawl.outcomes.append(outcome)
    # listed as this list's line, whichever run, thread or other source fetched it
    return [{**(rows.get(url) or crawl.store.latest.get(url) or _not_tried(url, crawl)), "engine": "", "query": "",
             "rank": rank} for rank, url in enumerate(urls, start=1)]


def _engine_rows(crawl: _ClassCrawl, index: int, source: dict) -> list[dict]:
    engine = source["engine"]
    per_query = source.get("max_num") or (None if crawl.counter.target is not None else DEFAULT_MAX_NUM)
    rows = []
    for query in engine_queries(crawl.class_name, source):
        outcome = QueryOutcome(index, "engine", engine, query)
        earlier = crawl.replay_all(_earlier_records(crawl.store, "engine", query, engine), outcome)
        crawl.outcomes.append(outcome)
        wanted = _images_wanted(crawl, per_query, outcome.images)
        if wanted <= 0 or crawl.done():
            rows.extend(earlier)
            continue
        crawler_cls = ENGINES[engine]
        options = {"parser_cls": _ENGINE_PARSERS[engine]} if engine in _ENGINE_PARSERS else {}
        if crawl.feeder_cls is not None:
            options["feeder_cls"] = crawl.feeder_cls
        if engine == "flickr":
            options["apikey"] = source.get("api_key") or os.environ.get("FLICKR_API_KEY")
            arguments = {"text": query, **(source.get("filters") or {})}
        else:
            arguments = {"keyword": query, "filters": source.get("filters") or None}
        # result pages to look through: icrawler's max_num also sets how many pages the feeder asks for
        # (from the top: results already answered are listed without a request, so the depth
        # counts them too and a raised target looks past them)
        arguments["max_num"] = min(1000, len(earlier) + wanted * RESULT_DEPTH_FACTOR)
        downloader = _run_crawler(crawler_cls, crawl, outcome, source.get("threads", DEFAULT_THREADS), arguments,
                                  f"{engine} {query!r}", query_limit=(per_query, outcome.images), **options)
        rows.extend(_in_rank_order(_latest_per_origin(earlier + downloader.records_in_rank_order())))
        if outcome.urls_seen == 0:
            logger.warning(
                "%s returned no image URL for query %r: icrawler's parser found nothing on the result page "
                "(the engine may have changed its page, as Google's has: icrawler issues #107, #135) or the "
                "engine blocked the request", engine, query)
        elif per_query and outcome.images < per_query and not crawl.done():
            logger.warning("%s %r: exhausted at %d of max_num %d images (%d result URLs)",
                           engine, query, outcome.images, per_query, outcome.urls_seen)
        else:
            logger.info("%s %r: %d new images from %d result URLs", engine, query, outcome.new_images,
                        outcome.urls_seen)
    return rows


def _greedy_rows(crawl: _ClassCrawl, index: int, source: dict) -> list[dict]:
    site = source["greedy"]
    outcome = QueryOutcome(index, "greedy", "greedy", site)
    earlier = crawl.replay_all(_earlier_records(crawl.store, "greedy", site, "greedy"), outcome)
    crawl.outcomes.append(outcome)
    per_site = source.get("max_num")
    if _images_wanted(crawl, per_site, outcome.images) <= 0 or crawl.done():
        return earlier
    downloader = _run_crawler(GreedyImageCrawler, crawl, outcome, source.get("threads", DEFAULT_THREADS),
                              {"domains": site, "max_num": 0}, f"greedy {site}", query_limit=(per_site, outcome.images),
                              idle_exit_s=_PAGE_GIVE_UP_S + 2 * crawl.limits.timeout_s, parser_cls=SiteParser)
    if outcome.urls_seen == 0:
        logger.warning("greedy %s: no image URL found on the site's pages", site)
    return _in_rank_order(_latest_per_origin(earlier + downloader.records_in_rank_order()))


def _earlier_records(store: ClassStore, source: str, query: str, engine: str = "") -> list[dict]:
    """What earlier runs of this query (or site) tried: the latest record per URL, in first-try order."""
    return _latest_per_origin([record for record in store.records if record["source"] == source
                               and record["query"] == query and record["engine"] == engine])


def _in_rank_order(records: list[dict]) -> list[dict]:
    """Results in the order the engine gave them, so a rerun lists (and counts) them as the first run did."""
    return sorted(records, key=lambda record: record.get("rank") or 0)


def _latest_per_origin(records: list[dict]) -> list[dict]:
    latest = {}
    for record in records:
        latest[record["origin"]] = record  # a key keeps its first position, takes the last value
    return list(latest.values())


def _images_wanted(crawl: _ClassCrawl, per_query: int | None, have: int) -> int:
    """How many more images a query should look for: its own cap and the class's target."""
    wanted = []
    if per_query:
        wanted.append(per_query - have)
    if crawl.counter.target is not None:
        wanted.append(crawl.counter.target - crawl.counter.count)
    return min(wanted) if wanted else DEFAULT_MAX_NUM


def _run_crawler(crawler_cls, crawl: _ClassCrawl, outcome: QueryOutcome, threads: int, arguments: dict,
                 label: str, query_limit: tuple[int | None, int] = (None, 0), idle_exit_s: float | None = None,
                 **options) -> StoreDownloader:
    crawler = crawler_cls(
        downloader_cls=StoreDownloader,
        downloader_threads=threads,
        storage={"backend": "FileSystem", "root_dir": str(crawl.store.files)},
        extra_downloader_args={"crawl": crawl, "outcome": outcome, "label": label, "query_limit": query_limit,
                               "idle_exit_s": idle_exit_s},
        log_level=logging.WARNING,
        **options,
    )
    if isinstance(crawler.parser, SiteParser):
        crawler.downloader.site_finished = crawler.parser.site_finished
    crawler.crawl(**arguments)
    downloader: StoreDownloader = crawler.downloader
    if downloader.write_error is not None:
        raise downloader.write_error
    outcome.urls_seen = downloader.seen
    outcome.new_images = downloader.counted
    outcome.images += downloader.counted
    return downloader


def read_url_list(path: Path | str, key: str = "urls") -> list[str]:
    """The URLs in a URL-list file (config key ``key``): one per line, blank lines and ``#``
    comments skipped, duplicates dropped; UTF-8, with or without a byte-order mark."""
    lines = [line.strip() for line in read_text_lines(path, key)]
    listed = [line for line in lines if line and not line.startswith("#")]
    urls = list(dict.fromkeys(listed))
    if len(urls) < len(listed):
        logger.warning("%s: %d duplicate URLs listed, each downloaded once", path, len(listed) - len(urls))
    return urls


class StoreDownloader(ImageDownloader):
    """icrawler's image downloader, changed so that every URL it is given ends up in the class's store.

    ImageDownloader loses images silently, so this one differs:
    - each URL becomes a journal record: the body, or why there is none (HTTP status,
      network error after retries, size or time limit), instead of a log line only;
    - a URL the store already has is not requested; a body is kept whatever it holds and
      verified (``keep_file`` drops non-images without a word and dies on a decompression bomb);
    - it stops when the class's target (or the query's max_num) counts enough new, valid,
      non-duplicate images, or the class's time budget is spent;
    - workers stop when the parser has finished, not after 5 s without a new URL
      (which loses the rest of a crawl whenever a result page is slow).
    """

    def __init__(self, thread_num, signal, session, storage, crawl=None, outcome=None, label="",
                 query_limit=(None, 0), idle_exit_s=None):
        super().__init__(thread_num, signal, session, storage)
        self.crawl: _ClassCrawl = crawl
        # the crawler's feeder and parser share this session: result pages and a site's pages
        # are guarded too
        self.address_policy = AddressPolicy(crawl.limits.allow_private_hosts)
        for scheme in ("http://", "https://"):
            session.mount(scheme, self.address_policy.adapter())
        self.outcome: QueryOutcome = outcome
        self.label = label
        self.per_query, self.query_had = query_limit
        # GreedyImageCrawler's feeder and parser never finish on their own: its crawl ends when
        # the site's parser says every page is parsed (site_finished), or, if a page never
        # loads, when no new URL has come for idle_exit_s.
        self.idle_exit_s = idle_exit_s
        self.site_finished = None
        self.seen = 0  # results taken in rank order (see _keep)
        self.counted = 0
        self._records: list[dict] = []
        # Ranks are handed out in queue order (the parser's result order), under a lock held
        # across the get, so that no thread's timing can swap two results' numbers.
        self._take_lock = threading.Lock()
        self._ranks_taken = 0
        self._finished: dict[int, dict] = {}  # answered ranks waiting for a lower one
        self._stopped = False
        self.write_error: OutputWriteError | None = None  # raised by _run_crawler in the crawl's own thread

    def records_in_rank_order(self) -> list[dict]:
        return list(self._records)

    def _should_stop(self) -> bool:
        query_full = self.per_query is not None and self.query_had + self.counted >= self.per_query
        return query_full or self.crawl.done()

    def worker_exec(self, max_num=0, default_ext="jpg", req_timeout=None, **kwargs):
        last_task = time.monotonic()
        while not self.signal.get("reach_max_num"):
            with self._take_lock:
                try:
                    task = self.in_queue.get(timeout=0.1)
                except queue.Empty:
                    task = None
                else:
                    self._ranks_taken += 1
                    rank = self._ranks_taken
            if task is None:
                idle = self.idle_exit_s is not None and time.monotonic() - last_task > self.idle_exit_s
                # (read before the queue: a parser queues a page's images before marking it done)
                idle = idle or (self.site_finished is not None and self.site_finished() and self.in_queue.empty())
                if self.signal.get("parser_exited") or idle or self.crawl.out_of_time():
                    if idle or self.crawl.out_of_time():
                        self.signal.set(reach_max_num=True)
                    break
                continue
            last_task = time.monotonic()
            try:
                self.download(task, rank=rank)
            finally:
                self.in_queue.task_done()

    def download(self, task, default_ext="jpg", timeout=None, max_retry=DOWNLOAD_ATTEMPTS, rank=0, **kwargs):
        url = task["file_url"]
        task["success"], task["filename"] = False, None
        if self._stopped or self.crawl.out_of_time():
            self.signal.set(reach_max_num=True)
            return False
        record = self._answer(url, rank, max_retry)
        if record is not None:
            self._keep(rank, record)
        return False

    def _answer(self, url: str, rank: int, attempts: int) -> dict | None:
        """The store's record of ``url``: fetched now, or the answer an earlier fetch gave."""
        while not self.crawl.store.claim(url):
            # Already answered (perhaps for another query, or an earlier run): never requested twice,
            # but listed and counted here like any other result. Another thread fetching it now:
            # its answer is this rank's too.
            if self.crawl.store.is_final(url):
                # listed where this result stands, not where the fetch that answered it stood: which
                # query (or a download in flight when a query stopped) got there first is timing
                return {**self.crawl.store.latest[url], **self._listing(rank)}
            if self._stopped or self.crawl.out_of_time():
                return None
            time.sleep(0.05)
        provenance = {"origin": url, **self._listing(rank)}
        try:
            return self._fetch_and_store(url, provenance, attempts)
        except OutputWriteError as error:  # the store's disk, not the URL: the job fails once the threads stop
            self.write_error = self.write_error or error
            self._stopped = True
            self.signal.set(reach_max_num=True)
            return None
        except Exception as error:  # an exception would end this worker thread and strand its queue
            logger.exception("%s: storing %s failed", self.label, url)
            return self.crawl.store.add_failure(provenance, f"download error: {error_text(error)}")
        finally:
            self.crawl.store.release(url)

    def _listing(self, rank: int) -> dict:
        """Where a result stands: this source, engine and query (a URL list has none), and its rank."""
        return {"source": self.outcome.source, "engine": self.outcome.engine,
                "query": self.outcome.query if self.outcome.source in ("engine", "greedy") else "", "rank": rank}

    def _keep(self, rank: int, record: dict) -> None:
        """Count answers in rank order, whatever order the threads finish in.

        The target and a query's max_num are checked on the results before them alone, so the
        crawl stops at the same result in every run: the same images, numbered the same.
        Answers that arrive after the stop stay in the store (a rerun uses them) but not in
        this run's rows.
        """
        with self.lock:
            self._finished[rank] = record
            while not self._stopped and self.seen + 1 in self._finished:
                self.seen += 1
                record = self._finished.pop(self.seen)
                self._records.append(record)
                self.counted += self.crawl.counter.offer(record, self.crawl.limits)
                if self.seen % PROGRESS_EVERY == 0:
                    logger.info("%s: %d URLs tried, %d new images", self.label, self.seen, self.counted)
                if self._should_stop():
                    self._stopped = True
                    self.signal.set(reach_max_num=True)

    def _fetch_and_store(self, url: str, provenance: dict, attempts: int) -> dict:
        """One record for ``url``: its body, or why there is none.

        Only what may pass on another try is tried again (``attempts`` times, and on the next
        run): a connection refused or reset, a time-out, a 5xx. An answer that asking again
        cannot change is recorded as final after one request: a refused address or scheme, a
        redirect loop, a body too slow for crawl.timeout_s.
        """
        limits = self.crawl.limits
        reason = ""
        for _ in range(attempts):
            try:
                with self._get_following_redirects(url, limits.timeout_s) as response:
                    provenance = {**provenance, "http_status": response.status_code,
                                  "content_type": response.headers.get("Content-Type", "")}
                    if response.status_code != 200:
                        return self.crawl.store.add_failure(
                            provenance, f"HTTP {response.status_code} {response.reason}".strip())
                    body, reason, size = self._read_capped(response, limits)
                    if body is not None:
                        return self.crawl.store.add_body(body, provenance)
                    if reason.startswith(TOO_LARGE):
                        # the same body again would be as large; its size makes the answer final
                        return self.crawl.store.add_failure({**provenance, "bytes": size}, reason)
                    return self.crawl.store.add_failure(provenance, reason, final=limits.setting("timeout_s"))
            except RefusedURL as refusal:
                final = limits.setting(refusal.while_key) if refusal.while_key else ALWAYS
                return self.crawl.store.add_failure(provenance, str(refusal), final=final)
            except (requests.RequestException, urllib3.exceptions.HTTPError) as error:  # read1 raises urllib3's own
                reason = f"request failed after {attempts} attempts: {error_text(error)}"
        return self.crawl.store.add_failure(provenance, reason)

    def _get_following_redirects(self, url: str, timeout: float) -> requests.Response:
        """The streamed response at the end of ``url``'s redirects, each hop checked by the
        address policy (requests' own redirects would reach any address, and any scheme).
        RefusedURL for a refused hop, a loop, or more than MAX_REDIRECTS redirects."""
        chain = [url]
        while True:
            try:
                # the URL's form here, in our words; its address in the session's guarded adapter,
                # which checks every request before it is sent (one lookup, not two)
                target_of(url)
                response = self.session.get(url, timeout=timeout, stream=True, allow_redirects=False)
            except RefusedURL as refusal:
                if len(chain) == 1:
                    raise
                raise RefusedURL(f"redirected to {url[:200]}: {refusal}", refusal.while_key) from None
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as error:
                raise RefusedURL(f"malformed URL {url[:200]!r}: {error_text(error)}") from None
            if not response.is_redirect:
                return response
            target = self.session.get_redirect_target(response)
            response.close()
            url = urljoin(url, target)
            if url in chain:
                raise RefusedURL(f"redirect loop: {' -> '.join(chain + [url])}")
            if len(chain) > MAX_REDIRECTS:
                raise RefusedURL(f"more than {MAX_REDIRECTS} redirects: {' -> '.join(chain[:3])} -> ...")
            chain.append(url)

    @staticmethod
    def _read_capped(response, limits: CrawlLimits) -> tuple[bytes | None, str, int]:
        """(body, "", size), or (None, why, bytes seen) for a body too large or too slow."""
        too_large = f"{TOO_LARGE} ({limits.max_bytes} bytes)"
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            return None, too_large, int(declared)
        chunks, size, started = [], 0, time.monotonic()
        # read1 returns what has arrived (up to 64 KiB) instead of waiting for a full block, so
        # the clock is checked while a server drips; decode_content undoes gzip like iter_content
        while chunk := response.raw.read1(2**16, decode_content=True):
            size += len(chunk)
            if size > limits.max_bytes:
                return None, too_large, size
            # requests' timeout is per read: a server dripping a byte a second never trips it
            if time.monotonic() - started > limits.timeout_s:
                return None, f"too slow: body not complete within crawl.timeout_s ({limits.timeout_s:g} s)", size
            chunks.append(chunk)
        return b"".join(chunks), "", size


# ---------------------------------------------------------------------- manifest


def _not_tried(origin: str, crawl: _ClassCrawl) -> dict:
    return {"origin": origin, "status": "skipped", "reason": crawl.not_tried_reason()}


# What a row past a cap keeps: whether it was fetched before the crawl stopped depends on
# thread timing (and on what the store held), so nothing of what a fetch found is listed.
_LISTING_FIELDS = ("origin", "source", "source_index", "engine", "query", "rank")


def _capped_at_target(rows: list[dict], counter: TargetCounter, limits: CrawlLimits,
                      query_caps: dict[int, int] | None = None) -> tuple[list[dict], TargetCounter]:
    """The rows as the manifest lists them: each URL once (the first time a source named it),
    and everything after the target-th new image (``counter``, a fresh one, counts them; or after
    a query's ``max_num``-th, for the sources in ``query_caps``: source index -> max_num) ``skipped``.

    Downloads run in parallel and a store can hold more than this run asked for; counting again
    here, in the manifest's order, gives the same rows whatever was fetched past a cap.
    """
    per_query: Counter = Counter()
    query_caps = query_caps or {}
    listed, capped = set(), []
    for row in rows:
        if row["origin"] in listed:
            continue
        listed.add(row["origin"])
        query = (row.get("source_index"), row.get("query") or "")
        cap = query_caps.get(row.get("source_index"))
        if counter.reached:
            row = _skipped(row, f"beyond target {counter.target}")
        elif cap is not None and per_query[query] >= cap:
            row = _skipped(row, f"beyond sources[{row.get('source_index')}].max_num {cap}")
        elif row["status"] != "skipped":
            per_query[query] += counter.offer(row, limits)
        capped.append(row)
    return capped, counter


def _skipped(row: dict, reason: str) -> dict:
    listing = {key: row.get(key) for key in _LISTING_FIELDS}
    listing |= {key: listing[key] or "" for key in ("engine", "query")}  # a record has "", a row never tried None
    return {**listing, "status": "skipped", "reason": reason}


def _materialise(rows: list[dict], class_name: str, out_dir: Path, store: ClassStore,
                 limits: CrawlLimits) -> pd.DataFrame:
    """Link the rows' files from the store into ``out_dir`` and make the manifest.

    A file is named after its content (see :func:`content_name`), not after the store's
    numbering, which follows the order downloads finished in: the same images get the same
    names in every run, and so the same places in every sorted list after this stage.
    """
    table = []
    linked: dict[Path, str] = {}  # file -> the sha256 it holds
    for row in rows:
        status, reason = effective_status(row, limits)
        file = ""
        if row.get("stored") and status != "skipped":
            folder = out_dir if status == "ok" else out_dir / "rejected"
            target = folder / content_name(row["sha256"], row["stored"])
            if linked.get(target, row["sha256"]) != row["sha256"]:  # 64 bits shared by two images
                target = folder / content_name(row["sha256"], row["stored"], digits=64)
            if target not in linked:
                link_or_copy(store.path(row["stored"]), target)
                linked[target] = row["sha256"]
            file = str(target)
        table.append({**{column: row.get(column) for column in RAW_COLUMNS}, "file": file, "class": class_name,
                      "status": status, "reason": reason})
        if row.get("source") in LOCAL_SOURCES:
            # When a local file was imported says nothing about it, and would make two runs of
            # one config differ (the store's journal keeps the time).
            table[-1]["fetched_at"] = ""
    manifest = pd.DataFrame(table, columns=RAW_COLUMNS)
    for column in ("rank", "http_status", "bytes", "width", "height"):
        manifest[column] = manifest[column].astype("Int64")
    manifest["source_index"] = manifest["source_index"].astype("int64")
    for column in RAW_COLUMNS:
        if manifest[column].dtype == object:
            manifest[column] = manifest[column].fillna("")
    return manifest


def content_name(sha256: str, stored: str, digits: int = 16) -> str:
    """A collected file's name: the first ``digits`` hex digits of its sha256 and the stored file's suffix.

    16 digits, 64 bits: two different images share a name with odds of about n^2 / 3.7e19 (1e-9
    for 100,000 images of one class); the crawl names such a pair by their whole sha256.
    """
    return sha256[:digits].lower() + PurePosixPath(stored).suffix


def summarize_crawl(crawl: _ClassCrawl, counted: TargetCounter, manifest: pd.DataFrame) -> dict:
    """The class's crawl in figures: outcome sentence, counts per status, per query (``counted``:
    the new images of the manifest). No time: the same crawl from the same store gives the
    same summary (the log and the MLflow run say how long it took)."""
    target, kept = counted.target, counted.count
    if target is None:
        outcome = f"{kept} new images (no target)"
    elif counted.reached:
        outcome = f"target {target} reached"
    elif crawl.stopped_by_time:
        outcome = f"crawl.time_budget_s ({crawl.limits.time_budget_s:g} s) spent at {kept} of target {target}"
    else:
        outcome = f"exhausted at {kept} of target {target}"
    statuses = manifest["status"].value_counts()
    return {
        "class": crawl.class_name,
        "target": target,
        "images": kept,
        "target_reached": counted.reached if target is not None else None,
        "outcome": outcome,
        "rows": len(manifest),
        "statuses": {status: int(statuses.get(status, 0)) for status in ("ok", "rejected", "corrupt", "failed",
                                                                         "skipped")},
        "bytes": int(manifest.loc[manifest["file"] != "", "bytes"].fillna(0).sum()),
        "queries": [vars(outcome) for outcome in crawl.outcomes],
    }


def _fail_if_every_engine_is_dead(crawl: _ClassCrawl) -> None:
    engine_runs = [outcome for outcome in crawl.outcomes if outcome.source == "engine"]
    ran = [outcome for outcome in engine_runs if outcome.urls_seen is not None]
    if ran and all(outcome.urls_seen == 0 and outcome.images == 0 for outcome in engine_runs):
        tried = ", ".join(f"{outcome.engine} {outcome.query!r}" for outcome in ran)
        raise RuntimeError(
            f"class {crawl.class_name!r}: no search engine returned a single image URL ({tried}). icrawler's "
            f"parser finds nothing on the engine's result page (Google's has changed: icrawler issues #107, "
            f"#135) or the engine blocked the requests. Use another engine (bing), a urls list or a folder "
            f"for classes.{crawl.class_name}.sources.")


# ------------------------------------------------------------------------- misc


def _source_kind(class_name: str, index: int, source: dict) -> tuple[str, dict]:
    kinds = [kind for kind in ("folder", "digits", "synthetic", "urls", "engine", "greedy") if kind in source]
    if len(kinds) != 1:
        raise ValueError(f"classes.{class_name}.sources[{index}]: needs exactly one of folder, digits, synthetic, "
                         f"engine, urls, greedy; got keys {sorted(source)}")
    return kinds[0], source


def _describe(class_name: str, kind: str, source: dict) -> str:
    if kind == "engine":
        return f"{source['engine']} queries {engine_queries(class_name, source)}"
    return repr(source[kind])


def _count_statuses(rows: list[dict], limits: CrawlLimits, index: int | None = None) -> str:
    counts = Counter(effective_status(row, limits)[0] for row in rows
                     if index is None or row.get("source_index") == index)
    return ", ".join(f"{counts[status]} {status}" for status in ("ok", "rejected", "corrupt", "failed", "skipped")
                     if counts[status] or status in ("ok", "failed"))
