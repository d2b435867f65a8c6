"""The crawl stage against real icrawler crawlers and a local, fault-injecting HTTP server."""

import hashlib
import html
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from crawl_server import (
    HTML_PAGE,
    LocalServer,
    Response,
    distinct_jpeg,
    image_bytes,
    png_claiming_size,
    truncated_jpeg,
)
from icrawler import Feeder
from icrawler.builtin import BingParser
from icrawler.utils import Signal
from PIL import Image

from imgpipe.core.manifests import RAW_COLUMNS
from imgpipe.data.crawl import ParsedBingParser, crawl_class, engine_queries, read_url_list
from imgpipe.data.crawlstore import ClassStore, CrawlLimits

BING_PAGE = Path(__file__).parent / "data" / "bing_async_tank.html"
RECORDED_HOST = "http://images.example.test"

RED_JPEG = image_bytes("JPEG", (48, 40), (200, 30, 30))
BLUE_PNG = image_bytes("PNG", (40, 40), (30, 30, 200))
GREEN_JPEG = image_bytes("JPEG", (64, 48), (30, 200, 30))
TINY_PNG = image_bytes("PNG", (8, 8), (90, 90, 90))
TRUNCATED_JPEG = truncated_jpeg()
# Every test server listens on 127.0.0.1, which the crawl refuses unless allowed
LOOPBACK = ("127.0.0.1",)
FAST = CrawlLimits(timeout_s=2, allow_private_hosts=LOOPBACK)


def truncated_jpeg_of(seed: int) -> bytes:
    whole = distinct_jpeg(seed)
    return whole[: len(whole) // 2]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.jpg"


def crawl(class_name, sources, tmp_path, out="out", **options):
    """crawl_class into tmp_path/out with its store in tmp_path/store (kept across calls)."""
    out_dir = tmp_path / out
    return crawl_class(class_name, sources, out_dir, tmp_path / "store", **{"limits": FAST, **options})


def names(manifest, out_dir):
    return [Path(file).relative_to(out_dir).as_posix() if file else "" for file in manifest.file]


# --- folder ------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "b_nested" / "deeper").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(RED_JPEG)
    (folder / "b_nested" / "blue.PNG").write_bytes(BLUE_PNG)
    (folder / "b_nested" / "deeper" / "cut.jpg").write_bytes(TRUNCATED_JPEG)
    (folder / "b_nested" / "notes.txt").write_text("shot on a sunny day\n")
    (folder / "b_nested" / "icon.png").write_bytes(TINY_PNG)
    (folder / "c.bmp").write_bytes(image_bytes("BMP", (50, 60)))
    return folder


def test_folder_source_imports_verifies_and_rejects(image_folder, tmp_path):
    manifest, summary = crawl("tank", [{"folder": str(image_folder)}], tmp_path)
    out_dir = tmp_path / "out"

    assert list(manifest.columns) == RAW_COLUMNS
    # sorted by path below the folder, nested folders included
    assert [Path(origin).relative_to(image_folder).as_posix() for origin in manifest.origin] == [
        "a.jpg", "b_nested/blue.PNG", "b_nested/deeper/cut.jpg", "b_nested/icon.png", "b_nested/notes.txt", "c.bmp"]
    assert list(manifest.status) == ["ok", "ok", "corrupt", "rejected", "corrupt", "ok"]
    # named after their content, so thread timing or the store's numbering never reaches a name
    suffixes = [".jpg", ".png", ".jpg", ".png", None, ".bmp"]  # text is not stored
    assert names(manifest, out_dir) == [("" if status == "ok" else "rejected/") + sha[:16] + suffix if suffix else ""
                                        for status, sha, suffix in zip(manifest.status, manifest.sha256, suffixes)]
    assert manifest.reason[2].startswith("truncated or corrupt image data")
    assert manifest.reason[3] == "too small: 8x8 px, below crawl.min_size 32"
    assert manifest.reason[4] == "not an image: text"
    assert (manifest.reason[manifest.status == "ok"] == "").all()
    assert list(manifest["format"]) == ["JPEG", "PNG", "JPEG", "PNG", "", "BMP"]
    assert manifest.width.tolist()[:2] == [48, 40] and pd.isna(manifest.width[4])
    assert (manifest["class"] == "tank").all() and (manifest.source == "folder").all()
    assert manifest["rank"].tolist() == [1, 2, 3, 4, 5, 6] and (manifest.phash.str.len()[[0, 1, 5]] == 16).all()
    for row in manifest.itertuples():
        assert sha256(Path(row.file or row.origin).read_bytes()) == sha256(Path(row.origin).read_bytes()) == row.sha256
        assert row.bytes == Path(row.origin).stat().st_size
    assert not (out_dir / "rejected" / "000004.txt").exists(), "a file that is not an image is not copied"
    assert (image_folder / "a.jpg").exists()  # imported, not moved
    assert summary["statuses"] == {"ok": 3, "rejected": 1, "corrupt": 2, "failed": 0, "skipped": 0}
    assert summary["outcome"] == "3 new images (no target)"


@pytest.fixture
def linked_folder(tmp_path):
    """A folder with every kind of link: loops, a link out to a secret, out to images, dangling."""
    folder, outside = tmp_path / "photos", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    (outside / "more").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(RED_JPEG)
    (folder / "sub" / "b.png").write_bytes(BLUE_PNG)
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (outside / "more" / "c.jpg").write_bytes(GREEN_JPEG)
    (folder / "loop").symlink_to(".")
    (folder / "sub" / "up").symlink_to("..")
    (folder / "b_again.png").symlink_to("sub/b.png")  # a link that stays inside: followed
    (folder / "dangling.jpg").symlink_to("nowhere.jpg")
    (folder / "passwd").symlink_to(outside / "passwd")
    (folder / "more").symlink_to("../outside/more")
    os.mkfifo(folder / "pipe")  # reading it would block the crawl for ever
    return folder


def test_folder_links_stay_inside_and_loops_are_walked_once(linked_folder, tmp_path):
    manifest, summary = crawl("tank", [{"folder": str(linked_folder)}], tmp_path)
    rows = {Path(origin).relative_to(linked_folder).as_posix(): row for origin, row in
            zip(manifest.origin, manifest.itertuples())}
    assert {name: row.status for name, row in rows.items()} == {
        "a.jpg": "ok", "b_again.png": "ok", "dangling.jpg": "failed", "loop": "skipped", "more": "failed",
        "passwd": "failed", "pipe": "failed", "sub/b.png": "ok", "sub/up": "skipped"}
    assert list(rows) == sorted(rows)
    assert rows["dangling.jpg"].reason == "dangling symbolic link: its target nowhere.jpg does not exist"
    assert rows["passwd"].reason == (f"symbolic link to {tmp_path / 'outside' / 'passwd'}, outside the folder: not "
                                     f"followed (set follow_outside_links: true on the folder source to import what "
                                     f"such links point to)")
    assert rows["loop"].reason == "a link to a folder already walked (the folder itself): its files are listed once"
    assert rows["pipe"].reason == "not a regular file (a FIFO, socket or device): not read"
    assert summary["images"] == 2 and (manifest.file[manifest.status != "ok"] == "").all()
    secret = (tmp_path / "outside" / "passwd").read_bytes()
    written = [path for folder in ("out", "store") for path in (tmp_path / folder).rglob("*") if path.is_file()]
    assert written and not any(path.read_bytes() == secret for path in written)


def test_folder_links_out_are_followed_when_asked_and_a_non_image_is_never_copied(linked_folder, tmp_path):
    manifest, summary = crawl("tank", [{"folder": str(linked_folder), "follow_outside_links": True}], tmp_path)
    status = dict(zip(manifest.origin.map(lambda origin: Path(origin).relative_to(linked_folder).as_posix()),
                      manifest.status))
    assert status["more/c.jpg"] == "ok" and status["passwd"] == "corrupt" and summary["images"] == 3
    assert (manifest.reason[manifest.origin == str(linked_folder / "passwd")] == "not an image: text").all()
    secret = (tmp_path / "outside" / "passwd").read_bytes()
    written = [path for path in (tmp_path / "out").rglob("*")] + list((tmp_path / "store" / "files").iterdir())
    assert written and not any(path.read_bytes() == secret for path in written if path.is_file())


@pytest.mark.parametrize("hash_cached", [False, True])
def test_an_unreadable_input_file_is_a_failed_row_and_the_rest_is_imported(tmp_path, hash_cached):
    """/proc/self/mem fails every read at offset 0 with EIO, for root too (the tests run as root,
    who reads any file whatever its mode). With its sha256 cached the file is first read when it
    is stored: that error too is the input's, not a failure to write the store."""
    from imgpipe.core.fingerprints import FileHashCache

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(RED_JPEG)
    (folder / "broken.jpg").symlink_to("/proc/self/mem")
    hashes = FileHashCache()
    if hash_cached:
        stat = (folder / "broken.jpg").stat()
        hashes.entries[os.path.abspath(folder / "broken.jpg")] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, "0" * 64]
    manifest, summary = crawl("tank", [{"folder": str(folder), "follow_outside_links": True}], tmp_path,
                              file_hashes=hashes)
    rows = dict(zip(manifest.origin.map(lambda origin: Path(origin).name), manifest.itertuples()))
    assert rows["a.jpg"].status == "ok" and summary["images"] == 1
    assert rows["broken.jpg"].status == "failed"
    assert re.fullmatch(r"unreadable: .*Input/output error.*; not imported", rows["broken.jpg"].reason)


def test_a_url_list_saved_with_a_bom_keeps_its_first_url(tmp_path):
    url_file = tmp_path / "urls.txt"
    url_file.write_bytes(b"\xef\xbb\xbfhttp://example.org/a.jpg\r\nhttp://example.org/b.jpg\r\n")
    assert read_url_list(url_file) == ["http://example.org/a.jpg", "http://example.org/b.jpg"]
    url_file.write_bytes(b"http://example.org/caf\xe9.jpg\n")
    with pytest.raises(ValueError, match=r"config key 'classes.tank.sources\[0\].urls': .*urls.txt is not UTF-8 text: "
                                         r"byte 22 \(line 1\)"):
        crawl("tank", [{"urls": str(url_file)}], tmp_path)


def test_folder_manifest_is_reproducible_and_a_rerun_imports_nothing(image_folder, tmp_path):
    first, _ = crawl("tank", [{"folder": str(image_folder)}], tmp_path, "one")
    store_files = sorted(p.name for p in (tmp_path / "store" / "files").iterdir())
    second, _ = crawl("tank", [{"folder": str(image_folder)}], tmp_path, "two")
    pd.testing.assert_frame_equal(first.drop(columns="file"), second.drop(columns="file"))
    assert sorted(p.name for p in (tmp_path / "store" / "files").iterdir()) == store_files
    assert len((tmp_path / "store" / "journal.jsonl").read_text().splitlines()) == 6

    # an edited file is imported again (the store's next number) and named after its new content;
    # the others are not touched
    (image_folder / "a.jpg").write_bytes(GREEN_JPEG)
    third, _ = crawl("tank", [{"folder": str(image_folder)}], tmp_path, "three")
    assert third.sha256[0] == sha256(GREEN_JPEG) and Path(third.file[0]).name == sha256(GREEN_JPEG)[:16] + ".jpg"
    assert "000006.jpg" in {p.name for p in (tmp_path / "store" / "files").iterdir()}
    assert (third.drop(columns=["file", "fetched_at"]).iloc[1:].equals(first.drop(columns=["file", "fetched_at"]).iloc[1:]))


def test_same_bytes_are_stored_once(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(RED_JPEG)
    manifest, summary = crawl("tank", [{"folder": str(folder)}], tmp_path)
    assert manifest.file.nunique() == 1 and (manifest.status == "ok").all()  # dedupe names the copies
    assert len(list((tmp_path / "store" / "files").iterdir())) == 1
    assert summary["images"] == 1


def test_a_cropped_copy_does_not_count_towards_the_target(tmp_path):
    """What dedupe would drop (here a copy with 5% cut from each side, 8-10 bits from the
    original by the whole-picture hash alone) is not a new image."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path / "photos"
    folder.mkdir()
    china, flower = (Image.fromarray(array) for array in load_sample_images().images)
    china.save(folder / "a_china.jpg", quality=90)
    dx, dy = round(china.width * 0.05), round(china.height * 0.05)
    china.crop((dx, dy, china.width - dx, china.height - dy)).save(folder / "b_china_cropped.jpg", quality=85)
    flower.save(folder / "c_flower.jpg", quality=90)
    manifest, summary = crawl("tank", [{"folder": str(folder)}], tmp_path, target=3, near_distance=6)

    assert (manifest.status == "ok").all() and manifest.phash_center.str.len().eq(16).all()
    assert summary["outcome"] == "exhausted at 2 of target 3"


def test_limits_reject_with_their_reason(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "banner.png").write_bytes(image_bytes("PNG", (400, 36)))
    (folder / "big.png").write_bytes(image_bytes("PNG", (300, 300)))
    (folder / "gif.gif").write_bytes(image_bytes("GIF", (40, 40)))
    (folder / "fine.jpg").write_bytes(RED_JPEG)
    limits = CrawlLimits(max_aspect=4, max_pixels=50_000, formats=("JPEG", "PNG"))
    manifest, _ = crawl("tank", [{"folder": str(folder)}], tmp_path, limits=limits)
    reasons = dict(zip(manifest.origin.map(lambda o: Path(o).name), manifest.reason))
    assert reasons["banner.png"] == "aspect ratio 11.1 above crawl.max_aspect 4"
    assert reasons["big.png"] == "300x300 = 90000 pixels, above crawl.max_pixels 50000"
    assert reasons["gif.gif"] == "format GIF not in crawl.formats (JPEG, PNG)"
    assert reasons["fine.jpg"] == ""

    # a changed limit re-decides from the store: nothing is imported again
    journal = (tmp_path / "store" / "journal.jsonl").read_text()
    again, _ = crawl("tank", [{"folder": str(folder)}], tmp_path, "again", limits=CrawlLimits(max_aspect=20))
    assert (tmp_path / "store" / "journal.jsonl").read_text() == journal
    again_status = dict(zip(again.origin.map(lambda o: Path(o).name), again.status))
    assert again_status["banner.png"] == again_status["big.png"] == "ok"


def test_refuses_a_non_empty_out_dir(image_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.jpg").write_bytes(RED_JPEG)
    with pytest.raises(FileExistsError, match="not empty"):
        crawl("tank", [{"folder": str(image_folder)}], tmp_path)


# --- digits ------------------------------------------------------------------


def test_digits_source_and_target(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = CrawlLimits(min_size=8)
    manifest, _ = crawl("three", [{"digits": 3}], tmp_path, limits=small)

    assert len(manifest) == (digits.target == 3).sum() == 183
    assert (manifest.status == "ok").all() and (manifest.source == "digits").all()
    assert (manifest.width == 8).all() and (manifest["format"] == "PNG").all()
    indices = [int(origin.removeprefix("sklearn:digits#")) for origin in manifest.origin]
    assert indices == sorted(indices) and (digits.target[indices] == 3).all()
    first = Image.open(manifest.file[0])
    assert first.mode == "L" and first.size == (8, 8)
    np.testing.assert_array_equal(np.asarray(first), np.round(digits.images[indices[0]] * 255 / 16).astype(np.uint8))

    # a target takes the first images; the same answer whatever the store already holds
    fresh, summary = crawl("three", [{"digits": 3}], tmp_path / "fresh", limits=small, target=20)
    reused, _ = crawl("three", [{"digits": 3}], tmp_path, "reused", limits=small, target=20)
    for table in (fresh, reused):
        assert (table.status == "ok").sum() == 20 and (table.status[20:] == "skipped").all()
    assert list(fresh.origin) == list(reused.origin) and summary["outcome"] == "target 20 reached"
    assert len(list((tmp_path / "fresh" / "store" / "files").iterdir())) == 20, "nothing beyond the target fetched"


# --- URL list through icrawler's downloader, on a fault-injecting server --------------


@pytest.fixture
def hostile_server():
    routes = {
        "/red.jpg": Response(RED_JPEG),
        "/blue.png": Response(BLUE_PNG, "image/png"),
        "/png-inside.jpg": Response(BLUE_PNG),
        "/red-again.jpg": Response(RED_JPEG),  # the same bytes under another URL
        "/truncated.jpg": Response(TRUNCATED_JPEG),
        "/blocked.jpg": Response(HTML_PAGE, "image/jpeg"),  # HTML served as a JPEG
        "/short-body.jpg": Response(GREEN_JPEG, declared_length=len(GREEN_JPEG) + 1000),
        "/huge.jpg": Response(b"", declared_length=10**9),  # announces an oversized body
        "/green": Response(GREEN_JPEG),
        "/tiny.png": Response(TINY_PNG, "image/png"),
        "/bomb.png": Response(png_claiming_size(100_000, 100_000), "image/png"),
        "/error.jpg": Response(b"oops", "text/plain", 500),
        "/hang.jpg": Response(RED_JPEG, delay_s=5),  # never answers within the timeout
        "/drip.jpg": Response(distinct_jpeg(7), drip_s=0.2),  # a byte at a time, forever
        "/moved.jpg": Response(b"", status=302, headers=(("Location", "/blue-copy.png"),)),
        "/blue-copy.png": Response(distinct_jpeg(3), "image/jpeg"),
        "/loop.jpg": Response(b"", status=302, headers=(("Location", "/loop.jpg"),)),
    }
    with LocalServer(routes) as server:
        yield server


def test_urls_source_records_every_url(hostile_server, image_folder, tmp_path, caplog):
    server = hostile_server
    refused = closed_port_url()
    paths = ["/red.jpg", "/missing.jpg", "/truncated.jpg", "/blocked.jpg", "/png-inside.jpg", None, "/short-body.jpg",
             "/huge.jpg", "/blue.png", "/green", "/bomb.png", "/red-again.jpg", "/tiny.png", "/error.jpg", "/hang.jpg",
             "/drip.jpg", "/moved.jpg", "/loop.jpg"]
    listed = [server.url(path) if path else refused for path in paths]
    url_file = tmp_path / "urls.txt"
    url_file.write_text("# tanks found by hand\n\n" + "\n".join(listed[:5]) + "\n  \n" + listed[0] + "\n"
                        + "\n".join(listed[5:]) + "\n")
    assert read_url_list(url_file) == listed

    limits = CrawlLimits(timeout_s=1, max_bytes=10**6, allow_private_hosts=LOOPBACK)
    with caplog.at_level(logging.INFO, logger="imgpipe.data.crawl"):
        manifest, summary = crawl("tank", [{"folder": str(image_folder)}, {"urls": str(url_file), "threads": 4}],
                                  tmp_path, limits=limits)
    rows = manifest[manifest.source_index == 1].reset_index(drop=True)
    by_path = {path or "refused": row for path, row in zip(paths, rows.itertuples())}

    assert list(rows.origin) == listed  # list order, whatever order the threads finished in
    assert (rows.source == "urls").all() and (rows["query"] == "").all()
    expected = {"/red.jpg": "ok", "/missing.jpg": "failed", "/truncated.jpg": "corrupt", "/blocked.jpg": "corrupt",
                "/png-inside.jpg": "ok", "refused": "failed", "/short-body.jpg": "failed", "/huge.jpg": "failed",
                "/blue.png": "ok", "/green": "ok", "/bomb.png": "corrupt", "/red-again.jpg": "ok",
                "/tiny.png": "rejected", "/error.jpg": "failed", "/hang.jpg": "failed", "/drip.jpg": "failed",
                "/moved.jpg": "ok", "/loop.jpg": "failed"}
    assert {key: row.status for key, row in by_path.items()} == expected
    reasons = {key: row.reason for key, row in by_path.items()}
    assert reasons["/missing.jpg"] == "HTTP 404 Not Found" and by_path["/missing.jpg"].http_status == 404
    assert reasons["/truncated.jpg"].startswith("truncated or corrupt image data")
    assert reasons["/blocked.jpg"] == "not an image: an HTML page"
    assert reasons["refused"].startswith("request failed after 3 attempts: ConnectionError")
    assert reasons["/short-body.jpg"].startswith("request failed after 3 attempts")
    assert reasons["/huge.jpg"] == "larger than crawl.max_bytes (1000000 bytes)"
    assert reasons["/bomb.png"].startswith("decompression bomb")
    assert reasons["/tiny.png"] == "too small: 8x8 px, below crawl.min_size 32"
    assert reasons["/error.jpg"] == "HTTP 500 Internal Server Error"
    assert "timed out" in reasons["/hang.jpg"].lower()
    assert reasons["/drip.jpg"].startswith("too slow: body not complete within crawl.timeout_s (1 s)")
    assert reasons["/loop.jpg"] == f"redirect loop: {server.url('/loop.jpg')} -> {server.url('/loop.jpg')}"
    # provenance of a good one
    red = by_path["/red.jpg"]
    assert (red.http_status, red.bytes, red.content_type, red.sha256) == (200, len(RED_JPEG), "image/jpeg",
                                                                          sha256(RED_JPEG))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", red.fetched_at) and red.rank >= 1
    assert by_path["/moved.jpg"].sha256 == sha256(distinct_jpeg(3))  # the redirect was followed
    # the same bytes under two URLs: one file, both rows point at it (dedupe drops the copy)
    assert by_path["/red-again.jpg"].file == by_path["/red.jpg"].file
    for path, data in {"/red.jpg": RED_JPEG, "/png-inside.jpg": BLUE_PNG, "/green": GREEN_JPEG}.items():
        assert sha256(Path(by_path[path].file).read_bytes()) == sha256(data)
    assert Path(by_path["/png-inside.jpg"].file).suffix == ".png"  # named by what it is, not by its URL
    failed = rows[rows.status == "failed"]
    assert (failed.file == "").all() and (failed.sha256 == "").all() and failed.width.isna().all()
    assert server.requests.count("/red.jpg") == 1, "a URL listed twice is downloaded once"
    assert "class 'tank': sources[1] done: 6 ok, 1 rejected, 3 corrupt, 8 failed" in caplog.text
    # new: the folder's three, then /green and /moved.jpg (the others repeat bytes already there)
    assert summary["statuses"]["failed"] == 8 and summary["images"] == 3 + 2

    # A rerun fetches only what failed for reasons that may pass (5xx, network, time-outs): not the
    # good ones, not the 404, not the corrupt ones, not the one too large for crawl.max_bytes, not
    # the redirect loop, not the body too slow for crawl.timeout_s.
    before = list(server.requests)
    crawl("tank", [{"folder": str(image_folder)}, {"urls": str(url_file), "threads": 4}], tmp_path, "again",
          limits=limits)
    again = {path.split("?")[0] for path in server.requests[len(before):]}
    assert again == {"/short-body.jpg", "/error.jpg", "/hang.jpg"}


def test_url_list_without_urls_gives_an_empty_manifest(tmp_path):
    url_file = tmp_path / "urls.txt"
    url_file.write_text("# nothing yet\n\n")
    manifest, _ = crawl("tank", [{"urls": str(url_file)}], tmp_path)
    assert manifest.empty and list(manifest.columns) == RAW_COLUMNS
    assert str(manifest.width.dtype) == "Int64" and str(manifest.source_index.dtype) == "int64"


KILLED_CRAWL = """
import sys
from pathlib import Path
from imgpipe.data.crawl import crawl_class
from imgpipe.data.crawlstore import CrawlLimits
crawl_class("tank", [{"urls": sys.argv[1], "threads": 1}], Path(sys.argv[2]), sys.argv[3],
            limits=CrawlLimits(timeout_s=60, allow_private_hosts=("127.0.0.1",)))
"""


def test_a_crawl_killed_with_sigkill_resumes_without_fetching_anything_twice(tmp_path):
    bodies = {f"/img{number}.jpg": distinct_jpeg(number) for number in range(10)}
    routes = {path: Response(body) for path, body in bodies.items()}
    routes["/img5.jpg"] = Response(bodies["/img5.jpg"], drip_s=0.5)  # the crawl is killed while this one drips
    with LocalServer(routes) as server:
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(server.url(path) for path in bodies) + "\n")
        store = tmp_path / "store"
        process = subprocess.Popen([sys.executable, "-c", KILLED_CRAWL, str(url_file), str(tmp_path / "killed"),
                                    str(store)], stderr=subprocess.DEVNULL, start_new_session=True)
        journal = store / "journal.jsonl"
        deadline = time.monotonic() + 60
        while not (journal.exists() and len(journal.read_text().splitlines()) >= 5):
            assert time.monotonic() < deadline and process.poll() is None, "the crawl did not get going"
            time.sleep(0.05)
        while "/img5.jpg" not in server.requests:
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert len(journal.read_text().splitlines()) == 5
        served_before = list(server.served)
        assert "/img5.jpg" not in served_before

        server.routes["/img5.jpg"] = Response(bodies["/img5.jpg"])
        manifest, summary = crawl_class("tank", [{"urls": str(url_file)}], tmp_path / "resumed", store, limits=FAST)

    assert sorted(server.served) == sorted(bodies), "every image served exactly once, across both runs"
    assert server.requests.count("/img5.jpg") == 2  # the one cut off, then whole
    assert (manifest.status == "ok").all() and len(manifest) == 10
    assert [sha256(Path(file).read_bytes()) for file in manifest.file] == [sha256(b) for b in bodies.values()]
    assert sorted(p.name for p in (store / "files").iterdir()) == [f"{n:06d}.jpg" for n in range(10)]
    assert not list((store / "files").glob("*.part")), "no half-written file is left"
    assert summary["images"] == 10


def test_a_torn_journal_line_and_leftover_files_are_cleaned_up(tmp_path):
    store = ClassStore(tmp_path / "store")
    store.add_body(RED_JPEG, {"origin": "http://x/a.jpg", "source": "urls"})
    store.close()
    with (tmp_path / "store" / "journal.jsonl").open("a") as handle:
        handle.write('{"origin": "http://x/b.jp')  # killed mid-line
    (tmp_path / "store" / "files" / ".000001.part").write_bytes(b"half")
    (tmp_path / "store" / "files" / "000001.png").write_bytes(BLUE_PNG)  # renamed, never journaled
    reopened = ClassStore(tmp_path / "store")
    assert list(reopened.latest) == ["http://x/a.jpg"]
    assert sorted(p.name for p in (tmp_path / "store" / "files").iterdir()) == ["000000.jpg"]
    record = reopened.add_body(GREEN_JPEG, {"origin": "http://x/c.jpg", "source": "urls"})
    assert record["stored"] == "000001.jpg"  # numbering continues
    reopened.close()
    assert [json.loads(line)["origin"] for line in (tmp_path / "store" / "journal.jsonl").read_text().splitlines()] \
        == ["http://x/a.jpg", "http://x/c.jpg"]


# --- search engines: recorded Bing pages, real BingImageCrawler --------------------


def recorded_bing_urls(host):
    return [f"{host}/tanks/{name}" for name in ("t1.jpg", "drawing.png", "truncated.jpg", "missing.jpg",
                                                "not-really.jpg", "png-inside.jpg", "t3.jpg")]


def test_bing_parser_reads_every_format_of_a_recorded_page():
    page = SimpleNamespace(content=BING_PAGE.read_bytes())
    tasks = list(ParsedBingParser(1, Signal(), None).parse(page))
    # every result with metadata, in page order, the PNG too (the result without metadata is skipped)
    assert [task["file_url"] for task in tasks] == recorded_bing_urls(RECORDED_HOST)
    # icrawler's own parser loses the PNG
    icrawler_urls = [task["file_url"] for task in BingParser(1, Signal(), None).parse(page)]
    assert icrawler_urls == [url for url in recorded_bing_urls(RECORDED_HOST) if url.endswith(".jpg")]


def test_baidu_parser_reads_a_recorded_result_page():
    # Baidu's acjson format: image URLs obfuscated in objURL (or plain in hoverURL), \' escapes,
    # an empty last entry
    from icrawler.builtin.baidu import BaiduParser

    page = SimpleNamespace(content=(Path(__file__).parent / "data" / "baidu_acjson_tank.json").read_bytes())
    urls = [task["file_url"] for task in BaiduParser(1, Signal(), None).parse(page)]
    assert urls == [f"{RECORDED_HOST}/tanks/t1.jpg", f"{RECORDED_HOST}/tanks/drawing.png", f"{RECORDED_HOST}/tanks/t3.jpg"]


def bing_page(urls) -> bytes:
    """A result page in Bing's async format: one div.imgpt per result, its metadata as compact JSON."""
    divs = "".join(
        f'<div class="imgpt"><a class="iusc" m="{html.escape(json.dumps({"murl": url, "t": "x"}, separators=(",", ":")))}"'
        f' href="/images/search"></a></div>' for url in urls)
    return f"<html><body>{divs}</body></html>".encode()


def local_search(server):
    """A feeder that sends each query to the local server's page for it, instead of bing.com."""

    class LocalFeeder(Feeder):
        def feed(self, keyword, **kwargs):
            self.out_queue.put(server.url("/search/" + keyword.replace(" ", "-")))

    return LocalFeeder


@pytest.fixture
def bing_server():
    page = BING_PAGE.read_text().replace(RECORDED_HOST, "{host}")
    routes = {
        "/tanks/t1.jpg": Response(RED_JPEG),
        "/tanks/truncated.jpg": Response(TRUNCATED_JPEG),
        "/tanks/not-really.jpg": Response(HTML_PAGE),
        "/tanks/png-inside.jpg": Response(BLUE_PNG),
        "/tanks/t3.jpg": Response(GREEN_JPEG),
        "/tanks/drawing.png": Response(distinct_jpeg(11), "image/png"),
    }
    with LocalServer(routes) as server:
        server.routes["/search/tank"] = Response(page.replace("{host}", server.base_url).encode(), "text/html")
        yield server


def test_bing_crawler_end_to_end(bing_server, tmp_path):
    server = bing_server
    manifest, summary = crawl("tank", [{"engine": "bing", "threads": 2}], tmp_path, feeder_cls=local_search(server))
    assert list(manifest.origin) == recorded_bing_urls(server.base_url)  # result order
    assert list(manifest["rank"]) == [1, 2, 3, 4, 5, 6, 7] and (manifest["query"] == "tank").all()
    assert (manifest.engine == "bing").all() and (manifest.source == "engine").all()
    status = dict(zip(manifest.origin.map(lambda url: url.rsplit("/", 1)[1]), manifest.status))
    assert status == {"t1.jpg": "ok", "drawing.png": "ok", "truncated.jpg": "corrupt", "missing.jpg": "failed",
                      "not-really.jpg": "corrupt", "png-inside.jpg": "ok", "t3.jpg": "ok"}
    assert summary["queries"][0]["urls_seen"] == 7 and summary["images"] == 4


def test_target_goes_through_queries_in_order_and_resumes(tmp_path, caplog):
    first = [f"/a/{n}.jpg" for n in range(4)]
    second = [f"/b/{n}.jpg" for n in range(6)]
    routes = {path: Response(distinct_jpeg(seed)) for seed, path in enumerate(first + second)}
    routes["/a/3.jpg"] = Response(routes["/a/0.jpg"].body)  # a duplicate does not count
    with LocalServer(routes) as server:
        server.routes["/search/tank"] = Response(bing_page([server.url(p) for p in first]), "text/html")
        server.routes["/search/tank-museum"] = Response(bing_page([server.url(p) for p in second]), "text/html")
        source = {"engine": "bing", "queries": ["tank"], "query_suffixes": ["museum"], "threads": 1}
        assert engine_queries("tank", source) == ["tank", "tank museum"]

        manifest, summary = crawl("tank", [source], tmp_path, feeder_cls=local_search(server), target=5)
        assert summary["outcome"] == "target 5 reached" and summary["images"] == 5
        assert [q["new_images"] for q in summary["queries"]] == [3, 2]
        assert "/b/2.jpg" not in server.requests, "the crawl stops at the target"

        # raising the target crawls only what is missing
        before = len(server.requests)
        with caplog.at_level(logging.WARNING, logger="imgpipe.data.crawl"):
            manifest, summary = crawl("tank", [source], tmp_path, "more", feeder_cls=local_search(server), target=50)
        images = [request for request in server.requests[before:] if not request.startswith("/search/")]
        assert sorted(images) == ["/b/2.jpg", "/b/3.jpg", "/b/4.jpg", "/b/5.jpg"]
    assert summary["outcome"] == "exhausted at 9 of target 50" and summary["target_reached"] is False
    assert "class 'tank': exhausted at 9 of target 50" in caplog.text
    assert (manifest.status == "ok").sum() == 10  # the duplicate is there, for dedupe to name


def test_a_fresh_crawl_gives_the_same_rows_and_names_whatever_the_thread_timing(tmp_path):
    # Four threads per source against a server that answers each request after a random wait:
    # downloads finish in another order every run. Ranks, the stop at a query's max_num and at
    # the class's target, the rows and the file names must not follow that order.
    images = [f"/img/{n}.jpg" for n in range(40)]
    routes = {path: Response(distinct_jpeg(seed)) for seed, path in enumerate(images)}
    routes["/img/7.jpg"] = Response(routes["/img/3.jpg"].body)  # the same bytes at two URLs
    del routes["/img/5.jpg"]  # a dead link
    listed = [f"/img/{n}.jpg" for n in range(25, 40)]
    url_file = tmp_path / "urls.txt"
    sources = [{"engine": "bing", "queries": ["tank"], "query_suffixes": ["museum"], "max_num": 8, "threads": 4},
               {"urls": str(url_file), "threads": 4}]
    runs = []
    with LocalServer(routes, latency_s=0.03) as server:
        server.routes["/search/tank"] = Response(bing_page([server.url(p) for p in images[:14]]), "text/html")
        server.routes["/search/tank-museum"] = Response(bing_page([server.url(p) for p in images[14:25]]),
                                                        "text/html")
        url_file.write_text("".join(server.url(p) + "\n" for p in listed))
        for run in range(3):
            manifest, summary = crawl_class("tank", sources, tmp_path / f"out{run}", tmp_path / f"store{run}",
                                            limits=FAST, target=20, feeder_cls=local_search(server))
            runs.append((manifest, summary, names(manifest, tmp_path / f"out{run}")))
    first, first_summary, first_names = runs[0]
    assert first_summary["outcome"] == "target 20 reached"
    # each query up to its 8th new image (the dead link and the second copy do not count), the URL
    # list up to the class's 20th, the rest of the list skipped; ranks are result and line numbers
    ok = first[first.status != "skipped"]
    assert ok.groupby(["source_index", "query"], sort=False)["rank"].apply(list).tolist() == [
        list(range(1, 11)), list(range(1, 9)), [1, 2, 3, 4]]
    assert list(first.status[:10]).count("failed") == 1
    assert list(first["rank"][-15:]) == list(range(1, 16)) and (first.status[-11:] == "skipped").all()
    assert set(first.reason[-11:]) == {"beyond target 20"}
    for manifest, summary, file_names in runs[1:]:
        pd.testing.assert_frame_equal(manifest.drop(columns=["file", "fetched_at"]),
                                      first.drop(columns=["file", "fetched_at"]))
        assert file_names == first_names
        assert summary == first_summary


def test_a_result_two_queries_share_is_listed_under_the_query_that_lists_it(tmp_path):
    # 'tank' stops at its 4th image while its threads still fetch a few more; 'battle tank' lists
    # some of those. Whether a download in flight got there first is timing: the row must be the
    # same either way (this query, its rank), and count towards this query's max_num.
    images = [f"/img/{n}.jpg" for n in range(24)]
    routes = {path: Response(distinct_jpeg(seed)) for seed, path in enumerate(images)}
    sources = [{"engine": "bing", "queries": ["tank", "battle tank"], "max_num": 4, "threads": 4}]
    runs = []
    with LocalServer(routes, latency_s=0.05) as server:
        server.routes["/search/tank"] = Response(bing_page([server.url(p) for p in images[:12]]), "text/html")
        server.routes["/search/battle-tank"] = Response(bing_page([server.url(p) for p in images[4:8] + images[12:]]),
                                                        "text/html")
        for run in range(4):
            manifest, _ = crawl_class("tank", sources, tmp_path / f"out{run}", tmp_path / f"store{run}", limits=FAST,
                                      feeder_cls=local_search(server))
            runs.append(manifest)
    for manifest in runs:
        battle = manifest[manifest["query"] == "battle tank"]
        assert battle["origin"].str.rsplit("/", n=1).str[-1].tolist()[:4] == ["4.jpg", "5.jpg", "6.jpg", "7.jpg"]
        assert battle["rank"].tolist()[:4] == [1, 2, 3, 4] and (battle.status[:4] == "ok").all()
        pd.testing.assert_frame_equal(manifest.drop(columns=["file", "fetched_at"]),
                                      runs[0].drop(columns=["file", "fetched_at"]))


def test_a_dead_engine_warns_and_a_class_of_dead_engines_fails(tmp_path, caplog):
    with LocalServer({}) as server:
        server.routes["/search/tank"] = Response(bing_page([]), "text/html")
        server.routes["/search/panzer"] = Response(bing_page([server.url("/p.jpg")]), "text/html")
        server.routes["/p.jpg"] = Response(RED_JPEG)
        with caplog.at_level(logging.WARNING, logger="imgpipe.data.crawl"):
            manifest, _ = crawl("tank", [{"engine": "bing", "queries": ["tank", "panzer"]}], tmp_path,
                                feeder_cls=local_search(server))
        assert "bing returned no image URL for query 'tank'" in caplog.text
        assert list(manifest.status) == ["ok"]
        with pytest.raises(RuntimeError, match=r"class 'tank': no search engine returned a single image URL "
                                               r"\(bing 'tank', google 'tank'\).*icrawler issues #107"):
            crawl("tank", [{"engine": "bing"}, {"engine": "google"}], tmp_path / "dead",
                  feeder_cls=local_search(server))


def test_greedy_source_crawls_a_site(tmp_path):
    with LocalServer({}) as server:
        server.routes["/"] = Response(b'<html><a href="/page2.html">next</a><img src="/img/a.jpg"></html>', "text/html")
        # relative sources, a link back and one to itself (icrawler's parser would loop on them forever)
        server.routes["/page2.html"] = Response(b'<html><img src="img/b.png"><img src="/img/tiny.png">'
                                                b'<a href="/">home</a><a href="page2.html">me</a>'
                                                b'<a href="/img/a.jpg">again</a></html>', "text/html")
        server.routes["/img/a.jpg"] = Response(RED_JPEG)
        server.routes["/img/b.png"] = Response(BLUE_PNG, "image/png")
        server.routes["/img/tiny.png"] = Response(TINY_PNG, "image/png")
        manifest, summary = crawl("tank", [{"greedy": server.url("/")}], tmp_path,
                                  limits=CrawlLimits(timeout_s=1, allow_private_hosts=LOOPBACK))
    status = dict(zip(manifest.origin.map(lambda url: url.rsplit("/", 1)[1]), manifest.status))
    assert status == {"a.jpg": "ok", "b.png": "ok", "tiny.png": "rejected"}
    assert (manifest.engine == "greedy").all() and summary["images"] == 2
    assert [server.requests.count(path) for path in ("/", "/page2.html", "/img/a.jpg")] == [1, 1, 1]


def test_a_site_crawl_ends_when_its_pages_are_parsed_not_on_a_timer(tmp_path):
    # page 2 answers after 3 s, longer than the downloader waits idle (2 x crawl.timeout_s): the
    # crawl still gets its images, and ends as soon as the last page is parsed
    with LocalServer({}) as server:
        server.routes["/"] = Response(b'<html><a href="/p2.html">2</a><img src="/a.jpg"></html>', "text/html")
        server.routes["/p2.html"] = Response(b'<html><img src="/b.jpg"><img src="/c.jpg"></html>', "text/html",
                                             delay_s=3)
        for name, seed in (("a", 1), ("b", 2), ("c", 3)):
            server.routes[f"/{name}.jpg"] = Response(distinct_jpeg(seed))
        started = time.monotonic()
        manifest, _ = crawl("tank", [{"greedy": server.url("/")}], tmp_path,
                            limits=CrawlLimits(timeout_s=1, allow_private_hosts=LOOPBACK))
        took = time.monotonic() - started
    assert manifest.origin.str.rsplit("/", n=1).str[-1].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert (manifest.status == "ok").all() and took < 10


def test_time_budget_stops_the_class_and_says_so(tmp_path, caplog):
    paths = [f"/slow/{n}.jpg" for n in range(8)]
    routes = {path: Response(distinct_jpeg(n), delay_s=0.4) for n, path in enumerate(paths)}
    with LocalServer(routes) as server:
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(server.url(path) for path in paths) + "\n")
        limits = CrawlLimits(timeout_s=5, time_budget_s=1.0, allow_private_hosts=LOOPBACK)
        with caplog.at_level(logging.WARNING, logger="imgpipe.data.crawl"):
            manifest, summary = crawl("tank", [{"urls": str(url_file), "threads": 1}], tmp_path, limits=limits,
                                      target=8)
        got = int((manifest.status == "ok").sum())
        assert 1 <= got < 8 and (manifest.status[got:] == "skipped").all()
        assert set(manifest.reason[got:]) == {"not tried: crawl.time_budget_s 1 s spent"}
        assert summary["outcome"] == f"crawl.time_budget_s (1 s) spent at {got} of target 8"
        assert f"class 'tank': crawl.time_budget_s (1 s) spent at {got} of target 8" in caplog.text

        # the next run continues where it stopped
        again, summary = crawl("tank", [{"urls": str(url_file), "threads": 1}], tmp_path, "again", target=8)
    assert (again.status == "ok").all() and summary["outcome"] == "target 8 reached"
    assert sorted(server.served) == sorted(paths)


def test_the_same_bytes_from_two_threads_are_stored_once_and_survive_a_reopen(tmp_path):
    import threading

    store = ClassStore(tmp_path / "store")
    bodies = [distinct_jpeg(n % 3) for n in range(24)]  # three images, eight URLs each
    threads = [threading.Thread(target=store.add_body, args=(body, {"origin": f"http://x/{n}.jpg", "source": "urls"}))
               for n, body in enumerate(bodies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    reopened = ClassStore(tmp_path / "store")
    stored = {record["stored"] for record in reopened.records}
    assert len(stored) == 3 and sorted(p.name for p in (tmp_path / "store" / "files").iterdir()) == sorted(stored)
    assert len(reopened.latest) == 24


def test_parallel_downloads_stop_at_the_target_and_a_rerun_agrees(tmp_path):
    paths = [f"/img/{n}.jpg" for n in range(12)]
    with LocalServer({path: Response(distinct_jpeg(n), delay_s=0.1) for n, path in enumerate(paths)}) as server:
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(server.url(path) for path in paths) + "\n")
        first, summary = crawl("tank", [{"urls": str(url_file), "threads": 4}], tmp_path, target=3)
        again, _ = crawl("tank", [{"urls": str(url_file), "threads": 4}], tmp_path, "again", target=3)
    assert (first.status == "ok").sum() == 3 and summary["images"] == 3  # not 3 plus what was in flight
    assert list(first.status) == list(again.status) and list(first.sha256) == list(again.sha256)


def test_a_url_already_answered_for_another_query_is_listed_without_a_request(tmp_path):
    with LocalServer({"/x.jpg": Response(RED_JPEG), "/y.jpg": Response(GREEN_JPEG)}) as server:
        server.routes["/search/tank"] = Response(bing_page([server.url("/x.jpg")]), "text/html")
        server.routes["/search/panzer"] = Response(bing_page([server.url("/x.jpg"), server.url("/y.jpg")]),
                                                   "text/html")
        crawl("tank", [{"engine": "bing", "queries": ["tank"]}], tmp_path, feeder_cls=local_search(server))
        manifest, summary = crawl("tank", [{"engine": "bing", "queries": ["panzer"]}], tmp_path, "again",
                                  feeder_cls=local_search(server))
    assert list(manifest.origin) == [server.url("/x.jpg"), server.url("/y.jpg")] and (manifest.status == "ok").all()
    assert server.requests.count("/x.jpg") == 1 and summary["images"] == 2


def test_a_greedy_rerun_replays_what_it_fetched(tmp_path):
    with LocalServer({}) as server:
        server.routes["/"] = Response(b'<html><img src="/a.jpg"><img src="/b.png"><a href="http://[x/">bad</a></html>',
                                      "text/html")
        server.routes["/a.jpg"] = Response(RED_JPEG)
        server.routes["/b.png"] = Response(BLUE_PNG, "image/png")
        limits = CrawlLimits(timeout_s=1, allow_private_hosts=LOOPBACK)
        first, _ = crawl("tank", [{"greedy": server.url("/")}], tmp_path, limits=limits)
        again, summary = crawl("tank", [{"greedy": server.url("/")}], tmp_path, "again", limits=limits)
    assert list(first.status) == list(again.status) == ["ok", "ok"] and summary["images"] == 2
    assert server.requests.count("/a.jpg") == 1


# --- hostile sources: what the crawl will not fetch ---------------------------------


def test_a_url_list_naming_this_machine_is_refused_unless_allowed(tmp_path):
    with LocalServer({"/a.jpg": Response(RED_JPEG)}) as server:
        port = server.httpd.server_port
        listed = [server.url("/a.jpg"), f"http://localhost:{port}/a.jpg", f"http://2130706433:{port}/a.jpg",
                  f"http://0x7f.0.0.1:{port}/a.jpg", f"http://[::ffff:127.0.0.1]:{port}/a.jpg",
                  "file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://example.test/a.jpg", "not a url",
                  "http://[::1", f"http://0.0.0.0:{port}/a.jpg"]
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(listed) + "\n")
        refused, _ = crawl("tank", [{"urls": str(url_file)}], tmp_path, limits=CrawlLimits(timeout_s=2))
        assert server.requests == [], "nothing reached the server"
        assert (refused.status == "failed").all() and list(refused.origin) == listed
        reasons = list(refused.reason)
        assert reasons[0] == (f"refused: 127.0.0.1 is a loopback address, and the crawl fetches only public addresses "
                              f"unless crawl.allow_private_hosts names the host (now []); add '127.0.0.1:{port}' "
                              f"there if this source is yours")
        for spelling, reason in zip(listed[1:5], reasons[1:5]):
            host = spelling.split("//")[1].rsplit(":", 1)[0].strip("[]")
            assert reason.startswith(f"refused: {host} (") and "loopback address" in reason, spelling
        assert reasons[5] == "unsupported URL scheme 'file': the crawl fetches http and https URLs only"
        assert reasons[6].startswith("unsupported URL scheme 'gopher'") and reasons[7].startswith(
            "unsupported URL scheme 'ftp'")
        assert reasons[8] == "not a URL (no http:// or https://): 'not a url'"
        assert reasons[9] == "malformed URL 'http://[::1': Invalid IPv6 URL"
        assert reasons[10].startswith("refused: 0.0.0.0 is an unspecified address")

        # final: a rerun asks nothing again, until the key that refused them changes
        crawl("tank", [{"urls": str(url_file)}], tmp_path, "again", limits=CrawlLimits(timeout_s=2))
        assert server.requests == []
        journal = [json.loads(line) for path in (tmp_path / "store").rglob("journal.jsonl")
                   for line in path.read_text().splitlines()]
        assert [record["origin"] for record in journal].count("http://[::1") == 1, "a malformed URL is final"
        allowed, _ = crawl("tank", [{"urls": str(url_file)}], tmp_path, "allowed",
                           limits=CrawlLimits(timeout_s=2, allow_private_hosts=(f"127.0.0.1:{port}",)))
    assert list(allowed.status[:5]) == ["ok"] * 5 and len(server.requests) == 5
    assert list(allowed.status[5:]) == ["failed"] * 6, "schemes stay refused whatever is allowed"


def test_redirects_are_checked_at_every_hop(tmp_path):
    """A 'public' server (allowed by its port) that redirects to an internal one, to file://, in
    circles or too often: one request each, recorded as final, the internal server never asked."""
    with LocalServer({"/secret.jpg": Response(RED_JPEG)}) as internal, LocalServer({}) as public:
        public.routes.update({
            "/to-internal.jpg": Response(b"", status=302, headers=(("Location", internal.url("/secret.jpg")),)),
            "/to-localhost.jpg": Response(b"", status=301, headers=(
                ("Location", f"http://localhost:{internal.httpd.server_port}/secret.jpg"),)),
            "/to-file.jpg": Response(b"", status=302, headers=(("Location", "file:///etc/passwd"),)),
            "/moved.jpg": Response(b"", status=307, headers=(("Location", "/blue.png"),)),
            "/blue.png": Response(BLUE_PNG, "image/png"),
            "/ping.jpg": Response(b"", status=302, headers=(("Location", "/pong.jpg"),)),
            "/pong.jpg": Response(b"", status=302, headers=(("Location", "/ping.jpg"),)),
            **{f"/hop{n}.jpg": Response(b"", status=302, headers=(("Location", f"/hop{n + 1}.jpg"),))
               for n in range(12)},
        })
        paths = ["/to-internal.jpg", "/to-localhost.jpg", "/to-file.jpg", "/moved.jpg", "/ping.jpg", "/hop0.jpg"]
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(public.url(path) for path in paths) + "\n")
        limits = CrawlLimits(timeout_s=2, allow_private_hosts=(f"127.0.0.1:{public.httpd.server_port}",))
        manifest, _ = crawl("tank", [{"urls": str(url_file), "threads": 2}], tmp_path, limits=limits)
        first = list(public.requests)
        crawl("tank", [{"urls": str(url_file)}], tmp_path, "again", limits=limits)
        assert public.requests == first, "every one of them is final"
    assert internal.requests == []
    reasons = dict(zip(paths, manifest.reason))
    assert list(manifest.status) == ["failed", "failed", "failed", "ok", "failed", "failed"]
    assert reasons["/to-internal.jpg"].startswith(
        f"redirected to {internal.url('/secret.jpg')}: refused: 127.0.0.1 is a loopback address")
    assert reasons["/to-localhost.jpg"].startswith("redirected to http://localhost:")
    assert "refused: localhost (127.0.0.1) is a loopback address" in reasons["/to-localhost.jpg"]
    assert reasons["/to-file.jpg"] == ("redirected to file:///etc/passwd: unsupported URL scheme 'file': the crawl "
                                       "fetches http and https URLs only")
    assert reasons["/ping.jpg"] == "redirect loop: " + " -> ".join(
        public.url(path) for path in ("/ping.jpg", "/pong.jpg", "/ping.jpg"))
    assert reasons["/hop0.jpg"].startswith("more than 10 redirects: ")
    assert manifest.sha256[3] == sha256(BLUE_PNG)
    assert [first.count(path) for path in paths[:3]] == [1, 1, 1]
    assert first.count("/ping.jpg") == first.count("/pong.jpg") == 1
    assert sum(path.startswith("/hop") for path in first) == 11


def test_engine_results_and_site_links_to_internal_addresses_are_refused(tmp_path):
    with LocalServer({"/secret.jpg": Response(RED_JPEG)}) as internal, LocalServer({}) as public:
        secret = internal.url("/secret.jpg")
        public.routes["/search/tank"] = Response(bing_page([public.url("/a.jpg"), secret]), "text/html")
        public.routes["/a.jpg"] = Response(GREEN_JPEG)
        public.routes["/"] = Response(f'<html><img src="/a.jpg"><img src="{secret}"></html>'.encode(), "text/html")
        limits = CrawlLimits(timeout_s=1, allow_private_hosts=(f"127.0.0.1:{public.httpd.server_port}",))
        engine, _ = crawl("tank", [{"engine": "bing"}], tmp_path, feeder_cls=local_search(public), limits=limits)
        greedy, _ = crawl("tank", [{"greedy": public.url("/")}], tmp_path, "greedy", limits=limits)
    assert internal.requests == []
    for manifest in (engine, greedy):
        assert list(manifest.origin) == [public.url("/a.jpg"), secret]
        assert list(manifest.status) == ["ok", "failed"]
        assert manifest.reason[1].startswith("refused: 127.0.0.1 is a loopback address")


def test_a_name_that_resolves_elsewhere_when_connecting_is_refused_there(monkeypatch):
    """DNS rebinding: the name passes the check before the request, then resolves to this
    machine; the connection checks the address it connects to, so it never gets there."""
    import socket as socket_module

    import requests

    from imgpipe.data.netguard import AddressPolicy, RefusedURL

    real_getaddrinfo = socket_module.getaddrinfo
    answers = iter(["93.184.216.34", "127.0.0.1"])  # public first, then this machine

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            host = next(answers)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", rebinding)
    with LocalServer({"/a.jpg": Response(RED_JPEG)}) as server:
        policy = AddressPolicy()
        url = f"http://rebind.test:{server.httpd.server_port}/a.jpg"
        policy.check_url(url)  # looks public
        session = requests.Session()
        session.mount("http://", policy.adapter())
        with pytest.raises(RefusedURL, match=r"refused: rebind.test \(127.0.0.1\) is a loopback address"):
            session.get(url, timeout=2)
    assert server.requests == []


def test_behind_a_proxy_the_guarded_session_refuses_before_sending(tmp_path, monkeypatch):
    """requests hands proxied requests to connections of its proxy manager, not to the checked
    ones: the adapter's send() checks the target first, for the downloader's session and for the
    result and site pages icrawler's feeder and parser fetch through the same session."""
    import requests

    from imgpipe.data.netguard import AddressPolicy, RefusedURL

    with LocalServer({"/a.jpg": Response(RED_JPEG)}) as internal, LocalServer({}) as proxy:
        session = requests.Session()
        session.mount("http://", AddressPolicy().adapter())
        with pytest.raises(RefusedURL, match="refused: 127.0.0.1 is a loopback address"):
            session.get(internal.url("/a.jpg"), proxies={"http": proxy.url("")}, timeout=2)
        assert proxy.requests == []

        # a greedy crawl whose start page is internal, with the proxy set as requests reads it
        monkeypatch.setenv("HTTP_PROXY", proxy.url(""))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        manifest, _ = crawl("tank", [{"greedy": internal.url("/")}], tmp_path, limits=CrawlLimits(timeout_s=0.5))
    assert proxy.requests == [] and internal.requests == []
    assert manifest.empty


def test_deterministic_failures_take_one_request_and_transient_ones_are_tried_again(tmp_path):
    routes = {
        "/loop.jpg": Response(b"", status=302, headers=(("Location", "/loop.jpg"),)),
        "/drip.jpg": Response(distinct_jpeg(7), drip_s=0.2),
        "/gone.jpg": Response(b"", status=404),
        "/busy.jpg": Response(b"", status=429),
        "/error.jpg": Response(b"oops", "text/plain", 500),
        "/cut.jpg": Response(GREEN_JPEG, declared_length=len(GREEN_JPEG) + 1000),
    }
    with LocalServer(routes) as server:
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join(server.url(path) for path in routes) + "\n")
        limits = CrawlLimits(timeout_s=1, allow_private_hosts=LOOPBACK)
        manifest, _ = crawl("tank", [{"urls": str(url_file)}], tmp_path, limits=limits)
        first = Counter(server.requests)
        assert (manifest.status == "failed").all()
        assert first == {"/loop.jpg": 1, "/drip.jpg": 1, "/gone.jpg": 1, "/busy.jpg": 1, "/error.jpg": 1,
                         "/cut.jpg": 3}, "5xx and 429 are answers (tried again next run), a cut body is retried"

        crawl("tank", [{"urls": str(url_file)}], tmp_path, "again", limits=limits)
        again = Counter(server.requests) - first
        assert again == {"/busy.jpg": 1, "/error.jpg": 1, "/cut.jpg": 3}

        # a body too slow for crawl.timeout_s is final while the limit stays; raised, it is tried again
        before = Counter(server.requests)
        crawl("tank", [{"urls": str(url_file)}], tmp_path, "patient",
              limits=CrawlLimits(timeout_s=5, allow_private_hosts=LOOPBACK))
        assert (Counter(server.requests) - before)["/drip.jpg"] == 1


def test_nothing_from_a_url_reaches_a_file_name(tmp_path):
    """Stored names are a number and the extension of the format Pillow found; a body that is
    not an image is not kept at all, whatever its URL calls it."""
    hostile = ["/..%2F..%2Fevil.sh", "/a/..%2F..%2F..%2Fetc/cron.d/x.jpg", "/" + "n" * 250 + ".jpeg",
               "/odd%00name%0A.p;ng?file=../../x.png", "/dots.../.htaccess", "/q.php?name=../../../x.jpg"]
    with LocalServer({}) as server:
        for number, path in enumerate(hostile):
            route = path.split("?", 1)[0]
            server.routes[route] = Response(HTML_PAGE + path.encode(), "text/html")
            server.routes[route + ".cut"] = Response(truncated_jpeg_of(number))  # an image, broken
        server.routes["/img.jpg"] = Response(RED_JPEG)
        urls = [server.url(path) for path in hostile] + [server.url(path.split("?", 1)[0] + ".cut") for path in hostile]
        url_file = tmp_path / "urls.txt"
        url_file.write_text("\n".join([*urls, server.url("/img.jpg")]) + "\n")
        manifest, _ = crawl("tank", [{"urls": str(url_file)}], tmp_path)
    assert list(manifest.status) == ["corrupt"] * 12 + ["ok"]
    assert (manifest.file[:6] == "").all() and (manifest.reason[:6] == "not an image: an HTML page").all()
    written = sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file())
    results = {path for path in written if path.startswith("out/")}
    assert results == {Path(file).relative_to(tmp_path).as_posix() for file in manifest.file[6:]}
    assert all(re.fullmatch(r"out/(rejected/)?[0-9a-f]{16}\.jpg", path) for path in results)
    stored = set(written) - results - {"urls.txt", "store/journal.jsonl"}
    assert len(stored) == 7 and all(re.fullmatch(r"store/files/\d{6}\.jpg", path) for path in stored)
