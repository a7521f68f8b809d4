"""The trainer's side of Syn-GRPO (§3.3): what it sends to the data server(s), how, and what it does with the images
that come back. (server.py is the server itself; it imports nothing from here.)

  * The wire format: `make_job` (a POST /jobs body) and `parse_result` -> `SynthesisResult` (a finished job).
  * `DataServerClient`: spreads jobs over one or more servers, skips dead ones and retries them with backoff.
  * `Synthesis`: each step, every prompt's selected description (Eq. 8) goes out with its image and gold boxes;
    finished images replace their sources in the data pool (`absorb_result`). `NoSynthesis` is its do-nothing twin.
  * `start_local_server`: the embedded default's own data server process (no second terminal needed).
  * `synthesize_offline`: the paper's 'GRPO + Offline Generation' baseline (Table 1), by the same code.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from common import ROOT, Dist, Stream, all_gather, broadcast, derive_seed, wait_for_file
from config import Config
from data import DataPool, Sample, is_box, load_image


# ----------------------------------------------------------------------------------------------------
# The wire format: a job to submit, a finished result to take in


def make_job(sample: Sample, description: str, seed: int, key: str) -> dict:
    """A POST /jobs body: the source image (base64), every gold box (the keep-mask), the description and, for OVD/ISR,
    the labelled categories (a verifying server checks the new background holds none of them). `key` makes a
    resubmission after a lost reply (or a trainer resume) map to the same job."""
    with open(sample.image, "rb") as f:
        image_b64 = base64.b64encode(f.read()).decode()
    return {"sample_id": sample.id, "image_b64": image_b64, "boxes": sample.gold_boxes(), "description": description,
            "seed": seed, "key": key, "categories": list(sample.categories) if sample.task in ("ovd", "isr") else []}


@dataclass
class SynthesisResult:
    """A finished job, as GET /results returns it."""
    job_id: str
    sample_id: str
    boxes: list            # the gold boxes in the new image's frame, in the order they were sent
    description: str
    image: bytes           # PNG


def parse_result(r: dict) -> SynthesisResult | None:
    """A done job's record; None for a failed job or a reply off the schema (never an exception)."""
    if not isinstance(r, dict) or r.get("status") != "done" or not isinstance(r.get("image_b64"), str):
        return None
    boxes = r.get("boxes")
    if not (isinstance(r.get("job_id"), str) and isinstance(r.get("sample_id"), str) and isinstance(boxes, list)
            and all(is_box(b) for b in boxes)):
        return None
    try:
        image = base64.b64decode(r["image_b64"], validate=True)
    except (binascii.Error, ValueError):
        return None
    return SynthesisResult(job_id=r["job_id"], sample_id=r["sample_id"], boxes=boxes,
                           description=r.get("description") if isinstance(r.get("description"), str) else "", image=image)


# ----------------------------------------------------------------------------------------------------
# The client: spreads jobs over servers, skips dead ones and retries them with backoff

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
        self.dropped = 0        # by a verifying server (--verify-synthesis): a labelled class added outside the boxes

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
                            self.dropped += res["status"] == "dropped"
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
        return {"cursor": self.cursor, "pending": self.pending, "failed": self.failed, "dropped": self.dropped}

    def load_state_dict(self, s: dict) -> None:
        self.cursor.update({u: c for u, c in s["cursor"].items() if u in self.cursor})
        self.pending, self.failed, self.dropped = dict(s["pending"]), s["failed"], s.get("dropped", 0)


# ----------------------------------------------------------------------------------------------------
# The trainer's side: Synthesis (online, each step), its local server, offline synthesis

SYNC_WAIT_SECONDS = 600       # --synchronous-synthesis: how long a step waits for its images before going on
OFFLINE_WAIT_SECONDS = 3600   # --offline-synthesis: how long the start waits for every image
SERVER_START_SECONDS = 300    # the local server loads its pipeline (SDXL from disk) before it listens


@dataclass
class Exchange:
    """What a step's synthesis exchange gives the loop."""
    pool: DataPool                # the pool to go on with (finished images in place of their sources)
    stats: dict                   # job counts (metrics.jsonl's jobs_*)
    sent: list                    # per prompt of this rank: the description sent to the data server, None if none


class Synthesis:
    """Each step, every prompt's selected description (Eq. 8) goes to the data server(s) with its image and gold
    boxes; finished images replace their sources in the pool. Rank 0 talks to the servers (to a local one it
    starts when --server-url is empty); every rank continues with rank 0's pool."""

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.d, self.client, self.server_proc, self.fixed = cfg, d, None, None, None
        self.threads = torch.get_num_threads()
        if not d.main:
            return
        urls = [u for u in cfg.server_url.split(",") if u]
        if not urls:
            self.server_proc, url = start_local_server(cfg)
            urls = [url]
            if cfg.device == "cpu" and cfg.pipeline != "procedural":   # its core is the server's: one more trainer
                torch.set_num_threads(max(1, self.threads - 1))   # thread would oversubscribe the CPU, measured 2x slower
                # steps on 2 cores; the procedural pipeline takes milliseconds an image and leaves the trainer both
        self.client = DataServerClient(urls, cfg.server_token, log=tqdm.write)
        if cfg.descriptions:   # the same descriptions in turn, whatever the model writes
            with open(cfg.descriptions) as f:
                self.fixed = [line.strip() for line in f if line.strip()]

    def exchange(self, step: int, samples: list[Sample], descriptions: list, pool: DataPool) -> Exchange:
        """Submit this step's jobs (every rank's samples with their Eq. 8 descriptions), take in every finished
        image; every rank goes on with rank 0's pool and learns what was sent for its own prompts."""
        everyone = all_gather([(s.id, t) for s, t in zip(samples, descriptions)], self.d)
        chosen = [(pool.samples[i], t) for part in everyone for i, t in part]
        stats, sent = self._submit_and_collect(step, chosen, pool) if self.client else ({}, [None] * len(chosen))
        if self.d.world > 1:
            update, sent = broadcast((pool.state_dict() if stats.get("jobs_absorbed") else None, sent), self.d)
            if update is not None:
                pool = DataPool.from_state_dict(update)
        mine = slice(self.d.rank * len(samples), (self.d.rank + 1) * len(samples))   # ranks hold equal shares
        return Exchange(pool, stats, sent[mine])

    def _submit_and_collect(self, step: int, chosen: list, pool: DataPool) -> tuple[dict, list]:
        ids, sent, skipped = [], [], 0
        for b, (sample, desc) in enumerate(chosen):
            desc = self.fixed[(step * len(chosen) + b) % len(self.fixed)] if self.fixed else desc
            job_id = None
            if desc and self.cfg.max_pending_jobs and len(self.client.pending) >= self.cfg.max_pending_jobs:
                skipped += 1      # the server is behind: a job queued now would wait behind older ones
            elif desc:
                job_id = self.client.submit(make_job(sample, desc, seed=derive_seed(self.cfg.seed, Stream.SYNTHESIS_JOB,
                                                                                    step, b), key=f"{sample.id}@{step}"))
                ids.append(job_id)
            sent.append(desc if job_id else None)
        results = self.client.collect()
        deadline = time.time() + SYNC_WAIT_SECONDS
        while self.cfg.synchronous_synthesis and self.client.waiting([i for i in ids if i]):
            if time.time() > deadline:
                tqdm.write(f"synthesis: step {step} goes on without {len(self.client.waiting(ids))} images after "
                           f"{SYNC_WAIT_SECONDS} s (they join the pool when they come)")
                break
            time.sleep(0.05)
            results += self.client.collect()
        absorbed = [absorb_result(r, pool, self.cfg.out_dir, step) for r in results]
        return {"jobs_submitted": sum(i is not None for i in ids), "jobs_skipped": skipped,
                "jobs_absorbed": sum(a is not None for a in absorbed), "jobs_pending": len(self.client.pending),
                "jobs_failed": self.client.failed, "jobs_dropped": self.client.dropped}, sent

    def state_dict(self) -> dict | None:
        return self.client.state_dict() if self.client else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.client and state:
            self.client.load_state_dict(state)

    def close(self) -> None:
        if self.server_proc:
            self.server_proc.terminate()
            self.server_proc.wait()
            torch.set_num_threads(self.threads)


class NoSynthesis:
    """The do-nothing twin for every other algorithm (and syn-grpo --no-synthesize): the pool stays as it is."""

    def exchange(self, step: int, samples: list[Sample], descriptions: list, pool: DataPool) -> Exchange:
        return Exchange(pool, {}, [None] * len(samples))

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass

    def close(self) -> None:
        pass


def absorb_result(r: dict, pool: DataPool, out_dir: str, step: int, new_slot: bool = False):
    """A finished job into the pool in place of its source (the same labels in the new image), or in a slot of its
    own beside it (new_slot: offline generation); None when it cannot be: failed, unknown source, already absorbed,
    not the boxes we sent, or a corrupt image."""
    res = parse_result(r)
    if res is None or res.sample_id not in pool.samples:
        return None
    parent = pool.samples[res.sample_id]
    new_id = f"{parent.root}~{res.job_id[:12]}"
    if new_id in pool.samples or len(res.boxes) != len(parent.gold_boxes()):
        return None            # already absorbed, or not the labels we sent: keep the pool as it is
    path = os.path.join(out_dir, "synth", new_id.replace("/", "_") + ".png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "wb") as f:
            f.write(res.image)
        load_image(path)
    except (ValueError, OSError):   # a corrupt result is dropped, never a crash of the run
        return None
    new = parent.with_gold_boxes(res.boxes)
    new.id, new.image = new_id, path
    new.meta.update(description=res.description, step=step, job_id=res.job_id)
    return pool.add(parent.id, new) if new_slot else pool.replace(parent.id, new)


def start_local_server(cfg: Config):
    """The embedded default needs no second terminal: a data server process on a free loopback port."""
    state = os.path.join(cfg.out_dir, "server")
    os.makedirs(state, exist_ok=True)
    port_file = os.path.join(state, "port")
    if os.path.exists(port_file):
        os.remove(port_file)
    device = cfg.server_device   # a GPU of its own unless asked otherwise (config.resolve_defaults, checked there)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"),
                             "--port", "0", "--port-file", port_file, "--state-dir", state, "--pipeline", cfg.pipeline,
                             "--steps", str(cfg.pipeline_steps), "--work-size", str(cfg.pipeline_size),
                             "--segmenter", cfg.segmenter, "--device", device, "--parent-pid", str(os.getpid()),
                             "--verify-synthesis", cfg.verify_synthesis, "--verify-threshold", str(cfg.verify_threshold),
                             *(["--threads", "1"] if device == "cpu" else [])],   # one core for it, the rest to training
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(state, "server.log"), "a"))
    if not wait_for_file(port_file, timeout=SERVER_START_SECONDS, alive=lambda: proc.poll() is None):
        raise SystemExit(f"train.py: the local data server did not start; see {state}/server.log")
    with open(port_file) as f:
        return proc, f"http://127.0.0.1:{f.read().strip()}"


def synthesize_offline(cfg: Config, pool: DataPool, d: Dist) -> DataPool:
    """'GRPO + Offline Generation' (Table 1): before training, each sample gets one image synthesized by the same data
    server and outpainting code from a fixed description (--descriptions, in turn), added to the pool beside its
    source; the run is then plain GRPO on the originals and these images."""
    synthesis = Synthesis(replace(cfg, max_pending_jobs=0), d)
    if d.main:
        jobs = [make_job(s, synthesis.fixed[i % len(synthesis.fixed)],
                         seed=derive_seed(cfg.seed, Stream.OFFLINE_JOB, i), key=f"{s.id}@offline")
                for i, s in enumerate(pool.get(k) for k in range(len(pool)))]
        results, deadline = [], time.time() + OFFLINE_WAIT_SECONDS
        while jobs or synthesis.client.pending:
            if time.time() > deadline:
                print(f"offline synthesis: gave up on {len(jobs) + len(synthesis.client.pending)} images after "
                      f"{OFFLINE_WAIT_SECONDS} s")
                break
            while jobs and synthesis.client.submit(jobs[0]):   # None: the server's queue is full, or it is down
                jobs.pop(0)
            results += synthesis.client.collect()
            time.sleep(0.05)
        added = [absorb_result(r, pool, cfg.out_dir, step=-1, new_slot=True) for r in results]
        print(f"offline synthesis: {sum(a is not None for a in added)} images added to {len(pool)} samples")
    synthesis.close()
    return DataPool.from_state_dict(broadcast(pool.state_dict(), d)) if d.world > 1 else pool

