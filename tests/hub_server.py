"""A loopback stand-in for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's
model_info / hf_hub_download / snapshot_download use, serving repositories from memory, and
recording every request so that tests can assert which files were (and were not) fetched.

    GET  /api/models/{repo}[/revision/{rev}]   model info: sha and siblings (the file list)
    GET  /api/models/{repo}/tree/{rev}[/path]  file tree listing (path, size, oid), if a client asks
    HEAD /{repo}/resolve/{rev}/{file}          metadata: X-Repo-Commit, ETag, Content-Length; for weight
                                               files (stored with LFS on the hub) a 302 to /lfs/{sha256}/{repo}/{file}
                                               with X-Linked-Etag / X-Linked-Size, as the hub answers
    GET  /{repo}/resolve/{rev}/{file}, /lfs/{sha256}/...   the bytes

Errors carry the X-Error-Code header the client maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). A repository can be private: then only `Authorization: Bearer {token}` sees it, and
everyone else gets the 401 RepoNotFound the hub gives. It listens on 127.0.0.1 only, on a free port,
in daemon threads, and `stop()` closes it (later connections are refused, like a machine offline).
"""

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors", ".h5", ".msgpack", ".ot", ".onnx", ".model")  # as .gitattributes has them


@dataclass
class Repo:
    files: dict[str, bytes]  # path in the repository -> content
    sha: str = "0123456789abcdef0123456789abcdef01234567"  # commit of main
    revisions: dict[str, str] = field(default_factory=dict)  # other branch/tag -> commit
    history: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> files, for older commits
    token: str | None = None  # private: only this bearer token sees it

    def at(self, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit, files) for a branch, tag or commit hash; None if there is no such revision."""
        sha = self.sha if rev == "main" else self.revisions.get(rev, rev)
        if sha == self.sha:
            return sha, self.files
        return (sha, self.history[sha]) if sha in self.history else None


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.headers: list[dict] = []  # request headers (lower-case names), same order
        self.lfs = {}  # sha256 -> bytes
        handler = type("Handler", (_Handler,), {"hub": self})
        # Two listeners: the hub, and the LFS storage it redirects to. The hub's storage is another
        # host (the client does not follow a HEAD redirect off the hub): here, another port.
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
        self.url, self.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        self.threads = []
        for server in self.servers:
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self):
        """Close both listeners: later connections are refused, as on a machine without internet."""
        for server, thread in zip(self.servers, self.threads):
            if thread.is_alive():
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)

    def fetched(self, repo_id: str) -> set[str]:
        """Files of `repo_id` whose bytes were sent: a GET of resolve/, or of the LFS blob it redirected to."""
        out = set()
        for method, path in self.requests:
            if method == "GET" and path.startswith(f"/{repo_id}/resolve/"):
                out.add(path.split("/", 5)[5])
            if method == "GET" and path.startswith("/lfs/") and path.split("/", 3)[3].startswith(f"{repo_id}/"):
                out.add(path.split("/", 5)[5])  # /lfs/{sha256}/{owner}/{name}/{file}
        return out

    def asked(self, repo_id: str) -> set[str]:
        """Files of `repo_id` asked about at all (HEAD or GET)."""
        return {path.split("/", 5)[5] for _, path in self.requests if path.startswith(f"/{repo_id}/resolve/")}


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a connection may stay silent: a stuck client cannot hold a thread for ever

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def send(self, status: int, body: bytes = b"", head: bool = False, **headers):
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        # One request per connection: a kept-alive connection would outlive stop() and keep serving.
        headers["Connection"] = "close"
        self.close_connection = True
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def error(self, status: int, code: str, head: bool, **headers):
        body = json.dumps({"error": code}).encode()
        self.send(status, body, head, X_Error_Code=code, Content_Type="application/json", **headers)

    def answer(self, head: bool):
        hub, path = self.hub, unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path))
        hub.headers.append({k.lower(): v for k, v in self.headers.items()})
        if path.startswith("/lfs/"):
            data = hub.lfs.get(path.split("/")[2])
            if data is None:
                return self.error(404, "EntryNotFound", head)
            return self.send(200, data, head, Content_Type="application/octet-stream")
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo_id, rest = "/".join(parts[:2]), parts[2:]
        repo = hub.repos.get(repo_id)
        if repo is None or (repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}"):
            return self.error(401, "RepoNotFound", head)  # the hub does not say whether a private repo exists
        if api:  # model info, or a tree listing
            if rest[:1] == ["tree"]:
                rev, prefix = rest[1], "/".join(rest[2:])
            else:
                rev, prefix = (rest[1] if rest[:1] == ["revision"] else "main"), None
            found = repo.at(rev)
            if found is None:
                return self.error(404, "RevisionNotFound", head)
            sha, files = found
            if prefix is None:
                body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": bool(repo.token),
                        "siblings": [{"rfilename": f} for f in sorted(files)]}
            else:
                body = [{"type": "file", "path": f, "size": len(d), "oid": git_oid(d)}
                        for f, d in sorted(files.items()) if f.startswith(prefix)]
            return self.send(200, json.dumps(body).encode(), head, Content_Type="application/json")
        if rest[:1] != ["resolve"] or len(rest) < 3:
            return self.error(404, "EntryNotFound", head)
        found = repo.at(rest[1])
        if found is None:
            return self.error(404, "RevisionNotFound", head)
        sha, files = found
        name = "/".join(rest[2:])
        if name not in files:
            return self.error(404, "EntryNotFound", head, X_Repo_Commit=sha)
        data = files[name]
        if name.endswith(LFS_SUFFIXES):  # LFS: the hub redirects to its storage and names the blob's sha256
            digest = hashlib.sha256(data).hexdigest()
            hub.lfs[digest] = data
            return self.send(302, b"", head, Location=f"{hub.cdn}/lfs/{digest}/{repo_id}/{name}", X_Repo_Commit=sha,
                             X_Linked_Etag=f'"{digest}"', X_Linked_Size=str(len(data)), ETag=f'"{git_oid(data)}"')
        return self.send(200, data, head, X_Repo_Commit=sha, ETag=f'"{git_oid(data)}"',
                         Content_Type="application/octet-stream")
