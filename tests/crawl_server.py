"""A local HTTP server with canned responses, and the image bytes the crawl tests serve.

Tests point icrawler's real crawlers at it, so nothing reaches the internet.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


@dataclass(frozen=True)
class Response:
    body: bytes
    content_type: str = "image/jpeg"
    status: int = 200
    # a Content-Length other than len(body): a server that lies, or announces a huge file
    declared_length: int | None = None


class LocalServer:
    """``with LocalServer(routes) as server:`` serves ``routes`` (path -> Response) on 127.0.0.1."""

    def __init__(self, routes: dict[str, Response]):
        self.routes = routes
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                response = server.routes.get(self.path.split("?", 1)[0])
                if response is None:
                    response = Response(b"<html><body>not found</body></html>", "text/html", 404)
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                length = response.declared_length
                self.send_header("Content-Length", str(len(response.body) if length is None else length))
                self.end_headers()
                self.wfile.write(response.body)
                self.close_connection = True

            def log_message(self, format, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def __enter__(self) -> LocalServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def image_bytes(format: str = "JPEG", size: tuple[int, int] = (32, 24), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=format)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut short: Pillow reads its header but cannot decode the pixels."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def png_claiming_size(width, height):
    """A PNG whose header claims width x height; its pixel data is never reached."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


HTML_PAGE = b"<!DOCTYPE html><html><head><title>Access denied</title></head><body>hotlinking</body></html>"
