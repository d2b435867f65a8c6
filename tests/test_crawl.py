import hashlib
import logging
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from icrawler import Feeder
from icrawler.builtin import BingParser
from icrawler.utils import Signal
from PIL import Image

from crawl_server import HTML_PAGE, LocalServer, Response, image_bytes, png_claiming_size, truncated_jpeg
from imgpipe.crawl import MANIFEST_COLUMNS, crawl_class, crawl_engine_query, read_url_list

BING_PAGE = Path(__file__).parent / "data" / "bing_async_tank.html"
RECORDED_HOST = "http://images.example.test"

RED_JPEG = image_bytes("JPEG", (32, 24), (200, 30, 30))
BLUE_PNG = image_bytes("PNG", (20, 20), (30, 30, 200))
GREEN_JPEG = image_bytes("JPEG", (40, 30), (30, 200, 30))
TRUNCATED_JPEG = truncated_jpeg()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.jpg"


# --- folder ------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "b_nested" / "deeper").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(RED_JPEG)
    (folder / "b_nested" / "blue.PNG").write_bytes(BLUE_PNG)
    (folder / "b_nested" / "deeper" / "cut.jpg").write_bytes(TRUNCATED_JPEG)
    (folder / "b_nested" / "notes.txt").write_text("shot on a sunny day\n")
    (folder / "c.bmp").write_bytes(image_bytes("BMP", (5, 6)))
    return folder


def test_folder_source_copies_verifies_and_rejects(image_folder, tmp_path):
    out_dir = tmp_path / "raw" / "tank"
    manifest = crawl_class("tank", [{"folder": str(image_folder)}], out_dir)

    assert list(manifest.columns) == MANIFEST_COLUMNS
    # sorted by path below the folder, nested folders included
    assert [Path(origin).relative_to(image_folder).as_posix() for origin in manifest.origin] == [
        "a.jpg",
        "b_nested/blue.PNG",
        "b_nested/deeper/cut.jpg",
        "b_nested/notes.txt",
        "c.bmp",
    ]
    assert list(manifest.status) == ["ok", "ok", "corrupt", "corrupt", "ok"]
    assert [Path(file).relative_to(out_dir).as_posix() for file in manifest.file] == [
        "00_000000.jpg",
        "00_000001.png",
        "rejected/00_000002.jpg",
        "rejected/00_000003.txt",
        "00_000004.bmp",
    ]
    assert manifest.reason[2].startswith("truncated or corrupt image data")
    assert manifest.reason[3] == "not an image: text"
    assert (manifest.reason[manifest.status == "ok"] == "").all()
    assert list(manifest["format"]) == ["JPEG", "PNG", "JPEG", "", "BMP"]
    assert manifest.width.tolist()[:2] == [32, 20] and pd.isna(manifest.width[3])
    assert (manifest["class"] == "tank").all() and (manifest.source == "folder").all()
    assert (manifest.source_index == 0).all() and (manifest["query"] == "").all()
    for row in manifest.itertuples():
        assert sha256(Path(row.file).read_bytes()) == sha256(Path(row.origin).read_bytes()) == row.sha256
    # copied, not moved; staging folders cleaned up
    assert (image_folder / "a.jpg").exists()
    stored = sorted(path.name for path in out_dir.iterdir())
    assert stored == ["00_000000.jpg", "00_000001.png", "00_000004.bmp", "rejected"]


def test_folder_manifest_is_reproducible(image_folder, tmp_path):
    first = crawl_class("tank", [{"folder": str(image_folder)}], tmp_path / "one")
    second = crawl_class("tank", [{"folder": str(image_folder)}], tmp_path / "two")
    pd.testing.assert_frame_equal(first.drop(columns="file"), second.drop(columns="file"))
    assert [Path(f).name for f in first.file] == [Path(f).name for f in second.file]


def test_file_column_keeps_relative_out_dir(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = crawl_class("tank", [{"folder": str(image_folder)}], Path("results/raw/tank"))
    assert manifest.file[0] == "results/raw/tank/00_000000.jpg"


def test_missing_folder_names_folder_and_class(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sources\[1\].folder: .*nowhere.*'elephant'"):
        crawl_class("elephant", [{"digits": 1}, {"folder": str(tmp_path / "nowhere")}], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "config errors must surface before anything is written"


def test_refuses_a_non_empty_out_dir(image_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.jpg").write_bytes(RED_JPEG)
    with pytest.raises(FileExistsError, match="not empty"):
        crawl_class("tank", [{"folder": str(image_folder)}], tmp_path / "out")


@pytest.mark.parametrize(
    "source, message",
    [
        ({"folder": "x", "digits": 3}, r"sources\[0\]: needs exactly one of"),
        ({"digits": 3, "max_num": 5}, r"sources\[0\]: unknown key\(s\) \['max_num'\]"),
        ({"digits": 12}, r"sources\[0\].digits: must be an integer 0-9"),
        ({"engine": "altavista", "queries": ["tank"]}, r"sources\[0\].engine: 'altavista'"),
        ({"engine": "bing", "queries": "tank"}, r"sources\[0\].queries: must be a non-empty list"),
        ({"engine": "bing", "queries": ["tank"], "max_num": 0}, r"sources\[0\].max_num: must be a positive"),
        ({"engine": "bing", "queries": ["tank"], "filters": {"colour": "red"}}, r"sources\[0\].filters: .*colour"),
        ({"engine": "bing", "queries": ["tank"], "filters": {"type": "vector"}}, r"sources\[0\].filters: .*type"),
        ({"engine": "flickr", "queries": ["tank"]}, r"sources\[0\]: engine flickr needs an API key"),
    ],
)
def test_unusable_sources_raise_value_error(tmp_path, monkeypatch, source, message):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    with pytest.raises(ValueError, match=message):
        crawl_class("tank", [source], tmp_path / "out")


# --- digits ------------------------------------------------------------------


def test_digits_source(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    manifest = crawl_class("three", [{"digits": 3}], tmp_path / "out")

    assert len(manifest) == (digits.target == 3).sum() == 183
    assert (manifest.status == "ok").all() and (manifest.source == "digits").all()
    assert (manifest.width == 8).all() and (manifest.height == 8).all() and (manifest["format"] == "PNG").all()
    indices = [int(origin.removeprefix("sklearn:digits#")) for origin in manifest.origin]
    assert indices == sorted(indices) and (digits.target[indices] == 3).all()
    first = Image.open(manifest.file[0])
    assert first.mode == "L" and first.size == (8, 8)
    expected = np.round(digits.images[indices[0]] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(first), expected)
    assert max(np.asarray(Image.open(file)).max() for file in manifest.file) == 255  # 16 -> 255


# --- URL list through icrawler's UrlListCrawler ----------------------------------


@pytest.fixture
def image_server():
    routes = {
        "/red.jpg": Response(RED_JPEG),
        "/blue.png": Response(BLUE_PNG, "image/png"),
        "/png-inside.jpg": Response(BLUE_PNG),
        "/truncated.jpg": Response(TRUNCATED_JPEG),
        "/blocked.jpg": Response(HTML_PAGE, "image/jpeg"),
        "/short-body.jpg": Response(GREEN_JPEG, declared_length=len(GREEN_JPEG) + 1000),
        "/huge.jpg": Response(b"", declared_length=10**9),
        "/green": Response(GREEN_JPEG),
        # kills an icrawler ImageDownloader thread (DecompressionBombError in keep_file)
        "/bomb.png": Response(png_claiming_size(100_000, 100_000), "image/png"),
    }
    with LocalServer(routes) as server:
        yield server


def test_urls_source_records_every_url(image_server, image_folder, tmp_path, caplog):
    server = image_server
    refused = closed_port_url()
    listed = [
        server.url("/red.jpg"),
        server.url("/missing.jpg"),
        server.url("/truncated.jpg"),
        server.url("/blocked.jpg"),
        server.url("/png-inside.jpg"),
        refused,
        server.url("/short-body.jpg"),
        server.url("/huge.jpg"),
        server.url("/blue.png"),
        server.url("/green"),
        server.url("/bomb.png"),
    ]
    url_file = tmp_path / "urls.txt"
    url_file.write_text(
        "# tanks found by hand\n\n" + "\n".join(listed[:5]) + "\n  \n" + server.url("/red.jpg") + "\n"
        + "\n".join(listed[5:]) + "\n"
    )
    assert read_url_list(url_file) == listed

    out_dir = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="imgpipe.crawl"):
        manifest = crawl_class("tank", [{"folder": str(image_folder)}, {"urls": str(url_file), "threads": 3}], out_dir)
    rows = manifest[manifest.source_index == 1].reset_index(drop=True)

    assert list(rows.origin) == listed  # list order, whatever order the threads finished in
    assert (rows.source == "urls").all() and (rows["query"] == "").all()
    assert list(rows.status) == [
        "ok",
        "failed",
        "corrupt",
        "corrupt",
        "ok",
        "failed",
        "failed",
        "failed",
        "ok",
        "ok",
        "corrupt",
    ]
    names = [Path(file).relative_to(out_dir).as_posix() if file else "" for file in rows.file]
    assert names == [
        "01_000000.jpg",
        "",
        "rejected/01_000001.jpg",
        "rejected/01_000002.jpg",
        "01_000003.png",  # named by what it is, not by its URL
        "",
        "",
        "",
        "01_000004.png",
        "01_000005.jpg",
        "rejected/01_000006.png",
    ]
    reasons = dict(zip(rows.origin, rows.reason))
    assert reasons[server.url("/missing.jpg")] == "HTTP 404 Not Found"
    assert reasons[server.url("/truncated.jpg")].startswith("truncated or corrupt image data")
    assert reasons[server.url("/blocked.jpg")] == "not an image: an HTML page"
    assert reasons[refused].startswith("request failed after 3 attempts: ConnectionError")
    assert reasons[server.url("/short-body.jpg")].startswith("request failed after 3 attempts")
    assert reasons[server.url("/huge.jpg")].startswith("larger than the")
    assert reasons[server.url("/bomb.png")].startswith("decompression bomb")
    assert reasons[server.url("/red.jpg")] == ""

    served = {"/red.jpg": RED_JPEG, "/png-inside.jpg": BLUE_PNG, "/blue.png": BLUE_PNG, "/green": GREEN_JPEG}
    for path, data in served.items():
        row = rows[rows.origin == server.url(path)].iloc[0]
        assert row.sha256 == sha256(data) == sha256(Path(row.file).read_bytes())
    failed = rows[rows.status == "failed"]
    assert (failed.file == "").all() and (failed.sha256 == "").all() and failed.width.isna().all()
    assert server.requests.count("/red.jpg") == 1, "a URL listed twice is downloaded once"
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith("01_")) == [
        "01_000000.jpg",
        "01_000003.png",
        "01_000004.png",
        "01_000005.jpg",
    ]
    assert "class 'tank': sources[1] done: 4 ok, 3 corrupt, 4 failed" in caplog.text


def test_url_list_without_urls_gives_an_empty_manifest(tmp_path):
    url_file = tmp_path / "urls.txt"
    url_file.write_text("# nothing yet\n\n")
    manifest = crawl_class("tank", [{"urls": str(url_file)}], tmp_path / "out")
    assert manifest.empty and list(manifest.columns) == MANIFEST_COLUMNS
    assert str(manifest.width.dtype) == "Int64" and str(manifest.source_index.dtype) == "int64"


def test_missing_url_list_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sources\[0\].urls: .*nope.txt"):
        crawl_class("tank", [{"urls": str(tmp_path / "nope.txt")}], tmp_path / "out")


# --- search engine: recorded Bing page, real BingImageCrawler --------------------


def recorded_bing_urls(host):
    return [f"{host}/tanks/{name}.jpg" for name in ("t1", "truncated", "missing", "not-really", "png-inside", "t3")]


def test_bing_parser_reads_recorded_page():
    parser = BingParser(1, Signal(), None)
    tasks = list(parser.parse(SimpleNamespace(content=BING_PAGE.read_bytes())))
    # icrawler keeps .jpg results only: drawing.png and the result without metadata are skipped
    assert [task["file_url"] for task in tasks] == recorded_bing_urls(RECORDED_HOST)


def local_feeder(page_url):
    """A feeder that hands the real Bing parser one local result page instead of bing.com's."""

    class LocalFeeder(Feeder):
        def feed(self, **kwargs):
            self.out_queue.put(page_url)

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
        "/tanks/drawing.png": Response(BLUE_PNG, "image/png"),
    }
    with LocalServer(routes) as server:
        server.routes["/images/async"] = Response(page.replace("{host}", server.base_url).encode(), "text/html")
        yield server


def test_bing_crawler_end_to_end(bing_server, tmp_path):
    server = bing_server
    fetched = crawl_engine_query(
        "bing",
        "tank",
        tmp_path / "download",
        max_num=10,
        threads=2,
        feeder_cls=local_feeder(server.url("/images/async?q=tank&first=0")),
    )
    by_url = {item.origin: item for item in fetched}
    assert sorted(by_url) == sorted(recorded_bing_urls(server.base_url))
    assert all(item.query == "tank" for item in fetched)
    ok = {url for url, item in by_url.items() if item.check and item.check.ok}
    assert ok == {server.url(f"/tanks/{name}.jpg") for name in ("t1", "png-inside", "t3")}
    assert by_url[server.url("/tanks/missing.jpg")].path is None
    assert by_url[server.url("/tanks/missing.jpg")].reason == "HTTP 404 Not Found"
    assert by_url[server.url("/tanks/not-really.jpg")].check.reason == "not an image: an HTML page"
    assert by_url[server.url("/tanks/png-inside.jpg")].check.format == "PNG"
    assert by_url[server.url("/tanks/t1.jpg")].path.read_bytes() == RED_JPEG
    assert "/tanks/drawing.png" not in server.requests


def test_bing_max_num_counts_decodable_images(bing_server, tmp_path):
    server = bing_server
    fetched = crawl_engine_query(
        "bing",
        "tank",
        tmp_path / "download",
        max_num=2,
        threads=1,
        feeder_cls=local_feeder(server.url("/images/async?q=tank&first=0")),
    )
    ok = [item for item in fetched if item.check and item.check.ok]
    # in page order: t1 ok, truncated, missing, not-really, png-inside ok -> stop before t3
    assert [Path(item.origin).name for item in ok] == ["t1.jpg", "png-inside.jpg"]
    assert "/tanks/t3.jpg" not in server.requests
    stored = sorted(p.name for p in (tmp_path / "download").iterdir())
    assert stored == sorted(item.path.name for item in fetched if item.path is not None)
    assert re.fullmatch(r"\d{6}\.jpg", stored[0])
