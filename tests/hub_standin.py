"""A local stand-in for the Hugging Face Hub's HTTP API: what huggingface_hub 2.4.0 calls to create a
repo and commit files to it, so that tuner/export/publish.py runs unchanged (HF_ENDPOINT pointed
here) and the test compares what arrived, byte for byte, with what was pushed.

Endpoints (as huggingface_hub's hf_api.py, _commit_api.py and lfs.py call them):
  GET  /api/agent-harnesses                                the public registry its user agent reads
  POST /api/repos/create                                   create_repo (409 + url when it exists)
  POST /api/validate-yaml                                  the README.md metadata, before any upload
  POST /api/models/{repo}/preupload/{revision}             "regular" or "lfs" for each file
  POST /{repo}.git/info/lfs/objects/batch                  LFS batch API: where to PUT each object
  PUT  /lfs-objects/{oid}                                  the object itself (the Hub's S3 URL)
  POST /{repo}.git/info/lfs/objects/verify                 LFS verify
  POST /api/models/{repo}/commit/{revision}                the commit, as NDJSON
Every API call must carry `Authorization: Bearer <token>` (401 otherwise; 403 for a namespace the
token may not write to; 404 for a repo that does not exist), as the Hub answers.

And Xet, which huggingface_hub uses for large files whenever hf_xet is installed (it does not ask
the server first): the token endpoint of the Hub and the CAS service the token points at, as the
Xet protocol specification describes them (huggingface.co/docs/xet: auth, api, xorb, shard):
  GET  /api/models/{repo}/xet-write-token/{revision}       {accessToken, exp, casUrl}
  POST /v1/xorbs/default/{hash}                            a serialized xorb: its chunks
  POST /v1/shards                                          the files, as terms over xorb chunks
  GET  /v1/chunks/default/{hash}                           global dedupe: 404, nothing known
(the newer /v2/shards and /v1/xorb-grants answer 404, and the client falls back to the above). The
stand-in rebuilds each file from its terms (LZ4 and byte-grouped LZ4 chunks decoded here) and
checks it against the sha256 the shard gives, which is the LFS oid the commit then names. With
HF_HUB_DISABLE_XET=1 the same push goes through the LFS batch API instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

USER = "tester"
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub's rule: bigger files go to LFS whatever their name
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".model")
# License ids the Hub's metadata validator accepts (the catalog's and a few more).
LICENSES = {"apache-2.0", "mit", "llama3.1", "llama3.2", "llama3.3", "gemma", "cc-by-4.0", "openrail", "other"}
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Hub:
    token: str
    orgs: tuple[str, ...] = ()  # namespaces besides USER the token may write to
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes, once PUT (or rebuilt from Xet)
    xorbs: dict[str, list[bytes]] = field(default_factory=dict)  # xorb hash -> its chunks, decoded
    xet_token: str = "xet-standin-access"
    xet: bool = True  # False: a Hub without Xet storage (its token endpoint is not there)
    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # method, path, authorized
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    hub: Hub
    base: str

    def log_message(self, *args: Any) -> None:  # quiet: the test asserts on hub.requests instead
        pass

    # ------------------------------------------------------------------ plumbing

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()  # the empty line after the last chunk
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, payload: Any = None, error: str = "", code: str = "") -> None:
        if error:
            payload = {"error": error} | (payload or {})
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error:
            self.send_header("X-Error-Message", error)
        if code:
            self.send_header("X-Error-Code", code)
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        ok = self.headers.get("Authorization") == f"Bearer {self.hub.token}"
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, ok))
        return ok

    def writable(self, repo_id: str) -> bool:
        return repo_id.split("/")[0] in (USER, *self.hub.orgs)

    def do_POST(self) -> None:
        self.route("POST")

    def do_PUT(self) -> None:
        self.route("PUT")

    def do_GET(self) -> None:
        self.route("GET")

    def route(self, method: str) -> None:
        path = self.path.split("?")[0]
        data = self.body()
        if method == "PUT" and (m := re.fullmatch(r"/lfs-objects/([0-9a-f]{64})", path)):
            # The Hub's presigned storage URL: no Authorization header, the URL itself is the grant.
            with self.hub.lock:
                self.hub.requests.append((method, path, True))
            return self.lfs_put(m.group(1), data)
        if method == "GET" and path == "/api/agent-harnesses":
            # Public: huggingface_hub fetches this registry (for its user agent) without a token.
            with self.hub.lock:
                self.hub.requests.append((method, path, True))
            return self.reply(200, {"standardEnvVars": [], "harnesses": {}})
        if path.startswith(("/v1/", "/v2/")):  # the Xet CAS service (casUrl is this server too)
            return self.cas(method, path, data)
        if not self.authorized():
            return self.reply(401, error="Invalid credentials in Authorization header")
        xet = re.fullmatch(r"/api/models/([^/]+/[^/]+)/xet-write-token/[^/]+", path)
        if method == "GET" and xet and self.hub.xet:
            if self.repo(xet.group(1)) is not None:
                grant = {"accessToken": self.hub.xet_token, "exp": int(time.time()) + 3600, "casUrl": self.base}
                self.reply(200, grant)
            return
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify", self.lfs_verify),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
        ]
        for verb, pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                try:
                    payload = json.loads(data) if handler != self.commit else data
                except ValueError:
                    return self.reply(400, error="body is not JSON")
                return handler(payload, **m.groupdict())
        self.reply(404, error=f"no route {method} {path}")

    def repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or not self.writable(repo_id):
            self.reply(404, error="Repository not found", code="RepoNotFound")
            return None
        return repo

    # ------------------------------------------------------------------ endpoints

    def create_repo(self, body: dict[str, Any]) -> None:
        if body.get("type", "model") != "model":
            return self.reply(400, error="this stand-in holds model repos only")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        if not REPO_ID.fullmatch(repo_id):
            return self.reply(400, error=f"invalid repo name {repo_id}")
        if not self.writable(repo_id):
            return self.reply(403, error=f"You don't have the rights to create a model under the namespace {repo_id}")
        url = f"{self.base}/{repo_id}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                return self.reply(409, {"url": url}, error="You already created this model repo")
            self.hub.repos[repo_id] = Repo(private=body.get("visibility") == "private")
            self.hub.repos[repo_id].files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        self.reply(200, {"url": url, "name": repo_id})

    def validate_yaml(self, body: dict[str, Any]) -> None:
        errors = [{"message": m} for m in metadata_errors(body.get("content", ""))]
        self.reply(400 if errors else 200, {"errors": errors, "warnings": []})

    def preupload(self, body: dict[str, Any], repo: str, rev: str) -> None:
        if self.repo(repo) is None:
            return
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["size"] > LFS_MIN_SIZE or f["path"].endswith(LFS_SUFFIXES) else "regular",
                "shouldIgnore": False,
            }
            for f in body["files"]
        ]
        self.reply(200, {"files": files, "commitOid": "0" * 40})

    def lfs_batch(self, body: dict[str, Any], repo: str) -> None:
        if self.repo(repo) is None:
            return
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs:  # already stored: no actions, the client skips the upload
                verify = {"href": f"{self.base}/{repo}.git/info/lfs/objects/verify"}
                entry["actions"] = {"upload": {"href": f"{self.base}/lfs-objects/{oid}"}, "verify": verify}
            objects.append(entry)
        self.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            return self.reply(400, error="content does not match its sha256")
        with self.hub.lock:
            self.hub.lfs[oid] = data
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def lfs_verify(self, body: dict[str, Any], repo: str) -> None:
        stored = self.hub.lfs.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            return self.reply(404, error="object not found or of another size")
        self.reply(200, {"success": True})

    def commit(self, data: bytes, repo: str, rev: str) -> None:
        target = self.repo(repo)
        if target is None:
            return
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self.reply(400, error="the commit must start with its header")
        changes: dict[str, bytes] = {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                stored = self.hub.lfs.get(value["oid"])
                if stored is None or len(stored) != value.get("size", len(stored)):
                    return self.reply(422, error=f"LFS object of {value['path']} was never uploaded")
                changes[value["path"]] = stored
            else:
                return self.reply(400, error=f"this stand-in does not do {line['key']}")
        oid = hashlib.sha1(repr(sorted(changes.items())).encode()).hexdigest()
        with self.hub.lock:
            target.files.update(changes)
            target.commits.append({"summary": lines[0]["value"]["summary"], "paths": sorted(changes), "oid": oid})
        self.reply(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.base}/{repo}/commit/{oid}"})

    # ------------------------------------------------------------------ Xet CAS

    def cas(self, method: str, path: str, data: bytes) -> None:
        ok = self.headers.get("Authorization") == f"Bearer {self.hub.xet_token}"
        with self.hub.lock:
            self.hub.requests.append((method, path, ok))
        if not ok:
            return self.reply(401, error="invalid Xet token")
        if method == "POST" and (m := re.fullmatch(r"/v1/xorbs/default/([0-9a-f]{64})", path)):
            try:
                chunks = xorb_chunks(data)
            except (ValueError, IndexError) as err:
                return self.reply(400, error=f"malformed xorb: {err}")
            with self.hub.lock:
                inserted = m.group(1) not in self.hub.xorbs
                self.hub.xorbs[m.group(1)] = chunks
            return self.reply(200, {"was_inserted": inserted})
        if method == "POST" and path == "/v1/shards":
            try:
                files = shard_files(data)
                with self.hub.lock:
                    for sha256, terms in files:
                        rebuilt = b"".join(term(self.hub.xorbs, *t) for t in terms)
                        if hashlib.sha256(rebuilt).hexdigest() != sha256:
                            raise ValueError("a file rebuilt from its terms does not match its sha256")
                        self.hub.lfs[sha256] = rebuilt
            except (ValueError, IndexError, KeyError) as err:
                return self.reply(400, error=f"shard refused: {err}")
            return self.reply(200, {"result": 1})
        if method == "POST" and path == "/v1/telemetry":
            return self.reply(200, {})
        self.reply(404, error=f"no CAS route {method} {path}")  # /v2/shards, /v1/xorb-grants, dedupe


def hash_key(raw: bytes) -> str:
    """A Xet hash as the API writes it: each 8-byte part as a little-endian u64, in hex."""
    return "".join(f"{int.from_bytes(raw[i : i + 8], 'little'):016x}" for i in range(0, 32, 8))


def term(xorbs: dict[str, list[bytes]], xorb: str, start: int, end: int, size: int) -> bytes:
    data = b"".join(xorbs[xorb][start:end])
    if len(data) != size:
        raise ValueError(f"term of xorb {xorb} is {len(data)} bytes, the shard says {size}")
    return data


def shard_files(data: bytes) -> list[tuple[str, list[tuple[str, int, int, int]]]]:
    """The File Info section of a shard: (sha256, [(xorb, first chunk, end chunk, bytes)]) per file."""
    if int.from_bytes(data[32:40], "little") != 2:
        raise ValueError("shard header version is not 2")
    files, at = [], 48
    while data[at : at + 32] != b"\xff" * 32:  # the bookend ends the section
        flags, count = struct.unpack_from("<II", data, at + 32)
        at += 48
        terms = []
        for _ in range(count):
            _, size, start, end = struct.unpack_from("<IIII", data, at + 32)
            terms.append((hash_key(data[at : at + 32]), start, end, size))
            at += 48
        if flags & 1 << 31:  # verification entries: one per term
            at += 48 * count
        if not flags & 1 << 30:
            raise ValueError("a file without its sha256 (metadata extension): the Hub needs it for git")
        files.append((hash_key(data[at : at + 32]), terms))  # the sha256, written as Xet writes hashes
        at += 48
    return files


def xorb_chunks(data: bytes) -> list[bytes]:
    """The chunks of a serialized xorb, decompressed. The client may send it with its footer (its
    length is the last 4 bytes) or without: the chunks run to the footer or to the end."""
    info = int.from_bytes(data[-4:], "little")
    footer = len(data) - 4 - info if 0 < info < len(data) - 4 else -1
    chunks, at = [], 0
    while at not in (len(data), footer):
        version, packed, scheme, size = data[at], data[at + 1 : at + 4], data[at + 4], data[at + 5 : at + 8]
        if version != 0:
            raise ValueError(f"chunk header version {version}")
        packed_len, size_len = int.from_bytes(packed, "little"), int.from_bytes(size, "little")
        body = data[at + 8 : at + 8 + packed_len]
        at += 8 + packed_len
        if scheme == 0:
            chunk = body
        elif scheme in (1, 2):
            chunk = lz4_decompress(body)
            if scheme == 2:  # byte grouping: 4 groups of every 4th byte, to be interleaved again
                grouped, chunk, pos = chunk, bytearray(len(chunk)), 0
                for g in range(4):
                    n = len(grouped) // 4 + (g < len(grouped) % 4)
                    chunk[g::4] = grouped[pos : pos + n]
                    pos += n
        else:
            raise ValueError(f"unknown compression scheme {scheme}")
        if len(chunk) != size_len:
            raise ValueError("chunk size differs from its header")
        chunks.append(bytes(chunk))
    return chunks


def lz4_decompress(data: bytes) -> bytes:
    """LZ4: a frame (magic 04 22 4D 18) of blocks, or a bare block."""
    out = bytearray()
    if data[:4] != b"\x04\x22\x4d\x18":
        lz4_block(data, out)
        return bytes(out)
    flags = data[4]
    at = 6 + (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0) + 1  # FLG BD [size] [dict] HC
    while True:
        size = int.from_bytes(data[at : at + 4], "little")
        at += 4
        if size == 0:
            return bytes(out)
        block = data[at : at + (size & 0x7FFFFFFF)]
        at += (size & 0x7FFFFFFF) + (4 if flags & 0x10 else 0)
        if size & 0x80000000:
            out += block  # stored uncompressed
        else:
            lz4_block(block, out)  # may refer back into earlier blocks: one output buffer


def lz4_block(src: bytes, out: bytearray) -> None:
    """One LZ4 block, appended to out: literals, then (offset, length) copies of earlier output."""
    at = 0
    while at < len(src):
        token = src[at]
        at += 1
        length = token >> 4
        if length == 15:
            while src[at] == 255:
                length, at = length + 255, at + 1
            length, at = length + src[at], at + 1
        out += src[at : at + length]
        at += length
        if at >= len(src):
            return  # the last sequence has literals only
        offset = src[at] | src[at + 1] << 8
        at += 2
        length = token & 15
        if length == 15:
            while src[at] == 255:
                length, at = length + 255, at + 1
            length, at = length + src[at], at + 1
        length += 4
        start = len(out) - offset
        if offset >= length:
            out += out[start : start + length]
        else:  # overlapping: a run that repeats what it copies
            for i in range(length):
                out.append(out[start + i])


def metadata_errors(readme: str) -> list[str]:
    """What the Hub's validator says of a model card's YAML metadata: the parts it checks that the
    card writes (license, base_model, library_name, tags, datasets, model-index)."""
    m = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    if not m:
        return []  # no metadata: the Hub warns, it does not refuse
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as err:
        return [f"invalid YAML: {err}"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    if "license" in data and data["license"] not in LICENSES:
        errors.append(f'"license" must be one of the Hub\'s license identifiers, not {data["license"]!r}')
    bases = data.get("base_model", [])
    for base in bases if isinstance(bases, list) else [bases]:
        if not (isinstance(base, str) and REPO_ID.fullmatch(base)):
            errors.append(f'"base_model" must be a model id, not {base!r}')
    for key in ("library_name", "pipeline_tag", "base_model_relation"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets"):
        if key in data and not (isinstance(data[key], list) and all(isinstance(t, str) for t in data[key])):
            errors.append(f'"{key}" must be a list of strings')
    for entry in data.get("model-index", []):
        for result in entry.get("results", []):
            if "type" not in result.get("task", {}) or "type" not in result.get("dataset", {}):
                errors.append('"model-index" results need task.type and dataset.type')
            for metric in result.get("metrics", []):
                if "type" not in metric or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append('"model-index" metrics need a type and a value')
    return errors


class HubStandIn:
    """The stand-in, serving on 127.0.0.1 in a thread: `with HubStandIn(token) as standin:`, then
    HF_ENDPOINT=standin.url; what arrived is in standin.hub."""

    def __init__(self, token: str, orgs: tuple[str, ...] = (), xet: bool = True) -> None:
        self.hub = Hub(token=token, orgs=orgs, xet=xet)
        handler = type("BoundHandler", (Handler,), {"hub": self.hub})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        handler.base = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
