"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

It implements the endpoints the real ``huggingface_hub`` client (2.x) calls for model and
dataset repos, so tests run the real client end to end on 127.0.0.1:

* ``POST /api/repos/create`` (409 when the repo exists), ``DELETE /api/repos/delete``,
  ``POST /api/validate-yaml`` (model cards);
* ``POST /api/{type}s/{repo}/preupload/{rev}``: every file is answered ``uploadMode: regular``,
  so the client never takes the LFS or Xet paths (the server advertises neither), with the
  remote blob oid so unchanged files are skipped like on the Hub;
* ``POST /api/{type}s/{repo}/commit/{rev}``: the NDJSON commit API (header, ``file`` base64,
  ``deletedFile``, ``deletedFolder``; ``parentCommit`` checked); every commit gets a new sha;
* ``GET/HEAD /{repo}/resolve/{rev}/{path}`` (``/datasets/...`` too): 200 with ``ETag`` (git blob
  sha1), ``X-Repo-Commit``, ``Content-Length``, byte ranges; errors carry ``X-Error-Code``
  (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the client expects;
* ``GET /api/{type}s/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``),
  ``/tree/{rev}[/{path}]`` (``recursive``), ``/refs``, ``/commits/{rev}``,
  ``POST /branch/{name}`` and ``/tag/{rev}``.

Revisions are branches, tags or full 40-hex commit shas; old commits stay readable, so
revision pinning behaves like on the Hub. Use :class:`LocalHub` (or the ``local_hub`` pytest
fixture in ``tests/conftest.py``)::

    with LocalHub() as hub:
        sha = hub.seed("org/name", {"model.safetensors": b"..."})
        api = HfApi(endpoint=hub.endpoint)

The server stops when the context/fixture ends and, in any case, after ``timeout`` seconds.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.pth filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_SHA_CHARS = set("0123456789abcdef")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub returns as ETag for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    message: str
    files: Dict[str, bytes]
    date: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created: float
    commits: Dict[str, Commit] = field(default_factory=dict)
    branches: Dict[str, str] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Optional[Commit]:
        oid = self.branches.get(rev) or self.tags.get(rev)
        if oid is None and len(rev) == 40 and set(rev) <= _SHA_CHARS:
            oid = rev
        return self.commits.get(oid) if oid else None


class HubHTTPError(Exception):
    """An HTTP error answered by the server (status, Hub error code, message)."""

    def __init__(self, status: int, code: Optional[str], message: str, commit: Optional[str] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubState:
    """Repos, commits and refs, guarded by one lock."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: Dict[Tuple[str, str], Repo] = {}
        self._counter = itertools.count()

    def get(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubHTTPError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool = False) -> Tuple[Repo, bool]:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key], False
            repo = Repo(repo_type, repo_id, private, time.time())
            self.repos[key] = repo
            self.commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit", create_branch=True)
            return repo, True

    def commit(
        self,
        repo: Repo,
        branch: str,
        add: Mapping[str, bytes],
        delete: List[Tuple[str, bool]],
        title: str,
        description: str = "",
        parent: Optional[str] = None,
        create_branch: bool = False,
    ) -> Commit:
        """Apply additions and deletions (path, is_folder) on top of ``branch``; return the new commit."""
        with self.lock:
            head_oid = repo.branches.get(branch)
            if head_oid is None and not create_branch:
                raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            if parent is not None and head_oid is not None and not head_oid.startswith(parent):
                raise HubHTTPError(412, None, f"A commit has happened since {parent}: {branch} is at {head_oid}")
            files = dict(repo.commits[head_oid].files) if head_oid else {}
            for path, is_folder in delete:
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)] if is_folder else [path] if path in files else []
                if not gone:
                    raise HubHTTPError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                for p in gone:
                    del files[p]
            files.update(add)
            blob = json.dumps(
                [head_oid, title, next(self._counter), sorted((p, git_blob_oid(d)) for p, d in files.items())]
            )
            oid = hashlib.sha1(blob.encode()).hexdigest()
            c = Commit(oid, head_oid, title, description, files, time.time())
            repo.commits[oid] = c
            repo.branches[branch] = oid
            return c

    def resolve(self, repo_type: str, repo_id: str, rev: str) -> Tuple[Repo, Commit]:
        repo = self.get(repo_type, repo_id)
        c = repo.resolve(rev)
        if c is None:
            raise HubHTTPError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, c


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: a stopped server leaves no live sockets
    server: "_Server"

    def log_message(self, format, *args):  # quiet; requests are recorded in LocalHub.requests
        pass

    # -- plumbing -------------------------------------------------------------------------
    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: Optional[Dict[str, str]] = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _dispatch(self) -> None:
        hub = self.server.hub
        parts = urlsplit(self.path)
        segs = [unquote(s) for s in parts.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        hub.requests.append((self.command, self.path))
        try:
            self._route(hub, segs, query)
        except HubHTTPError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._json({"error": e.message}, e.status, headers)
        except Exception as e:  # a server bug: make it visible to the client as a 500
            self._json({"error": f"{type(e).__name__}: {e}"}, 500)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routing --------------------------------------------------------------------------
    def _route(self, hub: "LocalHub", segs: List[str], query: Dict[str, str]) -> None:
        st, m = hub.state, self.command
        if segs[:1] == ["api"]:
            if segs[1:3] == ["repos", "create"] and m == "POST":
                return self._create_repo(json.loads(self._body() or b"{}"))
            if segs[1:3] == ["repos", "delete"] and m == "DELETE":
                p = json.loads(self._body() or b"{}")
                rid = f"{p['organization']}/{p['name']}" if p.get("organization") else p["name"]
                with st.lock:
                    st.get(p.get("type") or "model", rid)
                    del st.repos[(p.get("type") or "model", rid)]
                return self._json({})
            if segs[1:2] == ["validate-yaml"] and m == "POST":
                return self._json({"errors": [], "warnings": []})
            if len(segs) >= 4 and segs[1] in ("models", "datasets"):
                rtype, rid, rest = segs[1][:-1], f"{segs[2]}/{segs[3]}", segs[4:]
                return self._repo_api(st, rtype, rid, rest, query)
            raise HubHTTPError(404, None, f"no such endpoint: {self.path}")
        rtype = "model"
        if segs[:1] == ["datasets"]:
            rtype, segs = "dataset", segs[1:]
        if len(segs) >= 5 and segs[2] == "resolve" and m in ("GET", "HEAD"):
            return self._resolve(st, rtype, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HubHTTPError(404, None, f"no such endpoint: {self.path}")

    def _create_repo(self, p: dict) -> None:
        st, hub = self.server.hub.state, self.server.hub
        rtype = p.get("type") or "model"
        rid = f"{p['organization']}/{p['name']}" if p.get("organization") else f"{hub.user}/{p['name']}"
        private = p.get("private") is True or p.get("visibility") == "private"
        _, created = st.create(rtype, rid, private)
        url = f"{hub.endpoint}/{'datasets/' if rtype == 'dataset' else ''}{rid}"
        if not created:
            return self._json({"error": "You already created this repo", "url": url}, 409)
        self._json({"url": url, "name": rid, "id": rid})

    def _repo_api(self, st: HubState, rtype: str, rid: str, rest: List[str], query: Dict[str, str]) -> None:
        m, hub = self.command, self.server.hub
        with st.lock:
            repo = st.get(rtype, rid)
            op = rest[0] if rest else ""
            if m == "GET" and op in ("", "revision"):
                _, c = st.resolve(rtype, rid, rest[1] if op else "main")
                return self._json(
                    {
                        "_id": hashlib.md5(rid.encode()).hexdigest()[:24],
                        "id": rid,
                        "author": rid.split("/")[0],
                        "sha": c.oid,
                        "lastModified": _iso(c.date),
                        "createdAt": _iso(repo.created),
                        "private": repo.private,
                        "disabled": False,
                        "gated": False,
                        "downloads": 0,
                        "likes": 0,
                        "tags": [],
                        "siblings": [{"rfilename": p} for p in sorted(c.files)],
                    }
                )
            if m == "GET" and op == "tree" and len(rest) >= 2:
                return self._json(
                    self._tree(
                        st.resolve(rtype, rid, rest[1])[1],
                        "/".join(rest[2:]),
                        query.get("recursive", "").lower() in ("1", "true"),
                    )
                )
            if m == "GET" and op == "refs":
                ref = lambda kind, n, o: {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": o}  # noqa: E731
                return self._json(
                    {
                        "branches": [ref("heads", n, o) for n, o in sorted(repo.branches.items())],
                        "tags": [ref("tags", n, o) for n, o in sorted(repo.tags.items())],
                        "converts": [],
                        "pullRequests": [],
                    }
                )
            if m == "GET" and op == "commits" and len(rest) == 2:
                c, out = st.resolve(rtype, rid, rest[1])[1], []
                while c is not None:
                    out.append(
                        {
                            "id": c.oid,
                            "title": c.title,
                            "message": c.message,
                            "date": _iso(c.date),
                            "authors": [{"user": hub.user, "avatar": ""}],
                        }
                    )
                    c = repo.commits.get(c.parent) if c.parent else None
                return self._json(out)
            if m == "POST" and op == "preupload" and len(rest) == 2:
                files = st.resolve(rtype, rid, rest[1])[1].files
                req = json.loads(self._body() or b"{}")
                return self._json(
                    {
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "regular",
                                "shouldIgnore": False,
                                "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                            }
                            for f in req.get("files", [])
                        ]
                    }
                )
            if m == "POST" and op == "commit" and len(rest) == 2:
                return self._commit(st, repo, rest[1], query)
            if m in ("POST", "DELETE") and op == "branch" and len(rest) == 2:
                if m == "DELETE":
                    repo.branches.pop(rest[1], None)
                    return self._json({})
                if rest[1] in repo.branches:
                    raise HubHTTPError(409, None, f"Branch {rest[1]} already exists")
                start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
                repo.branches[rest[1]] = st.resolve(rtype, rid, start)[1].oid
                return self._json({})
            if m == "POST" and op == "tag" and len(rest) == 2:
                tag = json.loads(self._body() or b"{}")["tag"]
                if tag in repo.tags:
                    raise HubHTTPError(409, None, f"Tag {tag} already exists")
                repo.tags[tag] = st.resolve(rtype, rid, rest[1])[1].oid
                return self._json({})
        raise HubHTTPError(404, None, f"no such endpoint: {self.command} {self.path}")

    @staticmethod
    def _tree(c: Commit, path: str, recursive: bool) -> List[dict]:
        path = path.strip("/")
        prefix = path + "/" if path else ""
        if path and path in c.files:
            raise HubHTTPError(400, None, f"{path} is a file, not a folder")
        under = sorted(p for p in c.files if p.startswith(prefix))
        if path and not under:
            raise HubHTTPError(404, "EntryNotFound", f"{path} does not exist at {c.oid}", c.oid)
        dirs = sorted({p[:i] for p in under for i in range(len(prefix), len(p)) if p[i] == "/"})
        entries = [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in dirs
        ] + [{"type": "file", "oid": git_blob_oid(c.files[p]), "size": len(c.files[p]), "path": p} for p in under]
        if not recursive:
            entries = [e for e in entries if "/" not in e["path"][len(prefix) :]]
        return entries

    def _commit(self, st: HubState, repo: Repo, rev: str, query: Dict[str, str]) -> None:
        if query.get("create_pr"):
            raise HubHTTPError(400, None, "pull requests are not supported by the local test Hub")
        header, add, delete = {}, {}, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, val = item["key"], item["value"]
            if key == "header":
                header = val
            elif key == "file":
                if val.get("encoding", "base64") != "base64":
                    raise HubHTTPError(400, None, f"unsupported encoding {val.get('encoding')}")
                add[val["path"]] = base64.b64decode(val["content"])
            elif key in ("deletedFile", "deletedFolder"):
                delete.append((val["path"], key == "deletedFolder"))
            else:  # lfsFile: preupload never asks for LFS, so a client sending one is a bug worth seeing
                raise HubHTTPError(
                    400, None, f"unsupported commit operation '{key}' (the local Hub only takes regular uploads)"
                )
        c = st.commit(
            repo,
            rev,
            add,
            delete,
            header.get("summary") or "commit",
            header.get("description", ""),
            parent=header.get("parentCommit"),
        )
        prefix = "datasets/" if repo.repo_type == "dataset" else ""
        self._json(
            {
                "success": True,
                "commitOid": c.oid,
                "hookOutput": "",
                "pullRequestUrl": None,
                "commitUrl": f"{self.server.hub.endpoint}/{prefix}{repo.repo_id}/commit/{c.oid}",
            }
        )

    def _resolve(self, st: HubState, rtype: str, rid: str, rev: str, path: str) -> None:
        with st.lock:
            _, c = st.resolve(rtype, rid, rev)
            data = c.files.get(path)
        if data is None:
            raise HubHTTPError(404, "EntryNotFound", f"Entry not found: {path}", c.oid)
        headers = {
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": c.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and self.command == "GET":
            a, _, b = rng[6:].partition("-")
            start, end = int(a or 0), int(b) if b else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: "LocalHub"


FileData = Union[bytes, str, Path]


class LocalHub:
    """A local Hub on ``127.0.0.1:<free port>``; ``endpoint`` is its base URL (pass it as HF_ENDPOINT).

    ``requests`` records ``(method, path)`` of every request (e.g. to assert that offline mode
    made none). The server shuts itself down after ``timeout`` seconds whatever happens.
    """

    def __init__(self, timeout: float = 600.0, user: str = "bench-test"):
        self.state = HubState()
        self.user = user
        self.requests: List[Tuple[str, str]] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"local-hub-{self.port}",
            daemon=True,
        )
        self._timer = threading.Timer(timeout, self.stop)
        self._timer.daemon = True
        self._stopped = False
        self._thread.start()
        self._timer.start()

    @property
    def url(self) -> str:
        """Alias of :attr:`endpoint`."""
        return self.endpoint

    def stop(self) -> None:
        """Stop serving and close the port (idempotent). Later requests get 'connection refused'."""
        if self._stopped:
            return
        self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return not self._stopped

    def __enter__(self) -> "LocalHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- direct (non-HTTP) helpers for tests --------------------------------------------------
    def seed(
        self,
        repo_id: str,
        files: Mapping[str, FileData],
        *,
        branch: str = "main",
        message: str = "seed files",
        repo_type: str = "model",
        private: bool = False,
    ) -> str:
        """Create ``repo_id`` if needed and commit ``files`` (path in repo -> bytes, text or local file)
        to ``branch`` (created from main if new). Returns the new commit sha."""

        def as_bytes(v: FileData) -> bytes:
            if isinstance(v, bytes):
                return v
            if isinstance(v, Path):
                return v.read_bytes()
            return v.encode()

        with self.state.lock:
            repo, _ = self.state.create(repo_type, repo_id, private)
            if branch not in repo.branches:
                repo.branches[branch] = repo.branches["main"]
            return self.state.commit(repo, branch, {p: as_bytes(v) for p, v in files.items()}, [], message).oid

    def tag(self, repo_id: str, tag: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.state.lock:
            repo, c = self.state.resolve(repo_type, repo_id, revision)
            repo.tags[tag] = c.oid
            return c.oid

    def head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str:
        """Commit sha that ``branch`` points at."""
        with self.state.lock:
            return self.state.get(repo_type, repo_id).branches[branch]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> Dict[str, bytes]:
        """Contents of the repo at ``revision`` (path -> bytes)."""
        with self.state.lock:
            return dict(self.state.resolve(repo_type, repo_id, revision)[1].files)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.state.get(repo_type, repo_id)

    @staticmethod
    def hf_ref(repo_id: str, path: str, revision: Optional[str] = None) -> str:
        """``hf://repo_id/path[@revision]`` (the reference bench accepts wherever a checkpoint path is)."""
        return f"hf://{repo_id}/{path}" + (f"@{revision}" if revision else "")
