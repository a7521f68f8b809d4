"""The Syn-GRPO data server (paper §3.3.1, "decoupled design ... via Python's HTTPServer") and its client.

    python server.py --device cuda:1 --port 8000 [--pipeline tiny|sdxl|DIR] [--workers N] [--state-dir D]

A dumb HTTP boundary around a bounded job queue: handlers only validate, persist and enqueue; worker threads,
each with its own outpainting pipeline (outpaint.py), turn jobs into results. The trainer submits and later
collects; it never waits for generation (unless `train.py --sync`, which exists for the paper's Table 5).

API (JSON bodies; `Authorization: Bearer TOKEN` on every request when --token is set):
  POST /jobs      {"sample_id": str, "image_b64": PNG/JPEG base64 | "image": path under --image-root,
                   "boxes": [[x1,y1,x2,y2], ...], "description": str, "seed": int,
                   optional "zoom_out": float in [1, 4], optional "key": idempotency key}
                  -> 202 {"job_id"}   (200 with the existing id when "key" was seen before)
  GET /jobs/ID    -> {"job_id", "status": queued|done|failed, ...result fields when finished}
  GET /results?after=SEQ&limit=N
                  -> {"results": [{"seq", "job_id", "sample_id", "status", "boxes", "image_b64" | "error"}],
                      "next": SEQ}   (finished jobs in completion order; pass "next" back as "after")
  GET /health     -> {"ok", "queued", "done", "failed", "workers"}
Errors: 400 malformed (with a message), 401 bad or missing token, 403 image path outside --image-root,
404 unknown job or route, 405 wrong method, 413 body or image over the limits, 429 queue full.

Nothing accepted is lost: a job is written to --state-dir (atomically) before its 202, and its result is written
(atomically) before it is reported; after a crash the restarted server re-queues every accepted job that has no
result, so each accepted job ends in exactly one result.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import http.client
import io
import json
import math
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"          # loopback unless told otherwise
    port: int = 8000                 # 0 = any free port (written to --port-file)
    port_file: str = ""
    pipeline: str = "tiny"           # tiny | sdxl | a saved pipeline dir
    segmenter: str = ""              # "" (box mask alone) | ben2 (GPU) | color (flat synthetic backgrounds)
    device: str = "cpu"
    workers: int = 1
    state_dir: str = "runs/server"
    image_root: str = ""             # image paths are accepted only under this folder ("" = no paths, base64 only)
    token: str = ""                  # require "Authorization: Bearer TOKEN"
    queue_size: int = 256            # accepted-but-unfinished jobs; beyond it POST /jobs answers 429
    max_body_bytes: int = 16 << 20   # 16 MiB
    max_image_pixels: int = 4096 * 4096
    max_boxes: int = 1000
    steps: int = 8                   # denoising steps
    request_timeout: float = 10.0    # seconds a client may take to send its request
    parent_pid: int = 0              # exit when this process dies (train.py's own local server)


FIELD_HELP = {
    "host": "address to bind; loopback by default, give 0.0.0.0 only on a trusted network with --token",
    "port": "0 = any free port", "port_file": "write the bound port here", "pipeline": "tiny | sdxl | a pipeline dir",
    "segmenter": "'' | ben2 | color", "workers": "generation threads, one pipeline each",
    "state_dir": "accepted jobs and results, written atomically; reused after a restart",
    "image_root": "image paths are accepted only under this folder ('' = base64 images only)",
    "token": "require 'Authorization: Bearer TOKEN' (compared in constant time)",
    "queue_size": "unfinished jobs accepted at most; beyond, POST /jobs answers 429",
    "max_body_bytes": "request body limit (413 above)", "max_image_pixels": "image size limit, checked before decoding (413)",
    "max_boxes": "boxes per job", "steps": "denoising steps", "request_timeout": "seconds a client may stall",
    "parent_pid": "exit when this process dies"}


class BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Validation (pure)


def decode_image(b64: str, max_pixels: int) -> Image.Image:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "image_b64 is not valid base64")
    return _open_image(io.BytesIO(raw), max_pixels)


def _open_image(fp, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(fp)
        if im.width * im.height > max_pixels:       # checked before decoding: no decompression bombs
            raise BadRequest(413, f"image has {im.width}x{im.height} pixels, over the limit of {max_pixels}")
        im.load()
        return im.convert("RGB")
    except BadRequest:
        raise
    except Exception as e:   # PIL raises many types for bad bytes
        raise BadRequest(400, f"not a readable image: {type(e).__name__}")


def validate_job(body: dict, cfg: ServerConfig) -> tuple[dict, Image.Image]:
    """Check a POST /jobs body; returns the job record to persist and its decoded image."""
    if not isinstance(body, dict):
        raise BadRequest(400, "body must be a JSON object")
    sid, desc, seed = body.get("sample_id"), body.get("description"), body.get("seed", 0)
    if not isinstance(sid, str) or not 0 < len(sid) <= 256:
        raise BadRequest(400, "sample_id must be a non-empty string of at most 256 characters")
    if not isinstance(desc, str) or not 0 < len(desc) <= 4000:
        raise BadRequest(400, "description must be a non-empty string of at most 4000 characters")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise BadRequest(400, "seed must be a non-negative integer")
    zoom = body.get("zoom_out", 1.0)
    if not isinstance(zoom, (int, float)) or isinstance(zoom, bool) or not 1.0 <= zoom <= 4.0:
        raise BadRequest(400, "zoom_out must be a number in [1, 4]")
    boxes = body.get("boxes")
    if not isinstance(boxes, list) or len(boxes) > cfg.max_boxes:
        raise BadRequest(400, f"boxes must be a list of at most {cfg.max_boxes} [x1, y1, x2, y2] boxes")
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and math.isfinite(v) for v in b) and b[2] > b[0] and b[3] > b[1]):
            raise BadRequest(400, f"bad box {str(b)[:80]}: expected [x1, y1, x2, y2] with x2 > x1, y2 > y1")
    if isinstance(body.get("image_b64"), str):
        image = decode_image(body["image_b64"], cfg.max_image_pixels)
    elif isinstance(body.get("image"), str):
        if not cfg.image_root:
            raise BadRequest(403, "image paths are not accepted by this server (no --image-root); send image_b64")
        root = os.path.realpath(cfg.image_root)
        path = os.path.realpath(os.path.join(root, body["image"]))
        if os.path.commonpath([root, path]) != root:
            raise BadRequest(403, "image path is outside the image root")
        if not os.path.isfile(path):
            raise BadRequest(400, "image file not found")
        with open(path, "rb") as f:
            image = _open_image(f, cfg.max_image_pixels)
    else:
        raise BadRequest(400, "one of image_b64 (base64 string) or image (path string) is required")
    key = body.get("key")
    if key is not None and (not isinstance(key, str) or len(key) > 256):
        raise BadRequest(400, "key must be a string of at most 256 characters")
    job = {"sample_id": sid, "description": desc, "seed": seed, "zoom_out": float(zoom),
           "boxes": [[float(v) for v in b] for b in boxes], "key": key}
    return job, image


# ----------------------------------------------------------------------------------------------------
# Persistent job store


class JobStore:
    """jobs/ID.json + jobs/ID.png on acceptance; results/ID.json (+ images/ID.png) on completion."""

    def __init__(self, state_dir: str):
        self.dirs = {k: os.path.join(state_dir, k) for k in ("jobs", "results", "images")}
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)
        self.lock = threading.Lock()
        self.results: list[dict] = []          # finished, in seq order (without image bytes)
        self.by_id: dict[str, dict] = {}
        self.keys: dict[str, str] = {}
        for name in os.listdir(self.dirs["results"]):
            if name.endswith(".json"):
                with open(os.path.join(self.dirs["results"], name)) as f:
                    r = json.load(f)
                self.by_id[r["job_id"]] = r
        self.results = sorted(self.by_id.values(), key=lambda r: r["seq"])
        self.seq = self.results[-1]["seq"] if self.results else 0
        self.pending: list[str] = []
        for name in sorted(os.listdir(self.dirs["jobs"])):
            if name.endswith(".json"):
                with open(os.path.join(self.dirs["jobs"], name)) as f:
                    job = json.load(f)
                if job.get("key"):
                    self.keys[job["key"]] = job["job_id"]
                if job["job_id"] not in self.by_id:
                    self.pending.append(job["job_id"])

    def accept(self, job: dict, image: Image.Image, limit: int) -> tuple[str, bool]:
        """Persist a job; returns (job_id, is_new). Raises BadRequest(429) when `limit` jobs are unfinished."""
        with self.lock:
            if job.get("key") and job["key"] in self.keys:
                return self.keys[job["key"]], False
            if len(self.pending) >= limit:
                raise BadRequest(429, "queue full, retry later")
            job_id = uuid.uuid4().hex
            job = dict(job, job_id=job_id, accepted=time.time())
            image.save(os.path.join(self.dirs["jobs"], job_id + ".png"))
            _write_json(os.path.join(self.dirs["jobs"], job_id + ".json"), job)   # the commit point
            if job.get("key"):
                self.keys[job["key"]] = job_id
            self.pending.append(job_id)
            return job_id, True

    def load_job(self, job_id: str) -> tuple[dict, Image.Image]:
        with open(os.path.join(self.dirs["jobs"], job_id + ".json")) as f:
            job = json.load(f)
        return job, Image.open(os.path.join(self.dirs["jobs"], job_id + ".png")).convert("RGB")

    def finish(self, job: dict, image: Image.Image | None, boxes=None, error: str = "") -> None:
        with self.lock:
            if job["job_id"] in self.by_id:
                return
            if image is not None:
                image.save(os.path.join(self.dirs["images"], job["job_id"] + ".png"))
            self.seq += 1
            r = {"seq": self.seq, "job_id": job["job_id"], "sample_id": job["sample_id"],
                 "status": "failed" if error else "done", "boxes": boxes if boxes is not None else job["boxes"],
                 "description": job["description"], "error": error, "finished": time.time()}
            _write_json(os.path.join(self.dirs["results"], job["job_id"] + ".json"), r)
            self.by_id[r["job_id"]] = r
            self.results.append(r)
            self.pending.remove(job["job_id"])

    def with_image(self, r: dict) -> dict:
        r = dict(r)
        path = os.path.join(self.dirs["images"], r["job_id"] + ".png")
        if r["status"] == "done" and os.path.exists(path):
            with open(path, "rb") as f:
                r["image_b64"] = base64.b64encode(f.read()).decode()
        return r


# ----------------------------------------------------------------------------------------------------
# Workers and HTTP


def worker_loop(store: JobStore, jobs: queue.Queue, cfg: ServerConfig, stop: threading.Event) -> None:
    from outpaint import load_pipeline, load_segmenter, outpaint
    pipe = load_pipeline(cfg.pipeline, cfg.device)
    segmenter = load_segmenter(cfg.segmenter, cfg.device)
    while not stop.is_set():
        try:
            job_id = jobs.get(timeout=0.2)
        except queue.Empty:
            continue
        job = {"job_id": job_id, "sample_id": "?", "boxes": [], "description": ""}
        try:
            job, image = store.load_job(job_id)
            new, boxes = outpaint(pipe, image, job["boxes"], job["description"], seed=job["seed"] % 2 ** 32,
                                  steps=cfg.steps, zoom_out=job["zoom_out"], segmenter=segmenter)
            store.finish(job, new, boxes)
        except Exception as e:   # a failed job is reported, never lost, and never kills the worker
            try:
                store.finish(job, None, error=f"{type(e).__name__}: {e}"[:500])
            except Exception as e2:   # not even reportable (e.g. an unreadable job file): keep serving the rest
                print(f"worker: job {job_id} could not be reported: {e2}", file=sys.stderr, flush=True)


def make_handler(store: JobStore, jobs: queue.Queue, cfg: ServerConfig):
    class Handler(BaseHTTPRequestHandler):
        timeout = cfg.request_timeout          # slow or stalled clients are dropped
        protocol_version = "HTTP/1.1"
        default_request_version = "HTTP/1.0"   # so that a garbled request line still gets a status line (400)

        def log_message(self, *args):          # quiet: the trainer has its own logs
            pass

        def _send(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if not cfg.token:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {cfg.token}".encode())   # constant time

        def _dispatch(self, method: str) -> None:
            try:
                if not self._authorized():
                    raise BadRequest(401, "missing or wrong bearer token")
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/jobs" and method == "POST":
                    return self._post_job()
                if method != "GET":
                    raise BadRequest(405 if url.path in ("/jobs", "/results", "/health") or url.path.startswith("/jobs/")
                                     else 404, f"{method} {url.path} is not supported")
                if url.path == "/health":
                    with store.lock:
                        failed = sum(r["status"] == "failed" for r in store.results)
                        return self._send(200, {"ok": True, "queued": len(store.pending), "done": len(store.results) - failed,
                                                "failed": failed, "workers": cfg.workers})
                if url.path == "/results":
                    q = urllib.parse.parse_qs(url.query)
                    try:
                        after = int(q.get("after", ["0"])[0])
                        limit = max(1, min(256, int(q.get("limit", ["64"])[0])))
                    except ValueError:
                        raise BadRequest(400, "after and limit must be integers")
                    with store.lock:
                        out = [r for r in store.results if r["seq"] > after][:limit]
                    return self._send(200, {"results": [store.with_image(r) for r in out],
                                            "next": out[-1]["seq"] if out else after})
                if url.path.startswith("/jobs/"):
                    job_id = url.path[len("/jobs/"):]
                    with store.lock:
                        r = store.by_id.get(job_id)
                        queued = job_id in store.pending
                    if r:
                        return self._send(200, store.with_image(r))
                    if queued:
                        return self._send(200, {"job_id": job_id, "status": "queued"})
                    raise BadRequest(404, "unknown job")
                raise BadRequest(404, f"no route {url.path}")
            except BadRequest as e:
                self.close_connection = True
                self._send(e.code, {"error": e.message})
            except (ConnectionError, TimeoutError):
                self.close_connection = True
            except Exception as e:   # never let one request take the server down
                self.close_connection = True
                try:
                    self._send(500, {"error": f"internal error: {type(e).__name__}"})
                except OSError:
                    pass

        def _post_job(self) -> None:
            try:
                n = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise BadRequest(400 if "Content-Length" in self.headers else 411, "Content-Length required")
            if n < 0 or n > cfg.max_body_bytes:
                raise BadRequest(413, f"body over the limit of {cfg.max_body_bytes} bytes")
            if len(store.pending) >= cfg.queue_size:     # cheap refusal first: no body parsing under overload
                raise BadRequest(429, "queue full, retry later")
            raw = self.rfile.read(n)
            if len(raw) < n:
                raise BadRequest(400, "body shorter than Content-Length")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise BadRequest(400, "body is not valid JSON")
            job, image = validate_job(body, cfg)
            job_id, new = store.accept(job, image, cfg.queue_size)
            if new:
                jobs.put(job_id)
            self._send(202 if new else 200, {"job_id": job_id})

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_DELETE(self):
            self._dispatch("DELETE")

        def do_PATCH(self):
            self._dispatch("PATCH")

    return Handler


class DataServer(ThreadingHTTPServer):
    request_queue_size = 128    # listen backlog: socketserver's default of 5 refuses bursts of clients
    daemon_threads = True


def serve(cfg: ServerConfig) -> None:
    store = JobStore(cfg.state_dir)
    jobs: queue.Queue = queue.Queue()
    for job_id in store.pending:        # recovered after a crash: finish what was accepted
        jobs.put(job_id)
    stop = threading.Event()
    threads = [threading.Thread(target=worker_loop, args=(store, jobs, cfg, stop), daemon=True) for _ in range(cfg.workers)]
    for t in threads:
        t.start()
    httpd = DataServer((cfg.host, cfg.port), make_handler(store, jobs, cfg))
    port = httpd.server_address[1]
    if cfg.port_file:
        with open(cfg.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(cfg.port_file + ".tmp", cfg.port_file)
    print(f"data server on http://{cfg.host}:{port} ({len(store.pending)} recovered jobs, state {cfg.state_dir})", flush=True)
    if cfg.parent_pid:
        threading.Thread(target=_exit_with_parent, args=(cfg.parent_pid, httpd), daemon=True).start()
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        stop.set()


def _exit_with_parent(pid: int, httpd) -> None:
    """A server started by train.py must not outlive it (even after kill -9); its state dir keeps the jobs."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            httpd.shutdown()
            return


# ----------------------------------------------------------------------------------------------------
# Client (used by train.py): spreads jobs over servers, skips dead ones and retries them with backoff

# What an unreachable, dying or misbehaving server can raise: a refused or reset connection (OSError), a reply cut
# off by a kill between headers and body (http.client.IncompleteRead, not an OSError), or a reply that is not our
# JSON schema. Any of these marks the server down for a while; none may stop a training run.
SERVER_ERRORS = (OSError, ValueError, KeyError, TypeError, http.client.HTTPException)


class DataServerClient:
    def __init__(self, urls: list[str], token: str = "", timeout: float = 5.0, log=print):
        self.urls, self.token, self.timeout, self.log = [u.rstrip("/") for u in urls], token, timeout, log
        self.cursor = {u: 0 for u in self.urls}
        self.down_until = {u: 0.0 for u in self.urls}
        self.backoff = {u: 1.0 for u in self.urls}
        self.pending: dict[str, str] = {}       # job id -> url
        self.turn = 0
        self.failed = 0

    def _request(self, url: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url + path, data=data, method="POST" if body is not None else "GET",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read())

    def _alive(self) -> list[str]:
        now = time.time()
        return [u for u in self.urls if self.down_until[u] <= now]

    def _mark_down(self, url: str, err) -> None:
        self.down_until[url] = time.time() + self.backoff[url]
        self.log(f"data server {url} unreachable ({err}); retry in {self.backoff[url]:.0f} s")
        self.backoff[url] = min(60.0, self.backoff[url] * 2)

    def submit(self, job: dict) -> str | None:
        """Post a job to the next live server; None when none accepts it now (training goes on without it)."""
        alive = self._alive()
        for k in range(len(alive)):
            url = alive[(self.turn + k) % len(alive)]
            try:
                job_id = self._request(url, "/jobs", job)["job_id"]
            except urllib.error.HTTPError as e:
                if e.code == 429:
                    continue
                try:
                    detail = e.read()[:200]
                except SERVER_ERRORS as e2:     # the error body itself was cut off
                    detail = repr(e2)
                self.log(f"data server {url} rejected a job: {e.code} {detail!r}")
                return None
            except SERVER_ERRORS as e:
                self._mark_down(url, e)
                continue
            self.backoff[url] = 1.0
            self.turn += 1
            self.pending[job_id] = url
            return job_id
        return None

    def collect(self) -> list[dict]:
        """Every result finished since the last call, from every live server."""
        out = []
        for url in self._alive():
            try:
                while True:
                    r = self._request(url, f"/results?after={self.cursor[url]}&limit=64")
                    for res in r["results"]:
                        if self.pending.pop(res["job_id"], None) is not None:
                            out.append(res)
                            self.failed += res["status"] == "failed"
                    if r["next"] == self.cursor[url]:
                        break
                    self.cursor[url] = r["next"]
            except SERVER_ERRORS as e:
                self._mark_down(url, e)
        return out

    def waiting(self, job_ids) -> list[str]:
        """Those of job_ids still pending on a server that is up (a dead server's jobs are not waited for)."""
        alive = set(self._alive())
        return [j for j in job_ids if j in self.pending and self.pending[j] in alive]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "pending": self.pending, "failed": self.failed}

    def load_state_dict(self, s: dict) -> None:
        self.cursor.update({u: c for u, c in s["cursor"].items() if u in self.cursor})
        self.pending, self.failed = dict(s["pending"]), s["failed"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in ServerConfig.__dataclass_fields__.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v.default), default=v.default,
                       help=f"{FIELD_HELP.get(k, '')} (default: {v.default!r})")
    serve(ServerConfig(**vars(p.parse_args(argv))))


if __name__ == "__main__":
    main()
