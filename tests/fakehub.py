"""A fake Hugging Face hub on 127.0.0.1: serves real bytes the way huggingface_hub asks for them."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)  # "org/repo/file" -> bytes
    cut_after: int | None = None  # send only this many bytes of a GET body, then drop
    url: str = ""
    ranges: list[str] = field(default_factory=list)  # Range headers of the GETs received


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _lookup(self) -> bytes | None:
            # /{org}/{repo}/resolve/{revision}/{file}
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            return hub.files.get("/".join([parts[0], parts[1], *parts[4:]]))

        def _headers(self, data: bytes) -> None:
            etag = hashlib.sha256(data).hexdigest()
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")

        def do_HEAD(self) -> None:
            data = self._lookup()
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Error-Message", "Entry not found")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self._headers(data)
            self.end_headers()

        def _tree(self) -> bool:
            """/api/models/{org}/{repo}/tree/{revision}: the repo's files, as JSON."""
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) < 6 or parts[:2] != ["api", "models"] or parts[4] != "tree":
                return False
            prefix = f"{parts[2]}/{parts[3]}/"
            listing = [
                {"type": "file", "path": k[len(prefix) :], "size": len(v), "oid": "0" * 40}
                for k, v in hub.files.items()
                if k.startswith(prefix)
            ]
            if not listing:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True
            body = json.dumps(listing).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return True

        def do_GET(self) -> None:
            if self._tree():
                return
            data = self._lookup()
            if data is None:
                self.do_HEAD()
                return
            wanted = self.headers.get("Range")
            hub.ranges.append(wanted or "")
            if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
                start = int(wanted[6:-1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                etag = hashlib.sha256(data).hexdigest()
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])
                return
            self.send_response(200)
            self._headers(data)
            self.end_headers()
            if hub.cut_after is not None:
                self.wfile.write(data[: hub.cut_after])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(data)

    return Handler


@contextmanager
def serve(hub: FakeHub) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hub_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]
) -> Iterator[FakeHub]:
    """A fake hub serving `files`, with huggingface_hub pointed at it and its cache in
    `tmp_path`."""
    hub = FakeHub(files=files)
    with serve(hub):
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setenv("HOSTLER_CACHE", str(tmp_path / "hostler"))
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        # huggingface_hub reads these at import: reload its constants for this test.
        import importlib

        import huggingface_hub.constants as c

        importlib.reload(c)
        try:
            yield hub
        finally:
            importlib.reload(c)
