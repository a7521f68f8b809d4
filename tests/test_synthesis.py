"""synthesis.py: results taken into the pool only when whole and new, and what each step sent (a stand-in for the
data-server client; the real client against the real server is tested in test_server.py and test_train.py)."""
import base64
import io

from PIL import Image

from config import Config
from common import Dist
from data import DataPool, Sample
from synthesis import Exchange, NoSynthesis, Synthesis, absorb_result


def red_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, format="PNG")
    return buf.getvalue()


def one_sample_pool(tmp_path, n=1) -> DataPool:
    img = tmp_path / "a.png"
    Image.new("RGB", (20, 20), "white").save(img)
    return DataPool([Sample(id=f"s{i}", task="rec", image=str(img), width=20, height=20, problem="q",
                            solution=[1, 1, 9, 9]) for i in range(n)])


def test_absorb_result_ignores_bad_and_duplicate_results(tmp_path):
    pool = one_sample_pool(tmp_path)
    ok = {"status": "done", "job_id": "j1", "sample_id": "s0", "boxes": [[1, 1, 9, 9]], "description": "d",
          "image_b64": base64.b64encode(red_png()).decode()}
    for bad in ({**ok, "status": "failed"}, {**ok, "sample_id": "zzz"}, {**ok, "image_b64": "@@"},
                {**ok, "image_b64": base64.b64encode(b"junk").decode()}, {**ok, "boxes": []}):
        assert absorb_result(bad, pool, str(tmp_path), 0) is None
    new = absorb_result(ok, pool, str(tmp_path), 3)
    assert pool.get(0) is new and new.meta["step"] == 3 and new.solution == [1, 1, 9, 9]
    assert absorb_result(ok, pool, str(tmp_path), 4) is None          # the same result twice: absorbed once


class StandInClient:
    """DataServerClient's interface: accepts `accept` jobs, then answers None (a full queue); never finishes one."""

    def __init__(self, accept: int):
        self.accept, self.pending, self.failed, self.dropped, self.jobs = accept, {}, 0, 0, []

    def submit(self, job):
        if len(self.jobs) >= self.accept:
            return None
        self.jobs.append(job)
        self.pending[f"j{len(self.jobs)}"] = "url"
        return f"j{len(self.jobs)}"

    def collect(self):
        return []

    def waiting(self, ids):
        return []


def stand_in_synthesis(tmp_path, accept: int, **cfg) -> Synthesis:
    synthesis = Synthesis(Config(out_dir=str(tmp_path), server_url="http://127.0.0.1:9", **cfg), Dist())
    synthesis.client = StandInClient(accept)
    return synthesis


def test_the_exchange_reports_what_was_sent_for_each_prompt(tmp_path):
    pool = one_sample_pool(tmp_path, n=4)
    samples = [pool.get(i) for i in range(4)]
    # the model's descriptions; the second has none (Eq. 8 found no <description>); the server takes two jobs
    ex = stand_in_synthesis(tmp_path, accept=2, max_pending_jobs=0).exchange(0, samples, ["a", None, "b", "c"], pool)
    assert ex.sent == ["a", None, "b", None] and ex.stats["jobs_submitted"] == 2 and ex.pool is pool
    # --max-pending-jobs 1: the second job waits for the first, so it is skipped, not sent
    ex = stand_in_synthesis(tmp_path, accept=9, max_pending_jobs=1).exchange(0, samples, ["a", "b", None, None], pool)
    assert ex.sent == ["a", None, None, None] and ex.stats["jobs_skipped"] == 1


def test_fixed_descriptions_are_what_is_sent_and_logged(tmp_path):
    (tmp_path / "d.txt").write_text("a sunny beach\na snowy road\n")
    pool = one_sample_pool(tmp_path, n=2)
    synthesis = stand_in_synthesis(tmp_path, accept=9, max_pending_jobs=0, descriptions=str(tmp_path / "d.txt"))
    ex = synthesis.exchange(1, [pool.get(0), pool.get(1)], ["the model's", None], pool)
    assert ex.sent == ["a sunny beach", "a snowy road"]      # step 1, prompts 0 and 1: lines 2 and 3 (mod 2) in turn
    assert [j["description"] for j in synthesis.client.jobs] == ex.sent


def test_no_synthesis_sends_nothing(tmp_path):
    pool = one_sample_pool(tmp_path, n=2)
    assert NoSynthesis().exchange(0, [pool.get(0), pool.get(1)], ["a", "b"], pool) == Exchange(pool, {}, [None, None])
