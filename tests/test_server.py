import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from common import wait_for_file
from shapes import shapes_sample
from synthesis import DataServerClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_server(state_dir, *extra):
    port_file = os.path.join(state_dir, "port")
    os.makedirs(state_dir, exist_ok=True)
    if os.path.exists(port_file):
        os.remove(port_file)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--port", "0", "--port-file", port_file,
                          "--state-dir", state_dir, "--steps", "2", *extra], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_file(port_file, timeout=120, alive=lambda: p.poll() is None), "server did not start"
    with open(port_file) as f:
        return p, f"http://127.0.0.1:{f.read()}"


def call(url, path, body=None, method=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def raw_request(url, data: bytes) -> bytes:
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data)
        return s.recv(65536)


def png_b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def job(i=0, **kw):
    img, row = shapes_sample("ovd", i)
    return {"sample_id": f"s{i}", "image_b64": png_b64(img), "boxes": [o["bbox"] for o in row["objects"]],
            "description": "a grassy park", "seed": i, **kw}


def wait_done(url, ids, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = [call(url, f"/jobs/{j}")[1]["status"] for j in ids]
        if all(s in ("done", "failed", "dropped") for s in st):
            return st
        time.sleep(0.2)
    raise AssertionError("jobs did not finish")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("srv")
    root = d / "images"
    root.mkdir()
    img, _ = shapes_sample("rec", 0)
    img.save(root / "a.png")
    (d / "secret.png").write_bytes((root / "a.png").read_bytes())
    p, url = start_server(str(d / "state"), "--image-root", str(root), "--token", "s3cret", "--queue-size", "4",
                          "--max-body-bytes", str(1 << 20), "--max-image-pixels", str(512 * 512))
    yield url, {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
    p.terminate()
    p.wait()


def test_api_contract_and_every_error_code(server):
    url, auth = server
    # 401 without (or with a wrong) token
    assert call(url, "/health")[0] == 401
    assert call(url, "/health", headers={"Authorization": "Bearer nope"})[0] == 401
    code, h = call(url, "/health", headers=auth)
    assert code == 200 and h["ok"]
    # 202 and the result, with boxes unchanged and a same-size image
    code, r = call(url, "/jobs", job(0), headers=auth)
    assert code == 202
    deadline = time.time() + 120
    while (res := call(url, f"/jobs/{r['job_id']}", headers=auth)[1])["status"] == "queued" and time.time() < deadline:
        time.sleep(0.2)
    assert res["status"] == "done" and res["boxes"] == [list(map(float, b)) for b in job(0)["boxes"]]
    out = Image.open(io.BytesIO(base64.b64decode(res["image_b64"])))
    assert out.size == shapes_sample("ovd", 0)[0].size
    code, rs = call(url, "/results?after=0", headers=auth)
    assert code == 200 and [x["job_id"] for x in rs["results"]] == [r["job_id"]] and rs["next"] == 1
    assert call(url, f"/results?after={rs['next']}", headers=auth)[1]["results"] == []
    # idempotency key: the same key gives the same job, not a second one
    k1 = call(url, "/jobs", job(1, key="s1@0"), headers=auth)
    k2 = call(url, "/jobs", job(1, key="s1@0"), headers=auth)
    assert k1[0] == 202 and k2[0] == 200 and k1[1]["job_id"] == k2[1]["job_id"]
    # an image path under the root is accepted; outside it is refused
    assert call(url, "/jobs", {**job(2), "image_b64": None, "image": "a.png"}, headers=auth)[0] == 202
    for bad_path in ("../secret.png", "/etc/passwd", "../../../../etc/passwd"):
        assert call(url, "/jobs", {**job(2), "image_b64": None, "image": bad_path}, headers=auth)[0] == 403
    # 400s with a message
    for body in ({"sample_id": 1}, {**job(0), "boxes": [[5, 5, 1, 1]]}, {**job(0), "seed": -1},
                 {**job(0), "image_b64": "!!!"}, {**job(0), "image_b64": base64.b64encode(b"not an image").decode()},
                 {**job(0), "description": ""}, {**job(0), "zoom_out": 9}, [1, 2]):
        code, e = call(url, "/jobs", body, headers=auth)
        assert code == 400 and e["error"], body
    assert call(url, "/jobs", raw=b"{not json", headers=auth)[0] == 400
    # 413: body and image size limits
    assert raw_request(url, b"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                            b"Content-Length: 2097152\r\n\r\n").startswith(b"HTTP/1.1 413")   # refused unread
    big = png_b64(Image.new("RGB", (1024, 1024)))
    assert call(url, "/jobs", {**job(0), "image_b64": big}, headers=auth)[0] == 413
    # 404 / 405
    assert call(url, "/jobs/nope", headers=auth)[0] == 404
    assert call(url, "/nowhere", headers=auth)[0] == 404
    assert call(url, "/jobs", method="DELETE", headers=auth)[0] == 405
    # 429 when the queue is full (queue size 4)
    codes = [call(url, "/jobs", job(10 + i), headers=auth)[0] for i in range(12)]
    assert 429 in codes and codes[0] == 202
    assert call(url, "/health", headers=auth)[0] == 200         # still up


def test_binds_loopback_by_default(tmp_path):
    p, url = start_server(str(tmp_path / "s"))
    try:
        port = int(url.rsplit(":", 1)[1])
        out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in out
    finally:
        p.terminate()
        p.wait()


@pytest.mark.slow
def test_kill_9_with_jobs_queued_loses_nothing(tmp_path):
    state = str(tmp_path / "state")
    p, url = start_server(state)
    ids = [call(url, "/jobs", job(i, key=f"k{i}"))[1]["job_id"] for i in range(8)]
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)              # some jobs done, some queued, maybe one mid-generation
    p.wait()
    p, url = start_server(state)
    try:
        assert wait_done(url, ids, timeout=180) == ["done"] * 8
        results = call(url, "/results?after=0&limit=256")[1]["results"]
        assert sorted(r["job_id"] for r in results) == sorted(ids)             # all accounted for, none twice
        assert [r["seq"] for r in results] == list(range(1, 9))
        # a retried submission after the crash maps to the same job (idempotency keys survive restarts)
        assert call(url, "/jobs", job(0, key="k0")) == (200, {"job_id": ids[0]})
    finally:
        p.terminate()
        p.wait()


def test_client_skips_a_dead_server_and_collects(tmp_path):
    p, url = start_server(str(tmp_path / "s"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"     # nothing listens here
    s.close()
    try:
        logs = []
        c = DataServerClient([dead, url], timeout=2, log=logs.append)
        ids = [c.submit(job(i)) for i in range(3)]
        assert all(ids) and logs and "unreachable" in logs[0]
        got = []
        deadline = time.time() + 120
        while len(got) < 3 and time.time() < deadline:
            got += c.collect()
            time.sleep(0.2)
        assert sorted(r["job_id"] for r in got) == sorted(ids) and not c.pending
    finally:
        p.terminate()
        p.wait()


BROKEN_REPLIES = {   # what a server killed mid-reply, or a wrong one, sends back
    "cut after headers": b"HTTP/1.1 200 OK\r\nContent-Length: 36\r\n\r\n",
    "cut error body": b"HTTP/1.1 500 Oops\r\nContent-Length: 36\r\n\r\n{",
    "bad status line": b"HTTP/1.1 2xx what\r\n\r\n",
    "not json": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "wrong schema": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",
    "empty object": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    "closed at once": b"",
}


@pytest.mark.parametrize("kind", list(BROKEN_REPLIES))
def test_client_survives_a_broken_reply(kind):
    """A reply cut off by a kill (IncompleteRead is not an OSError) or not our schema marks the server down."""
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 << 20)
                conn.sendall(BROKEN_REPLIES[kind])

    threading.Thread(target=serve, daemon=True).start()
    try:
        logs = []
        c = DataServerClient([url], timeout=5, log=logs.append)
        assert c.submit(job(0)) is None and not c.pending
        c.down_until[url] = 0.0       # skip the backoff: ask again at once
        assert c.collect() == [] and c.cursor[url] == 0
        assert len(logs) == 2
    finally:
        srv.close()


def test_local_server_exits_with_its_parent(tmp_path):
    """train.py's own server must not outlive a killed trainer."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    p, url = start_server(str(tmp_path / "s"), "--parent-pid", str(parent.pid))
    try:
        assert call(url, "/health")[0] == 200
        parent.kill()
        parent.wait()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1])


def _hostile_requests(url):
    """(kind, raw HTTP bytes) for malformed or hostile requests; each must get a 4xx and not hurt the server."""
    host = url.split("//")[1]
    def post(body: bytes, path="/jobs", extra=b""):
        return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    good = job(0)
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, format="PNG")          # 144 Mpx in a few kB
    cases = [
        ("bad json", post(b"{\"sample_id\": ")), ("not an object", post(b"[1, 2, 3]")), ("null", post(b"null")),
        ("deep nesting", post(b"[" * 100000 + b"]" * 100000)),
        ("wrong types", post(json.dumps({**good, "boxes": "x"}).encode())),
        ("wrong types 2", post(json.dumps({**good, "seed": "1"}).encode())),
        ("wrong types 3", post(json.dumps({**good, "sample_id": ["a"]}).encode())),
        ("missing image", post(json.dumps({k: v for k, v in good.items() if k != "image_b64"}).encode())),
        ("missing boxes", post(json.dumps({k: v for k, v in good.items() if k != "boxes"}).encode())),
        ("nan box", post(json.dumps({**good, "boxes": [[float("nan"), 0, 1, 1]]}).encode())),
        ("bad base64", post(json.dumps({**good, "image_b64": "@@@@"}).encode())),
        ("not an image", post(json.dumps({**good, "image_b64": base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()}).encode())),
        ("bomb", post(json.dumps({**good, "image_b64": base64.b64encode(bomb.getvalue()).decode()}).encode())),
        ("traversal", post(json.dumps({**good, "image_b64": None, "image": "../../etc/passwd"}).encode())),
        ("absolute", post(json.dumps({**good, "image_b64": None, "image": "/etc/passwd"}).encode())),
        ("huge declared body", b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n"),
        ("negative length", b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
        ("no length", b"POST /jobs HTTP/1.1\r\nHost: x\r\n\r\n{}"),
        ("unknown route", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("unknown job", b"GET /jobs/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("bad cursor", b"GET /results?after=abc HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("method", b"PUT /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        ("method 2", b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("garbage line", b"\x00\x01\x02 nonsense\r\n\r\n"),
        ("long description", post(json.dumps({**good, "description": "x" * 5000}).encode())),
    ]
    return cases


@pytest.mark.slow
def test_thousand_hostile_requests_get_4xx_and_valid_jobs_still_complete(tmp_path):
    import concurrent.futures as cf
    p, url = start_server(str(tmp_path / "s"), "--request-timeout", "1", "--max-image-pixels", str(1024 * 1024))
    try:
        assert wait_done(url, [call(url, "/jobs", job(9))[1]["job_id"]]) == ["done"]   # pipeline loaded: baseline RSS
        rss0 = _rss_kb(p.pid)
        cases = _hostile_requests(url)
        reqs = [cases[i % len(cases)] for i in range(1000)]

        def send(item):
            kind, data = item
            try:
                reply = raw_request(url, data)
            except (ConnectionResetError, BrokenPipeError):
                return kind, "reset"          # the server may close on a body it refuses to read
            status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/") else b"none"
            return kind, status.decode(errors="replace")

        with cf.ThreadPoolExecutor(8) as ex:
            valid = [ex.submit(call, url, "/jobs", job(i)) for i in range(5)]      # interleaved valid jobs
            answers = list(ex.map(send, reqs))
            valid_ids = [f.result()[1]["job_id"] for f in valid]
        bad = [(k, s) for k, s in answers if not (s.startswith("4") or s == "reset")]
        assert not bad, bad[:10]
        assert sum(s.startswith("4") for _, s in answers) >= 950
        # slow clients: connect, send half a request line, stall; the server drops them and serves others
        slow = [socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) for _ in range(20)]
        for s in slow:
            s.sendall(b"POST /jobs HTTP/1.1\r\nContent-Le")
        assert call(url, "/health")[0] == 200
        time.sleep(1.5)
        for s in slow:
            s.close()
        assert wait_done(url, valid_ids) == ["done"] * 5
        assert _rss_kb(p.pid) - rss0 < 200_000            # memory stays bounded (kB)
        assert p.poll() is None
    finally:
        p.terminate()
        p.wait()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


LOAD_JOBS = int(os.environ.get("SYN_GRPO_LOAD_JOBS", "50"))   # per client (the issue asks for >= 50)


@pytest.mark.slow
def test_load_16_clients_delivered_exactly_once(tmp_path):
    import concurrent.futures as cf
    p, url = start_server(str(tmp_path / "s"), "--steps", "1", "--queue-size", "32", "--work-size", "32")
    images = []          # small (64x64) images, generated at 32 px, keep the 800 generations within CI's budget
    for i in range(8):
        img, row = shapes_sample("ovd", i)
        f = 64 / img.width
        images.append({"image_b64": png_b64(img.resize((64, 64))), "description": "a grassy park", "seed": i,
                       "boxes": [[v * f for v in o["bbox"]] for o in row["objects"]]})
    try:
        def client(c):
            accepted, n429, t_submit = [], 0, {}
            for k in range(LOAD_JOBS):
                body = dict(images[(c + k) % 8], sample_id=f"c{c}-{k}", key=f"c{c}-{k}")
                while True:
                    try:
                        code, r = call(url, "/jobs", body)
                    except OSError:             # a dropped connection under load: retry the same key
                        time.sleep(0.2)
                        continue
                    if code == 429:
                        n429 += 1
                        time.sleep(0.5)
                        continue
                    assert code in (200, 202), (code, r)
                    accepted.append(r["job_id"])
                    t_submit[r["job_id"]] = time.time()
                    break
            return accepted, n429, t_submit

        delivered, seen_at, cursor = [], {}, 0
        with cf.ThreadPoolExecutor(16) as ex:
            futures = [ex.submit(client, c) for c in range(16)]
            deadline = time.time() + 900
            while (not all(f.done() for f in futures) or len(delivered) < 16 * LOAD_JOBS) and time.time() < deadline:
                if any(f.done() and f.exception() for f in futures):
                    break                      # a client failed: stop waiting, f.result() below re-raises
                r = call(url, f"/results?after={cursor}&limit=256")[1]
                for x in r["results"]:
                    delivered.append(x["job_id"])
                    seen_at[x["job_id"]] = time.time()
                cursor = r["next"]
                time.sleep(0.1)
            outs = [f.result() for f in futures]
        accepted = [j for a, _, _ in outs for j in a]
        t_submit = {j: t for _, _, ts in outs for j, t in ts.items()}
        assert len(accepted) == 16 * LOAD_JOBS == len(set(accepted))
        assert sorted(delivered) == sorted(accepted)              # every accepted job delivered exactly once
        assert sum(n for _, n, _ in outs) > 0                     # overload answered with 429, not unbounded memory
        lat = sorted(seen_at[j] - t_submit[j] for j in accepted)
        print(f"\nload: {len(lat)} jobs, {sum(n for _, n, _ in outs)} x 429, latency p50 {lat[len(lat) // 2]:.2f} s, "
              f"p99 {lat[int(len(lat) * 0.99)]:.2f} s")
    finally:
        p.terminate()
        p.wait()


@pytest.mark.slow
def test_five_kill_9_during_load_lose_and_duplicate_nothing(tmp_path):
    import random
    import threading
    state, port = str(tmp_path / "s"), _free_port()
    rng = random.Random(0)
    accepted, stop, errors = {}, threading.Event(), []

    def submitter():
        try:
            submit_all()
        except Exception as e:              # surfaced by the test at once, not as a 3-minute stall
            errors.append(e)

    def submit_all():
        k = 0
        while not stop.is_set() and k < 40:      # 40 jobs, submitted while the server is being killed
            try:
                code, r = call(f"http://127.0.0.1:{port}", "/jobs", dict(job(k % 8), sample_id=f"j{k}", key=f"j{k}"))
            except (OSError, ValueError, http.client.HTTPException):   # down, or killed mid-reply
                time.sleep(0.05)             # retry the same key (idempotent)
                continue
            if code in (200, 202):
                accepted[f"j{k}"] = r["job_id"]
                k += 1
            else:
                time.sleep(0.1)              # 429 or restarting

    p, url = start_server(state, "--port", str(port), "--steps", "1", "--queue-size", "16")
    t = threading.Thread(target=submitter, daemon=True)
    t.start()
    kills = 0
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.5, 2.5))
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            p, url = start_server(state, "--port", str(port), "--steps", "1", "--queue-size", "16")
        last, seen = time.time(), 0
        while len(accepted) < 40 and not errors and time.time() - last < 180:   # or no job accepted for 3 min
            time.sleep(0.2)
            if len(accepted) > seen:
                last, seen = time.time(), len(accepted)
        stop.set()
        t.join()
        assert not errors, f"submitter failed: {errors[0]!r}"
        ids = list(accepted.values())
        assert len(ids) == len(set(ids)) == 40
        assert wait_done(url, ids, timeout=600) == ["done"] * len(ids)
        call(url, "/results?after=0&limit=256")[1]["results"]
        cursor, allres = 0, []
        while True:
            r = call(url, f"/results?after={cursor}&limit=256")[1]
            if not r["results"]:
                break
            allres += r["results"]
            cursor = r["next"]
        got = [x["job_id"] for x in allres]
        assert len(got) == len(set(got)) and set(ids) <= set(got)     # nothing lost, nothing twice
        print(f"\ncrash: {kills} kills survived, {len(ids)} jobs accepted, all delivered once")
    finally:
        stop.set()
        p.terminate()
        p.wait()


def test_route_table_gives_404_for_unknown_paths_and_405_for_other_methods():
    from server import BadRequest, route
    for method, path, code in (("GET", "/jobs", 405), ("PUT", "/jobs", 405), ("DELETE", "/health", 405),
                               ("POST", "/jobs/abc", 405), ("GET", "/admin", 404), ("POST", "/nowhere", 404)):
        with pytest.raises(BadRequest) as e:
            route(method, path)
        assert e.value.code == code, (method, path)
    assert route("GET", "/jobs/abc")[1] == "abc" and route("POST", "/jobs")[1] == ""


def test_server_cli_rejects_a_bad_flag_in_one_line():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "server.py"), "--segmenter", "bogus"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "invalid choice: 'bogus'" in r.stderr


def test_one_box_rule_at_the_door_and_health_that_says_when_no_worker_can_run(tmp_path):
    """A box outside its image is refused (it was accepted, then 'done'); an image past PIL's own bomb limit is a 413
    like ours; /health is ok only while a worker can still make images."""
    import queue
    from server import API, BadRequest, JobStore, ServerConfig, validate_job
    img, _ = shapes_sample("rec", 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    job = {"sample_id": "s", "description": "a beach", "image_b64": base64.b64encode(buf.getvalue()).decode()}
    w, h = img.size
    assert validate_job({**job, "boxes": [[0, 0, w, h]]}, ServerConfig())[0]["boxes"] == [[0, 0, w, h]]
    with pytest.raises(BadRequest) as e:
        validate_job({**job, "boxes": [[w - 10, 0, w + 90, 20]]}, ServerConfig())
    assert e.value.code == 400 and f"outside the {w}x{h} image" in e.value.message
    big = io.BytesIO()
    Image.new("1", (20000, 20000)).save(big, format="PNG")        # 400 Mpx: over PIL's limit before ours is read
    with pytest.raises(BadRequest) as e:
        validate_job({**job, "image_b64": base64.b64encode(big.getvalue()).decode(), "boxes": []},
                     ServerConfig(max_image_pixels=10 ** 12))
    assert e.value.code == 413
    alive = [1]
    api = API(JobStore(str(tmp_path / "state")), queue.Queue(), ServerConfig(), workers_alive=lambda: alive[0])
    assert api.health()[1]["ok"] is True
    alive[0] = 0
    assert api.health()[1] == {**api.health()[1], "ok": False, "workers": 0}


@pytest.mark.parametrize("pipeline, segmenter", [("procedural", "tiny-sam"), ("tiny", "tiny-sam"),
                                                 ("tiny-union", "palette")])
def test_a_job_through_the_server_with_each_pipeline_and_segmenter(tmp_path, pipeline, segmenter):
    """The union pipeline and the SAM segmenter (transformers' SamModel prompted with the gold boxes; here their
    random-weight twins) run in server.py's workers: the job finishes, its boxes unchanged."""
    p, url = start_server(str(tmp_path / "state"), "--pipeline", pipeline, "--segmenter", segmenter)
    try:
        body = job(3)
        status, reply = call(url, "/jobs", body)
        assert status == 202, reply
        assert wait_done(url, [reply["job_id"]]) == ["done"]
        _, result = call(url, f"/jobs/{reply['job_id']}")
        assert result["boxes"] == [list(map(float, b)) for b in body["boxes"]]
    finally:
        p.terminate()
        p.wait()


def test_the_verifier_drops_an_image_with_a_new_instance_and_the_client_counts_it(tmp_path):
    """--verify-synthesis tiny-owlv2 (random weights) at --verify-threshold 0: every detection counts, so a job naming
    its categories is dropped with the verifier's reason and no image; a job without categories is not checked. The
    trainer's client counts the drop apart from failures, and /health reports it."""
    p, url = start_server(str(tmp_path / "state"), "--pipeline", "procedural", "--verify-synthesis", "tiny-owlv2",
                          "--verify-threshold", "0")
    try:
        client = DataServerClient([url])
        ids = [client.submit(job(1, categories=["red circle", "blue square"])), client.submit(job(2))]
        assert wait_done(url, ids) == ["dropped", "done"]
        dropped = call(url, f"/jobs/{ids[0]}")[1]
        assert dropped["error"].startswith("verifier: ") and "image_b64" not in dropped
        assert {r["status"] for r in client.collect()} == {"dropped", "done"}
        assert (client.dropped, client.failed) == (1, 0)
        assert call(url, "/health")[1] | {"ok": 1, "workers": 1} == {"ok": 1, "workers": 1, "queued": 0, "done": 1,
                                                                       "failed": 0, "dropped": 1}
        status, reply = call(url, "/jobs", job(3, categories=[""]))
        assert status == 400 and "categories" in reply["error"]
    finally:
        p.terminate()
        p.wait()
