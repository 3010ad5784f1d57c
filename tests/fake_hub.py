"""A tiny Hugging Face Hub over HTTP, for tests: the endpoints `snapshot_download` uses.

It serves the files under ``root/models/<org>/<name>/`` and ``root/datasets/<org>/<name>/`` as
repos at one fixed commit, speaking the Hub's API just far enough (repo info, recursive tree,
``resolve`` downloads with the ``X-Repo-Commit``/``ETag`` headers, 404 + ``X-Error-Code:
RepoNotFound`` for an unknown repo). Point ``HF_ENDPOINT`` at ``FakeHub.url`` (in a subprocess:
huggingface_hub reads it at import). Every request is logged in ``requests``, so a test can show
that a step never touched it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional, Tuple
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: List[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.requests.append(f"HEAD {self.path}")
                self._serve(body=False)

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                self._serve(body=True)

            def _send(self, code: int, data: bytes, headers: Optional[dict] = None, body: bool = True):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _not_found(self, body: bool):
                self._send(404, b'{"error": "Repository not found"}',
                           {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}, body)

            def _serve(self, body: bool):
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
                try:
                    kind, repo, rest = hub._route(parts)
                except LookupError:
                    return self._not_found(body)
                repo_dir = hub.root / kind / repo
                if not repo_dir.is_dir():
                    return self._not_found(body)
                if rest[0] == "info":
                    files = hub._files(repo_dir)
                    data = json.dumps({"id": repo, "sha": COMMIT, "private": False,
                                       "siblings": [{"rfilename": f} for f in files]}).encode()
                    return self._send(200, data, {"Content-Type": "application/json"}, body)
                if rest[0] == "tree":
                    entries = [{"type": "file", "path": f, "size": (repo_dir / f).stat().st_size,
                                "oid": hub._oid(repo_dir / f)} for f in hub._files(repo_dir)]
                    return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)
                f = repo_dir / rest[1]
                if not f.is_file():
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                data = f.read_bytes()
                self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hub._oid(f)}"',
                                       "Content-Type": "application/octet-stream"}, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def _route(parts: List[str]) -> Tuple[str, str, tuple]:
        """URL path -> (models|datasets, org/name, what): ("info",), ("tree",) or ("file", path)."""
        if parts[0] == "api" and len(parts) >= 6 and parts[1] in ("models", "datasets"):
            kind, repo = parts[1], "/".join(parts[2:4])
            if parts[4] == "revision":
                return kind, repo, ("info",)
            if parts[4] == "tree":
                return kind, repo, ("tree",)
        kind = "models"
        if parts[0] == "datasets":
            kind, parts = "datasets", parts[1:]
        if len(parts) >= 5 and parts[2] == "resolve":
            return kind, "/".join(parts[:2]), ("file", "/".join(parts[4:]))
        raise LookupError(parts)

    @staticmethod
    def _files(repo_dir: Path) -> List[str]:
        return sorted(str(p.relative_to(repo_dir)) for p in repo_dir.rglob("*") if p.is_file())

    @staticmethod
    def _oid(f: Path) -> str:
        return hashlib.sha1(f.read_bytes()).hexdigest()

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
