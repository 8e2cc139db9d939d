"""The view's local server: the standard library's ``ThreadingHTTPServer``, GET only.

Why the standard library: the page needs a handful of JSON answers and a few static files on 127.0.0.1; a web
framework would be a dependency for routing ten paths. What it answers:

  /                     the page (``static/index.html``), its script and style: shipped in the package, nothing
                        from the internet
  /api/info             what is shown (a data file or a run folder)
  /api/records?...      data: one page of records (search, filters)
  /api/record?index=N   data: one record as it trains (switches: label_mode, enable_thinking, ...)
  /api/image?index=N&image=K
                        data: an image record N gives as bytes (a data: URI, a Parquet / Arrow cell), decoded in
                        memory from the record's own reference: nothing else can be named, nothing is written
  /api/frame?index=N&video=K&frame=J
                        data: one sampled video frame as the model gets it (PNG, decoded by the training code)
  /api/run              run: log, facts, predictions (read again at each request)
  /file?path=P          a file the data or run refers to (an image, a video, the run's plot): any other path
                        is refused with 403

It never runs anything from the data: records and files are read, decoded by the training code, and sent as JSON
or bytes.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlparse

logger = logging.getLogger(__name__)

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/style.css": ("style.css", "text/css")}
RASTER = {"image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"}
"""Types an image given as bytes is sent as (a data: URI's own claim of another type, e.g. SVG, is not trusted)."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self'; "
                               "script-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _flag(values: dict, name: str) -> bool | None:
    value = values.get(name, [""])[0].lower()
    return {"true": True, "1": True, "false": False, "0": False}.get(value)


def _int(values: dict, name: str) -> int | None:
    value = values.get(name, [""])[0]
    try:
        return int(value)
    except ValueError:
        return None


class Handler(BaseHTTPRequestHandler):
    """Routes GET requests to the site (a ``DataView`` or a ``RunView``)."""

    site = None  # set on the server's subclass
    server_version = "vlmtune-view"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        logger.debug("%s %s", self.address_string(), format % args)

    def _headers(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self._headers(status, content_type, len(body))
        self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def do_GET(self):  # noqa: N802 (the base class's name)
        url = urlparse(self.path)
        query = parse_qs(url.query)
        try:
            if url.path in STATIC:
                name, kind = STATIC[url.path]
                return self._send(200, resources.files("vlmtune.view").joinpath("static", name).read_bytes(), kind)
            if url.path == "/api/info":
                return self._json(self.site.info())
            if url.path == "/file":
                return self._file(query.get("path", [""])[0])
            if url.path == "/api/run" and hasattr(self.site, "state"):
                return self._json(self.site.state())
            if url.path == "/api/records" and hasattr(self.site, "rows"):
                return self._json(self.site.rows(
                    page=_int(query, "page") or 0, query=query.get("q", [""])[0], shape=query.get("shape", [""])[0],
                    min_length=_int(query, "min"), max_length=_int(query, "max"),
                    problems=bool(_flag(query, "problems")), over=bool(_flag(query, "over"))))
            if url.path == "/api/record" and hasattr(self.site, "record"):
                index = _int(query, "index")
                mode = query.get("label_mode", [None])[0]
                answer = None if index is None else self.site.record(
                    index, label_mode=mode, enable_thinking=_flag(query, "enable_thinking"),
                    keep_earlier_reasoning=_flag(query, "keep_earlier_reasoning"))
                return self._json(answer) if answer else self._error(404, f"no record with index {index}")
            if url.path == "/api/image" and hasattr(self.site, "image_bytes"):
                found = self.site.image_bytes(_int(query, "index") or 0, _int(query, "image") or 0)
                if not found:
                    return self._error(404, "no image given as bytes there")
                body, kind = found
                return self._send(200, body, kind if kind in RASTER else "application/octet-stream")
            if url.path == "/api/frame" and hasattr(self.site, "frame_png"):
                png = self.site.frame_png(_int(query, "index") or 0, _int(query, "video") or 0,
                                          _int(query, "frame") or 0)
                return self._send(200, png, "image/png") if png else self._error(404, "no such frame")
            return self._error(404, f"no such page: {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as exc:  # one request's failure is shown on the page, the server goes on
            logger.exception("view: %s failed", self.path)
            return self._error(500, f"{type(exc).__name__}: {exc}")

    def _file(self, path: str) -> None:
        real = os.path.realpath(path) if path else ""
        if not real or real not in self.site.allowed_files():
            return self._error(403, "not a file of this data or run")
        if not os.path.isfile(real):
            return self._error(404, "the file is gone")
        kind = mimetypes.guess_type(real)[0] or "application/octet-stream"
        if not kind.startswith(("image/", "video/")):
            kind = "application/octet-stream"  # never a page or a script, whatever its name
        with open(real, "rb") as f:  # streamed: a long video is not read into memory
            self._headers(200, kind, os.fstat(f.fileno()).st_size)
            shutil.copyfileobj(f, self.wfile)


def make_server(site, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for ``site`` on ``host:port`` (port 0: a free one; ``server.server_address`` says which)."""
    handler = type("SiteHandler", (Handler,), {"site": site})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve_in_thread(site, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread (tests, notebooks); returns it and its base URL."""
    server = make_server(site, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"
