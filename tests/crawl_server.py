"""A local HTTP server with canned responses, and the image bytes the crawl tests serve.

Tests point icrawler's real crawlers at it, so nothing reaches the internet.
"""

from __future__ import annotations

import io
import random
import struct
import threading
import time
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
    headers: tuple[tuple[str, str], ...] = ()  # e.g. (("Location", "/a.jpg"),) with status 302
    delay_s: float = 0.0  # before the status line: a server that does not answer
    drip_s: float = 0.0  # between 16-byte pieces of the body: a slow drip


class LocalServer:
    """``with LocalServer(routes) as server:`` serves ``routes`` (path -> Response) on 127.0.0.1."""

    def __init__(self, routes: dict[str, Response], latency_s: float = 0.0):
        """``latency_s``: each request waits a random time up to that long before its answer
        (so that parallel downloads finish in another order every run)."""
        self.routes = routes
        self.latency_s = latency_s
        self.requests: list[str] = []  # every request, in arrival order
        self.served: list[str] = []  # requests whose whole response was written
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                response = server.routes.get(self.path.split("?", 1)[0])
                if response is None:
                    response = Response(b"<html><body>not found</body></html>", "text/html", 404)
                time.sleep(response.delay_s + random.uniform(0, server.latency_s))
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                for name, value in response.headers:
                    self.send_header(name, value)
                length = response.declared_length
                self.send_header("Content-Length", str(len(response.body) if length is None else length))
                self.end_headers()
                try:
                    if response.drip_s:
                        for start in range(0, len(response.body), 16):
                            self.wfile.write(response.body[start:start + 16])
                            self.wfile.flush()
                            time.sleep(response.drip_s)
                    else:
                        self.wfile.write(response.body)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up
                finally:
                    self.close_connection = True
                server.served.append(self.path)

            def log_message(self, format, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
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


def image_bytes(format: str = "JPEG", size: tuple[int, int] = (48, 40), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=format)
    return buffer.getvalue()


def distinct_jpeg(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG of noise: different seeds give images no perceptual hash confuses."""
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST).save(buffer, format="JPEG", quality=95)
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
