"""The Syn-GRPO data server (paper §3.3.1, "decoupled design ... via Python's HTTPServer").

    python server.py --device cuda:1 --port 8000 --pipeline sdxl-union --segmenter ben2   # train.py's GPU default
    python server.py [--pipeline tiny|procedural|sdxl|DIR] [--steps N] [--workers N] [--state-dir D]

A dumb HTTP boundary around a bounded job queue, top to bottom: `validate_job` (pure checks of a POST body),
`JobStore` (jobs and results on disk, behind its own lock), `worker_loop` (threads, each with its own outpainting
pipeline from outpaint.py, turning jobs into results), `API` (the endpoints as plain methods returning (status,
body)), `ROUTES` (the one route table; 404 vs 405 follows from it), `Handler` (HTTP in and out). The trainer's side
(the wire format and `DataServerClient`) is synthesis.py's. The trainer submits and later collects; it never waits
for generation (unless `train.py --synchronous-synthesis`, the paper's Table 5 baseline).

API (JSON bodies; `Authorization: Bearer TOKEN` on every request when --token is set):
  POST /jobs      {"sample_id": str, "image_b64": PNG/JPEG base64 | "image": path under --image-root,
                   "boxes": [[x1,y1,x2,y2], ...], "description": str, "seed": int,
                   optional "zoom_out": float in [1, 4], optional "key": idempotency key,
                   optional "categories": [str, ...] (the labelled classes, checked by --verify-synthesis)}
                  -> 202 {"job_id"}   (200 with the existing id when "key" was seen before)
  GET /jobs/ID    -> {"job_id", "status": queued|done|failed|dropped, ...result fields when finished}
  GET /results?after=SEQ&limit=N
                  -> {"results": [{"seq", "job_id", "sample_id", "status", "boxes", "image_b64" | "error"}],
                      "next": SEQ}   (finished jobs in completion order; pass "next" back as "after"; "dropped":
                      the verifier found a new instance of a labelled class, "error" says which)
  GET /health     -> {"ok", "queued", "done", "failed", "dropped", "workers"}   (ok: a worker is alive)
Errors: 400 malformed (with a message; a box outside its image too), 401 bad or missing token, 403 image path
outside --image-root, 404 unknown job or route, 405 wrong method, 413 body or image over the limits, 429 queue full.
Settings under which no job could be served (a busy port, a missing --image-root, a device not there, limits
below 1) stop the start with one line.

Nothing accepted is lost: a job is written to --state-dir (atomically) before its 202, and its result is written
(atomically) before it is reported; after a crash the restarted server re-queues every accepted job that has no
result, so each accepted job ends in exactly one result.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import os
import queue
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from common import atomic_write, device_exists, opt, output_problem, parse_config, stop_at_first
from data import box_problem, is_box
from outpaint import BEN2_INSTALL, SEGMENTERS, default_steps, load_pipeline, load_segmenter, outpaint
from verify import VERIFIERS, VERIFY_THRESHOLD, load_verifier


@dataclass
class ServerConfig:
    host: str = opt("127.0.0.1", "address to bind; loopback by default, give 0.0.0.0 only on a trusted network with "
                                 "--token")
    port: int = opt(8000, "port to listen on; 0 = any free port (written to --port-file)")
    port_file: str = opt("", "write the bound port to this file (atomically) once listening")
    pipeline: str = opt("tiny", "outpainting pipeline: tiny / tiny-union (random weights, built offline: the canny / "
                                "union pipeline's code), procedural (a background drawn from the description's words, "
                                "no weights), sdxl-union (SDXL + ControlNet-Union in inpaint mode, train.py's GPU "
                                "default), sdxl (SDXL + the canny ControlNet), both from the Hub (GPU), or a saved "
                                "pipeline dir")
    segmenter: str = opt("", "foreground matte refining the keep-mask inside the boxes: '' (box mask alone), ben2 "
                             "(the paper's BEN2, GPU), sam (SAM prompted with the boxes, from transformers), tiny-sam "
                             "(its random-weight twin), palette (the shapes data's object colours) or color (flat "
                             "backgrounds)", choices=SEGMENTERS)
    verify_synthesis: str = opt("", "drop an image whose new background holds a confident detection of a labelled "
                                    "category (a job's \"categories\") outside the kept boxes (ours, beyond the "
                                    "paper): '' (off), owlv2 (OWLv2 from transformers), tiny-owlv2 (its random-weight "
                                    "twin)", choices=VERIFIERS)
    verify_threshold: float = opt(VERIFY_THRESHOLD, "the verifier's detection score that counts (sigmoid, 0-1)")
    device: str = opt("cpu", "device of the pipelines, e.g. cuda:1")
    workers: int = opt(1, "generation threads, one pipeline each")
    state_dir: str = opt("runs/server", "accepted jobs and results, written atomically; reused after a restart")
    image_root: str = opt("", "image paths are accepted only under this folder ('' = no paths, base64 images only)")
    token: str = opt("", "require 'Authorization: Bearer TOKEN' on every request (compared in constant time)")
    queue_size: int = opt(256, "accepted-but-unfinished jobs at most; beyond, POST /jobs answers 429")
    max_body_bytes: int = opt(16 << 20, "request body limit in bytes (413 above)")
    max_image_pixels: int = opt(4096 * 4096, "image size limit in pixels, checked before decoding (413 above)")
    max_boxes: int = opt(1000, "boxes per job at most")
    steps: int | None = opt(None, "denoising steps of the pipeline (default: 20 for sdxl, sdxl-union or a pipeline "
                                  "dir, diffusers' example for the canny ControlNet; 2 for the random-weight tiny ones; "
                                  "1 for procedural: outpaint.default_steps, as train.py)")
    work_size: int = opt(0, "side in pixels the pipeline runs at (multiple of 8); the result is resized to the "
                            "source's size; 0 = the source's size")
    threads: int = opt(0, "torch threads of the workers (0 = torch's default); 1 leaves the other cores to a trainer "
                          "on the same CPU")
    request_timeout: float = opt(10.0, "seconds a client may take to send its request")
    parent_pid: int = opt(0, "exit when this process dies (train.py's own local server); 0 = never")


class BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _write_json(path: str, obj) -> None:
    with atomic_write(path, fsync=True) as f:   # durable before the reply that reports it
        json.dump(obj, f)


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
    except Image.DecompressionBombError as e:   # PIL's own limit, caught before ours on some headers: the same 413
        raise BadRequest(413, f"image over the pixel limit ({e})")
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
        if not is_box(b):
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
    for b in boxes:
        if box_problem(b, image.size):
            raise BadRequest(400, f"bad box: {box_problem(b, image.size)}")
    key = body.get("key")
    if key is not None and (not isinstance(key, str) or len(key) > 256):
        raise BadRequest(400, "key must be a string of at most 256 characters")
    categories = body.get("categories", [])
    if not (isinstance(categories, list) and len(categories) <= cfg.max_boxes
            and all(isinstance(c, str) and 0 < len(c) <= 200 for c in categories)):
        raise BadRequest(400, f"categories must be a list of at most {cfg.max_boxes} non-empty strings of at most "
                              "200 characters")
    job = {"sample_id": sid, "description": desc, "seed": seed, "zoom_out": float(zoom),
           "boxes": [[float(v) for v in b] for b in boxes], "key": key, "categories": categories}
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

    def finish(self, job: dict, image: Image.Image | None, boxes=None, error: str = "", status: str = "") -> None:
        """The job's one result: done (an image), failed (an error) or dropped (the verifier's reason in error)."""
        with self.lock:
            if job["job_id"] in self.by_id:
                return
            if image is not None:
                image.save(os.path.join(self.dirs["images"], job["job_id"] + ".png"))
            self.seq += 1
            r = {"seq": self.seq, "job_id": job["job_id"], "sample_id": job["sample_id"],
                 "status": status or ("failed" if error else "done"), "boxes": boxes if boxes is not None else job["boxes"],
                 "description": job["description"], "error": error, "finished": time.time()}
            _write_json(os.path.join(self.dirs["results"], job["job_id"] + ".json"), r)
            self.by_id[r["job_id"]] = r
            self.results.append(r)
            self.pending.remove(job["job_id"])

    def n_pending(self) -> int:
        with self.lock:
            return len(self.pending)

    def counts(self) -> dict:
        with self.lock:
            n = {s: sum(r["status"] == s for r in self.results) for s in ("done", "failed", "dropped")}
            return {"queued": len(self.pending), **n}

    def results_after(self, after: int, limit: int) -> list[dict]:
        """Finished jobs with seq > after, in completion order, images included."""
        with self.lock:
            out = [r for r in self.results if r["seq"] > after][:limit]
        return [self.with_image(r) for r in out]

    def status(self, job_id: str) -> dict | None:
        """A job's result (image included) or {"status": "queued"}; None for an unknown id."""
        with self.lock:
            r = self.by_id.get(job_id)
            queued = job_id in self.pending
        if r:
            return self.with_image(r)
        return {"job_id": job_id, "status": "queued"} if queued else None

    def with_image(self, r: dict) -> dict:
        r = dict(r)
        path = os.path.join(self.dirs["images"], r["job_id"] + ".png")
        if r["status"] == "done" and os.path.exists(path):
            with open(path, "rb") as f:
                r["image_b64"] = base64.b64encode(f.read()).decode()
        return r


# ----------------------------------------------------------------------------------------------------
# Workers: each with its own pipeline, turning queued jobs into results


def load_worker_models(cfg: ServerConfig) -> list[tuple]:
    """(pipeline, segmenter, verifier) for each worker, loaded before the server listens: a missing checkpoint or
    package stops the start with one line, rather than leaving a server whose workers died."""
    try:
        return [(load_pipeline(cfg.pipeline, cfg.device), load_segmenter(cfg.segmenter, cfg.device),
                 load_verifier(cfg.verify_synthesis, cfg.device, cfg.verify_threshold)) for _ in range(cfg.workers)]
    except (ImportError, OSError, ValueError) as e:
        hint = f" (BEN2 is not on PyPI: {BEN2_INSTALL})" if isinstance(e, ImportError) and cfg.segmenter == "ben2" else ""
        raise SystemExit(f"server.py: cannot load --pipeline {cfg.pipeline} / --segmenter {cfg.segmenter!r} / "
                         f"--verify-synthesis {cfg.verify_synthesis!r}: {e}{hint}")


def worker_loop(store: JobStore, jobs: queue.Queue, cfg: ServerConfig, stop: threading.Event, pipe, segmenter,
                verifier=None) -> None:
    while not stop.is_set():
        try:
            job_id = jobs.get(timeout=0.2)
        except queue.Empty:
            continue
        job = {"job_id": job_id, "sample_id": "?", "boxes": [], "description": ""}
        try:
            job, image = store.load_job(job_id)
            new, boxes = outpaint(pipe, image, job["boxes"], job["description"], seed=job["seed"] % 2 ** 32,
                                  steps=cfg.steps, zoom_out=job["zoom_out"], segmenter=segmenter,
                                  work_size=cfg.work_size or None)
            dropped = verifier.check(new, boxes, job.get("categories", [])) if verifier else ""
            store.finish(job, None if dropped else new, boxes, error=dropped, status="dropped" if dropped else "")
        except Exception as e:   # a failed job is reported, never lost, and never kills the worker
            try:
                store.finish(job, None, error=f"{type(e).__name__}: {e}"[:500])
            except Exception as e2:   # not even reportable (e.g. an unreadable job file): keep serving the rest
                print(f"worker: job {job_id} could not be reported: {e2}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# The API: plain methods returning (status, body), one route table, and the HTTP handler around them


class API:
    """The data server's endpoints, free of HTTP: each method returns (status, JSON body) or raises BadRequest."""

    def __init__(self, store: JobStore, jobs: queue.Queue, cfg: ServerConfig, workers_alive=lambda: 1):
        self.store, self.jobs, self.cfg, self.workers_alive = store, jobs, cfg, workers_alive

    def authorize(self, header: str) -> None:
        if self.cfg.token and not hmac.compare_digest(header.encode(), f"Bearer {self.cfg.token}".encode()):
            raise BadRequest(401, "missing or wrong bearer token")      # compared in constant time

    def admit(self, content_length: str | None) -> int:
        """The checks before a body is read: its declared size, then a cheap 429 (no parsing under overload)."""
        try:
            n = int(content_length or "")
        except ValueError:
            raise BadRequest(400 if content_length is not None else 411, "Content-Length required")
        if n < 0 or n > self.cfg.max_body_bytes:
            raise BadRequest(413, f"body over the limit of {self.cfg.max_body_bytes} bytes")
        if self.store.n_pending() >= self.cfg.queue_size:
            raise BadRequest(429, "queue full, retry later")
        return n

    def post_job(self, raw: bytes) -> tuple[int, dict]:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest(400, "body is not valid JSON")
        job, image = validate_job(body, self.cfg)
        job_id, new = self.store.accept(job, image, self.cfg.queue_size)
        if new:
            self.jobs.put(job_id)
        return (202 if new else 200), {"job_id": job_id}

    def get_job(self, job_id: str) -> tuple[int, dict]:
        r = self.store.status(job_id)
        if r is None:
            raise BadRequest(404, "unknown job")
        return 200, r

    def results(self, query: str) -> tuple[int, dict]:
        q = urllib.parse.parse_qs(query)
        try:
            after = int(q.get("after", ["0"])[0])
            limit = max(1, min(256, int(q.get("limit", ["64"])[0])))
        except ValueError:
            raise BadRequest(400, "after and limit must be integers")
        out = self.store.results_after(after, limit)
        return 200, {"results": out, "next": out[-1]["seq"] if out else after}

    def health(self) -> tuple[int, dict]:
        alive = self.workers_alive()   # ok: some worker can still turn jobs into images
        return 200, {"ok": alive > 0, **self.store.counts(), "workers": alive}


@dataclass
class Request:
    arg: str = ""        # the rest of the path after a prefix route ("/jobs/ID" -> "ID")
    query: str = ""
    body: bytes = b""


# (method, path) -> the API call; a path ending in "/" is a prefix whose remainder is the request's `arg`.
ROUTES = {("POST", "/jobs"): lambda api, req: api.post_job(req.body),
          ("GET", "/jobs/"): lambda api, req: api.get_job(req.arg),
          ("GET", "/results"): lambda api, req: api.results(req.query),
          ("GET", "/health"): lambda api, req: api.health()}


def route(method: str, path: str):
    """(the route's call, its path argument); 405 for a known path with another method, 404 for an unknown one."""
    matches = [(m, call, path[len(p):]) for (m, p), call in ROUTES.items()
               if path == p or (p.endswith("/") and path.startswith(p) and len(path) > len(p))]
    for m, call, arg in matches:
        if m == method:
            return call, arg
    if matches:
        raise BadRequest(405, f"{method} {path} is not supported")
    raise BadRequest(404, f"no route {path}")


class Handler(BaseHTTPRequestHandler):
    """HTTP in and out: authorize, route, read a POST body only once the API admits it, send JSON."""
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"   # so that a garbled request line still gets a status line (400)

    def setup(self):
        self.timeout = self.server.api.cfg.request_timeout    # slow or stalled clients are dropped
        super().setup()

    def log_message(self, *args):          # quiet: the trainer has its own logs
        pass

    def _send(self, code: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        api = self.server.api
        try:
            api.authorize(self.headers.get("Authorization", ""))
            url = urllib.parse.urlsplit(self.path)
            call, arg = route(method, url.path)
            body = b""
            if method == "POST":
                n = api.admit(self.headers.get("Content-Length"))
                body = self.rfile.read(n)
                if len(body) < n:
                    raise BadRequest(400, "body shorter than Content-Length")
            self._send(*call(api, Request(arg=arg, query=url.query, body=body)))
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


class DataServer(ThreadingHTTPServer):
    request_queue_size = 128    # listen backlog: socketserver's default of 5 refuses bursts of clients
    daemon_threads = True


def check_config(cfg: ServerConfig) -> None:
    """Settings under which no job could ever be served stop the start with one line (before the pipeline loads)."""
    problems = [
        min(cfg.workers, cfg.queue_size, cfg.max_body_bytes, cfg.max_image_pixels, cfg.max_boxes, cfg.steps) < 1 and
        "--workers, --queue-size, --max-body-bytes, --max-image-pixels, --max-boxes and --steps must be at least 1",
        (cfg.work_size < 0 or cfg.work_size % 8 or cfg.threads < 0 or cfg.request_timeout <= 0) and
        "--work-size must be a multiple of 8 (0: the source's size), --threads >= 0, --request-timeout > 0",
        not 0 <= cfg.port <= 65535 and f"--port {cfg.port}: not a port (0 = any free one)",
        not 0 <= cfg.verify_threshold <= 1 and f"--verify-threshold {cfg.verify_threshold}: a score in [0, 1]",
        cfg.image_root and not os.path.isdir(cfg.image_root) and f"--image-root {cfg.image_root}: no such directory",
        not device_exists(cfg.device) and f"--device {cfg.device}: no such device here",
        output_problem("--state-dir", cfg.state_dir, folder=True),
        cfg.port_file and output_problem("--port-file", cfg.port_file),
        port_problem(cfg.host, cfg.port),
    ]
    stop_at_first("server.py", problems)


def port_problem(host: str, port: int) -> str | None:
    """Whether the address can be listened on, tried before a minute of pipeline loading."""
    if not 0 < port <= 65535:
        return None
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port}: {e.strerror}"
    return None


def serve(cfg: ServerConfig) -> None:
    if cfg.steps is None:
        cfg.steps = default_steps(cfg.pipeline)
    check_config(cfg)
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)
    models = load_worker_models(cfg)    # before the state dir: a pipeline that cannot load leaves nothing behind
    store = JobStore(cfg.state_dir)
    jobs: queue.Queue = queue.Queue()
    for job_id in store.pending:        # recovered after a crash: finish what was accepted
        jobs.put(job_id)
    stop = threading.Event()
    threads = [threading.Thread(target=worker_loop, args=(store, jobs, cfg, stop, *worker), daemon=True)
               for worker in models]
    for t in threads:
        t.start()
    try:
        httpd = DataServer((cfg.host, cfg.port), Handler)
    except OSError as e:   # taken between the check and now
        raise SystemExit(f"server.py: cannot listen on {cfg.host}:{cfg.port}: {e.strerror}")
    httpd.api = API(store, jobs, cfg, workers_alive=lambda: sum(t.is_alive() for t in threads))
    port = httpd.server_address[1]
    if cfg.port_file:
        with atomic_write(cfg.port_file) as f:
            f.write(str(port))
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




def main(argv=None) -> None:
    serve(parse_config(ServerConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
