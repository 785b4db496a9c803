"""A local HTTP server that answers the parts of the Hugging Face Hub API that the real clients use, loopback only:

- uploads, as huggingface_hub's create_repo and create_commit send them: preupload answers with the oids of the
  files already stored (the client leaves those out), LFS uploads, and repo_info when nothing changed;
- downloads, as huggingface_hub's snapshot_download / hf_hub_download and datasets' load_dataset ask for them:
  repo info with the commit sha, tree listing, paths-info, HEAD and GET of resolve/<revision>/<path> with the
  headers the client checks (X-Repo-Commit, ETag, Content-Length), large files redirected like LFS to a second
  server on another loopback address (a "CDN" that must never see the token), gated repos (401/403 without the right
  token), and 404s with the Hub's X-Error-Code for a missing repo, revision or file.

Everything that arrives is logged, with whether it carried the token."""
import base64
import hashlib
import json
import re
import sys
import threading
import time
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".parquet", ".arrow")
LFS_MIN_BYTES = 10 << 20  # the Hub stores files of 10 MB and more through LFS
CDN_HOST = "127.0.0.2"  # another host name than the endpoint's: huggingface_hub drops the token on redirects there


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def upload_oid(path: str, data: bytes) -> str:
    """The id the Hub gives an uploaded file: sha256 for an LFS file, git's blob hash for the rest."""
    return hashlib.sha256(data).hexdigest() if path.endswith(".gguf") else git_blob_sha1(data)


class ServedFile:
    """One file of a served commit: bytes in memory or a file on disk, with the ids the Hub reports for it."""

    def __init__(self, content: bytes | Path):
        self.content = content
        data = self.read()
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.blob_id = git_blob_sha1(data)

    def read(self) -> bytes:
        return self.content.read_bytes() if isinstance(self.content, Path) else self.content

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES) or self.size >= LFS_MIN_BYTES


class ServedRepo:
    def __init__(self, gated: bool):
        self.gated = gated
        self.commits: dict[str, dict[str, ServedFile]] = {}
        self.refs: dict[str, str] = {}


class _Server(ThreadingHTTPServer):
    block_on_close = False  # a slow-Hub handler still asleep must not hold up shutdown

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # else: a client gave up
            super().handle_error(request, client_address)


class LocalHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}   # uploads: repo_id -> {"private": bool, "files": {path: bytes}}
        self.lfs: dict[str, bytes] = {}    # uploads: sha256 -> content
        self.served: dict[tuple[str, str], ServedRepo] = {}  # downloads: (repo_type, repo_id) -> its commits
        self.log: list[tuple[str, str]] = []
        self.auth_log: list[tuple[str, str, bool]] = []  # (server, path, carried the token)
        self.fail_next_commit = False
        self.fail_with: int | None = None  # answer every request with this status (a Hub that is down)
        self.delay_s = 0.0  # wait this long before answering (a Hub that is slow)
        self.card_front_matter = None
        self.server = _Server(("127.0.0.1", 0), self._handler("hub"))
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.cdn = _Server((CDN_HOST, 0), self._handler("cdn"))
        self.cdn_base = f"http://{CDN_HOST}:{self.cdn.server_address[1]}"
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.server, self.cdn)]

    # ------------------------------------------------------------------ serving repos for download
    def serve(self, repo_type: str, repo_id: str, files: dict[str, bytes | Path], *, gated: bool = False,
              branch: str = "main") -> str:
        """Publish `files` as a new commit on `branch`; returns the commit sha. Earlier commits stay reachable."""
        repo = self.served.setdefault((repo_type, repo_id), ServedRepo(gated))
        repo.gated = gated
        entries = {path: ServedFile(content) for path, content in sorted(files.items())}
        listing = "".join(f"{p} {f.sha256}\n" for p, f in entries.items()).encode()
        commit = hashlib.sha1(repo_id.encode() + listing + str(len(repo.commits)).encode()).hexdigest()
        repo.commits[commit] = entries
        repo.refs[branch] = commit
        return commit

    def url(self, repo_id: str) -> str:
        return f"{self.base}/{repo_id}"

    def requests_to(self, server: str) -> list[tuple[str, bool]]:
        return [(path, auth) for s, path, auth in self.auth_log if s == server]

    # ------------------------------------------------------------------ HTTP
    def _handler(self, server_name: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
                data = body if body is not None else json.dumps(payload).encode()
                self.send_response(status)
                if body is None:
                    self.send_header("Content-Type", "application/json")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if "Content-Length" not in (headers or {}):
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
                self._send(status, {"error": message},
                           {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._send(401, {"error": "Invalid username or password."})
                return False

            def _arrive(self) -> bool:
                """Log the request; False when the Hub is set to fail or the request was answered already."""
                hub.log.append((self.command, self.path))
                auth = self.headers.get("Authorization")
                hub.auth_log.append((server_name, self.path, bool(auth and hub.token and hub.token in auth)))
                if hub.delay_s:
                    time.sleep(hub.delay_s)
                if hub.fail_with:
                    # said in a header, as an HTTP server must: a client that wasn't told may send its next request
                    # down this connection while it closes, and see a disconnect instead of the status
                    self._send(hub.fail_with, {"error": "Internal Error"}, {"Connection": "close"})
                    return False
                return True

            # ---------------------------------------------------------- downloads
            def _repo(self, repo_type: str, repo_id: str, revision: str | None):
                """(repo, commit, files) or None after answering the error the Hub gives."""
                repo = hub.served.get((repo_type, repo_id))
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return None
                if repo.gated:
                    auth = self.headers.get("Authorization")
                    if not auth:
                        self._error(401, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted. You must have "
                                    "access to it and be authenticated to access it. Please log in.")
                        return None
                    if auth != f"Bearer {hub.token}":
                        self._error(403, "GatedRepo", f"Access to {repo_type} {repo_id} is restricted and you are "
                                    "not in the authorized list.")
                        return None
                revision = revision or "main"
                commit = repo.refs.get(revision, revision if revision in repo.commits else None)
                if commit is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo, commit, repo.commits[commit]

            def _info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
                found = self._repo(repo_type, repo_id, revision)
                if found:
                    repo, commit, files = found
                    date = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
                    self._send(200, {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id,
                                     "sha": commit, "private": False, "gated": "manual" if repo.gated else False,
                                     "disabled": False, "lastModified": date, "createdAt": date, "tags": [],
                                     "downloads": 0, "likes": 0, "author": repo_id.split("/")[0],
                                     "siblings": [{"rfilename": p} for p in files]})

            def _entry(self, path: str, f: ServedFile | None, commit: str, expand: bool) -> dict:
                if f is None:
                    entry = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                             "path": path}
                else:
                    entry = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
                    if f.is_lfs(path):
                        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
                if expand:
                    entry["lastCommit"] = {"id": commit, "title": "served by the test Hub",
                                           "date": "2026-01-01T00:00:00.000Z"}
                return entry

            def _tree(self, repo_type: str, repo_id: str, revision: str, prefix: str, params: dict) -> None:
                found = self._repo(repo_type, repo_id, revision)
                if not found:
                    return
                _, commit, files = found
                recursive = params.get("recursive", ["false"])[0].lower() == "true"
                expand = params.get("expand", ["false"])[0].lower() == "true"
                prefix = prefix.strip("/")
                under = {p: f for p, f in files.items() if not prefix or p.startswith(prefix + "/")}
                if prefix and not under:
                    return self._error(404, "EntryNotFound", f"{prefix} does not exist on {revision}",
                                       {"X-Repo-Commit": commit})
                entries, dirs = [], set()
                for path, f in under.items():
                    rest = path[len(prefix) + 1:] if prefix else path
                    parts = rest.split("/")
                    for depth in range(1, len(parts)):
                        dirs.add("/".join(([prefix] if prefix else []) + parts[:depth]))
                    if recursive or len(parts) == 1:
                        entries.append(self._entry(path, f, commit, expand))
                depth = prefix.count("/") + 1 if prefix else 0
                for d in sorted(dirs):
                    if recursive or d.count("/") == depth:
                        entries.append(self._entry(d, None, commit, expand))
                self._send(200, entries)

            def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
                found = self._repo(repo_type, repo_id, revision)
                if not found:
                    return
                _, commit, files = found
                form = parse_qs(body.decode())
                expand = form.get("expand", ["false"])[0].lower() == "true"
                out = []
                for path in form.get("paths", []):
                    path = path.strip("/")
                    if path in files:
                        out.append(self._entry(path, files[path], commit, expand))
                    elif any(p.startswith(path + "/") for p in files):
                        out.append(self._entry(path, None, commit, expand))
                self._send(200, out)

            def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
                found = self._repo(repo_type, repo_id, revision)
                if not found:
                    return
                _, commit, files = found
                f = files.get(path)
                if f is None:
                    return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                                       {"X-Repo-Commit": commit})
                headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                           "Last-Modified": formatdate(usegmt=True)}
                if f.is_lfs(path):  # like the Hub: a redirect to a signed CDN URL, the file's facts on the redirect
                    headers.update({"Location": f"{hub.cdn_base}/lfs/{f.sha256}?expires=3600",
                                    "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                                    "ETag": f'"{f.blob_id}"', "Content-Length": "0"})
                    return self._send(302, body=b"", headers=headers)
                data = f.read()
                headers.update({"ETag": f'"{f.blob_id}"', "Content-Type": "application/octet-stream"})
                self._send(200, body=data, headers=headers)

            def _cdn(self, sha256: str) -> None:
                for repo in hub.served.values():
                    for files in repo.commits.values():
                        for f in files.values():
                            if f.sha256 == sha256:
                                return self._send(200, body=f.read(), headers={
                                    "ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"})
                self._send(404, {"error": "no such object"})

            def _download_route(self) -> bool:
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.split("/")[1:]]
                params = parse_qs(url.query)
                if server_name == "cdn":
                    if len(parts) == 2 and parts[0] == "lfs":
                        self._cdn(parts[1])
                    else:
                        self._send(404, {"error": "no route"})
                    return True
                if len(parts) >= 4 and parts[0] == "api" and parts[1] in ("models", "datasets"):
                    repo_type, repo_id, rest = parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:]
                    if (repo_type, repo_id) not in hub.served and repo_id in hub.repos:
                        if self.command == "GET" and (not rest or rest == ["revision", "main"]):
                            # repo_info of an upload repo: the client asks it when a commit would be empty
                            if not self._authorized():
                                return True
                            repo = hub.repos[repo_id]
                            self._send(200, {"id": repo_id, "sha": repo.get("sha", "0" * 40),
                                             "private": repo["private"]})
                            return True
                        return False  # an upload repo: the push routes answer
                    if not rest:
                        self._info(repo_type, repo_id, None)
                    elif rest[0] == "revision" and len(rest) == 2:
                        self._info(repo_type, repo_id, rest[1])
                    elif rest[0] == "tree" and len(rest) >= 2:
                        self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), params)
                    elif rest[0] == "paths-info" and len(rest) == 2 and self.command == "POST":
                        self._paths_info(repo_type, repo_id, rest[1], self._body())
                    else:
                        return False
                    return True
                repo_type = "dataset" if parts and parts[0] == "datasets" else "model"
                if repo_type == "dataset":
                    parts = parts[1:]
                if len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
                    return True
                return False

            def do_HEAD(self):
                if self._arrive() and not self._download_route():
                    self._send(404, {"error": f"no route {self.path}"})

            def do_GET(self):
                if self._arrive() and not self._download_route():
                    self._send(404, {"error": f"no route {self.path}"})

            # ---------------------------------------------------------- uploads
            def do_POST(self):
                if not self._arrive():
                    return
                if self._download_route():
                    return
                body = self._body()
                if not self._authorized():
                    return
                if self.path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": hub.url(repo_id)})
                    private = req.get("visibility") == "private" or req.get("private") is True  # 1.x: visibility
                    hub.repos[repo_id] = {"private": private, "files": {}}
                    return self._send(200, {"url": hub.url(repo_id)})
                if self.path == "/api/validate-yaml":  # the client checks a README's front matter before committing
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        front = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                        errors = [] if isinstance(front, dict) else [{"message": "front matter is not a mapping"}]
                    except yaml.YAMLError as err:
                        errors = [{"message": str(err)}]
                    hub.card_front_matter = front if not errors else None
                    return self._send(400 if errors else 200, {"errors": errors, "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(paths-info|preupload|commit)/main", self.path)
                if m and m.group(1) not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                if m and m.group(2) == "paths-info":
                    files = hub.repos[m.group(1)]["files"]
                    out = []
                    for path in parse_qs(body.decode()).get("paths", []):
                        if path in files:
                            data = files[path]
                            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
                            if path.endswith(".gguf"):
                                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                                "pointerSize": 134}
                            out.append(entry)
                    return self._send(200, out)
                if m and m.group(2) == "preupload":
                    req = json.loads(body)
                    files = hub.repos[m.group(1)]["files"]
                    # "oid" of a file already there: what the client compares with its own to skip unchanged files
                    return self._send(200, {"files": [
                        {"path": f["path"], "shouldIgnore": False,
                         "uploadMode": "lfs" if f["path"].endswith(".gguf") else "regular",
                         "oid": upload_oid(f["path"], files[f["path"]]) if f["path"] in files else None}
                        for f in req["files"]]})
                if m and m.group(2) == "commit":
                    if hub.fail_next_commit:
                        hub.fail_next_commit = False
                        return self._send(500, {"error": "Internal Error (the connection dropped)"})
                    files = {}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            oid = item["value"]["oid"]
                            if oid not in hub.lfs:
                                return self._send(422, {"error": f"LFS object {oid} was never uploaded"})
                            files[item["value"]["path"]] = hub.lfs[oid]
                    hub.repos[m.group(1)]["files"].update(files)
                    oid = hashlib.sha1(body).hexdigest()
                    hub.repos[m.group(1)]["sha"] = oid
                    return self._send(200, {"commitUrl": f"{hub.url(m.group(1))}/commit/{oid}", "commitOid": oid,
                                            "pullRequestUrl": None})
                m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", self.path)
                if m:
                    objects = []
                    for obj in json.loads(body)["objects"]:
                        entry = {"oid": obj["oid"], "size": obj["size"]}
                        if obj["oid"] not in hub.lfs:
                            entry["actions"] = {"upload": {"href": f"{hub.base}/lfs-upload/{obj['oid']}"}}
                        objects.append(entry)
                    return self._send(200, {"transfer": "basic", "objects": objects})
                self._send(404, {"error": f"no route {self.path}"})

            def do_PUT(self):
                if not self._arrive():
                    return
                body = self._body()
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                if not m or hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._send(400, {"error": "content does not match its oid"})
                hub.lfs[m.group(1)] = body
                self._send(200, {})

        return Handler

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        for server in (self.server, self.cdn):
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------------- what the tests publish
QWEN3_LAYOUT = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                "chat_template.jinja"}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def qwen3_layout(source: Path, out: Path, shard_size: str = "100MB") -> Path:
    """A model folder laid out like unsloth/Qwen3-8B on the Hub: bf16 weights in model-0000N-of-0000M.safetensors
    shards with model.safetensors.index.json, the configs, the fast tokenizer, the slow tokenizer's vocab.json and
    merges.txt, added_tokens.json, special_tokens_map.json and chat_template.jinja."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size=shard_size)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out)
    fast = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    # what a slow GPT-2 style BPE tokenizer saves: its vocabulary and merges (the fast tokenizer's own)
    (out / "vocab.json").write_text(json.dumps(fast["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in fast["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in fast["added_tokens"]},
                                                      ensure_ascii=False, indent=2), encoding="utf-8")
    special = {f"{role}_token": getattr(tokenizer, f"{role}_token") for role in ("bos", "eos", "pad", "unk")
               if getattr(tokenizer, f"{role}_token", None)}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    if not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(tokenizer.chat_template or CHATML, encoding="utf-8")
    return out


def fortune_rows(sample: Path, n: int = 240) -> list[dict]:
    """`n` synthetic rows in Conard/fortune-telling's columns: the bundled sample's rows again and again, the birth
    year moved by 60 years each round (the same stem-branch year, so the reasoning still fits)."""
    base = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i in range(n):
        row, shift = dict(base[i % len(base)]), 60 * (i // len(base))
        row["Question"] = re.sub(r"^(\d{4})年", lambda m: f"{int(m.group(1)) + shift}年", row["Question"], count=1)
        rows.append({"Question": row["Question"], "Complex_CoT": row["Complex_CoT"], "Response": row["Response"]})
    return rows


FORTUNE_CARD = """---
license: apache-2.0
language:
- zh
task_categories:
- question-answering
- text-generation
pretty_name: fortune-telling (synthetic test copy)
size_categories:
- n<1K
---

# fortune-telling (synthetic)

Served by cotune's tests in place of `Conard/fortune-telling`: the same layout (config `default`, split `train`,
columns `Question`, `Response`, `Complex_CoT`, JSON records), but synthetic rows made from cotune's bundled sample.
Not real readings.
"""


def fortune_dataset_files(rows: list[dict], data_file: str = "fortune_telling.json") -> dict[str, bytes]:
    return {"README.md": FORTUNE_CARD.encode(), data_file: json.dumps(rows, ensure_ascii=False, indent=1).encode()}
