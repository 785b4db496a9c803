"""A local HTTP server that answers the part of the Hugging Face Hub API that huggingface_hub's create_repo,
get_paths_info and create_commit (LFS upload path) use, and records what arrived. Loopback only."""
import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class LocalHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}   # repo_id -> {"private": bool, "files": {path: bytes}}
        self.lfs: dict[str, bytes] = {}    # sha256 -> content
        self.log: list[tuple[str, str]] = []
        self.fail_next_commit = False
        self.card_front_matter = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._send(401, {"error": "Invalid username or password."})
                return False

            def do_POST(self):
                body = self._body()
                hub.log.append(("POST", self.path))
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
                            entry = {"type": "file", "path": path, "size": len(data),
                                     "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
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
                         "oid": hub.oid(f["path"], files[f["path"]]) if f["path"] in files else None}
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

            def do_GET(self):
                hub.log.append(("GET", self.path))
                if not self._authorized():
                    return
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/main)?", self.path.split("?")[0])
                if m and m.group(1) in hub.repos:  # repo_info: the client asks it when a commit would be empty
                    repo = hub.repos[m.group(1)]
                    return self._send(200, {"id": m.group(1), "sha": repo.get("sha", "0" * 40),
                                            "private": repo["private"]})
                self._send(404, {"error": f"no route {self.path}"})

            def do_PUT(self):
                body = self._body()
                hub.log.append(("PUT", self.path))
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                if not m or hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._send(400, {"error": "content does not match its oid"})
                hub.lfs[m.group(1)] = body
                self._send(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def oid(path: str, data: bytes) -> str:
        """The id the Hub gives a stored file: sha256 for an LFS file, git's blob hash for the rest."""
        if path.endswith(".gguf"):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def url(self, repo_id: str) -> str:
        return f"{self.base}/{repo_id}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
