import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import synth
from data import read_data
from synth import SynthConfig, parse_new_question, pass_count, read_rows, same_question, verdict


# -- the pure rules ------------------------------------------------------------------------------------------------

def test_parse_new_question():
    assert parse_new_question("New Question: How many circles?") == "How many circles?"
    assert parse_new_question("**New Question:** How many circles?\n\nExplanation: ...") == "How many circles?"
    assert parse_new_question("new question:\nCount the\nsquares.") == "Count the\nsquares."
    # a model that restates the format first: the last marker is the answer
    assert parse_new_question("Format is New Question: [..]\nNew Question: Which is red?") == "Which is red?"
    for bad in ("How many circles?", "New Question:", "New Question: }", "New Question: 12. 3", None, 7):
        assert parse_new_question(bad) is None, bad


def test_verdict_is_synthrl_rule():
    # c_ori = 15 of 16, t_min 4, delta 2: accepted iff 4 <= c_cand <= 13
    assert [verdict(c, 15, 4, 2) for c in (3, 4, 13, 14, 16)] == \
        ["unsolvable", "accepted", "accepted", "not_harder", "not_harder"]
    assert verdict(4, 5, 4, 2) == "not_harder"       # a seed solved 5 times leaves no room: never accepted


def test_pass_count_uses_equivalence_and_last_box():
    texts = ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "so \\boxed{3} no, \\boxed{1/2}", "1/2", "\\boxed{2/4}"]
    assert pass_count(texts, "\\frac{1}{2}") == 3     # "2/4" is not accepted (MathRuler: unreduced fraction)


def test_same_question_ignores_case_and_punctuation():
    assert same_question("How many circles?", "how many  circles")
    assert not same_question("How many circles?", "How many squares?")


def test_read_rows_drops_a_torn_last_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "pa')
    assert [r["id"] for r in read_rows(str(p))] == [1, 2]


# -- end to end on the tiny models -----------------------------------------------------------------------------------

def _cfg(out, model, **kw):
    # N = 8 and thresholds scaled down from 16/12/4/2 so that the tiny model's chance-level pass counts select seeds
    base = dict(out_dir=out, model=model, shapes_n=16, num_rollouts=8, max_new_tokens=24, select_min=3, t_min=1,
                delta=1, attempts=3, synth_prefill="New Question:", synth_max_tokens=24)
    return SynthConfig(**{**base, **kw})


def _snapshot(out):
    names = ("passrate.jsonl", "candidates.jsonl", "verified.jsonl")
    return {n: open(os.path.join(out, n)).read() for n in names if os.path.exists(os.path.join(out, n))}


@pytest.mark.slow
def test_synth_run_end_to_end_rows_pass_the_verify_rule_and_resume(tmp_path, math_model):
    out = str(tmp_path / "s")
    cfg = _cfg(out, math_model)
    stats = synth.main(cfg)
    seeds = {s.id: s for s in synth.load_seeds(cfg)}
    rows = read_data(os.path.join(out, "synth.jsonl"), "math")      # strict: every row is valid train.py data
    originals = [r for r in rows if not r.parent_id]
    variants = [r for r in rows if r.parent_id]
    assert {r.id for r in originals} == set(seeds)                     # augment mode keeps every seed
    assert variants, stats
    rates = {r["id"]: r["pass_count"] for r in read_rows(os.path.join(out, "passrate.jsonl"))}
    for v in variants:
        seed, m = seeds[v.parent_id], v.meta
        assert v.answer == seed.answer and v.image == seed.image and v.generation == 1
        assert rates[seed.id] == m["seed_pass_count"] >= cfg.select_min
        assert cfg.t_min <= m["pass_count"] <= m["seed_pass_count"] - cfg.delta
        assert not same_question(v.problem, seed.problem) and 1 <= m["attempts"] <= cfg.attempts
    verified = read_rows(os.path.join(out, "verified.jsonl"))
    assert stats["candidates"] == stats["verified"] == len(verified)
    for r in verified:     # every verdict follows the rule from its recorded counts
        if r["pass_count"] is not None:
            assert r["verdict"] == verdict(r["pass_count"], r["seed_pass_count"], cfg.t_min, cfg.delta)
    # no seed is tried after it got a variant, nor more than `attempts` times
    for sid in {r["seed_id"] for r in verified}:
        tries = sorted(r["attempt"] for r in verified if r["seed_id"] == sid)
        ok = [r["attempt"] for r in verified if r["seed_id"] == sid and r["verdict"] == "accepted"]
        assert tries == list(range(len(tries))) and len(tries) <= cfg.attempts
        assert not ok or ok == [tries[-1]]
    # rerun: every stage finds its work done and generates nothing
    before = _snapshot(out)
    assert synth.main(cfg) == stats and _snapshot(out) == before
    # a run killed mid-write (torn last line) redoes just that item
    with open(os.path.join(out, "verified.jsonl")) as f:
        lines = f.readlines()
    with open(os.path.join(out, "verified.jsonl"), "w") as f:
        f.writelines(lines[:-1] + [lines[-1][:10]])
    synth.main(cfg)
    after = read_rows(os.path.join(out, "verified.jsonl"))
    key = lambda r: (r["seed_id"], r["attempt"])
    assert [key(r) for r in after] == [key(json.loads(l)) for l in lines]   # redone once (freshly sampled)


@pytest.mark.slow
def test_selfq_writes_unlabelled_questions_once(tmp_path, math_model):
    out = str(tmp_path / "q")
    for mode in ("in-context", "direct"):
        cfg = _cfg(out, math_model, stage="selfq", mode=mode, shapes_n=6, questions_per_image=2)
        synth.main(cfg)
        path = os.path.join(out, f"selfq_{mode}.jsonl")
        rows = read_data(path, "math")
        rejected = read_rows(path + ".rejected")
        assert len(rows) + len(rejected) == 12 and rows
        assert all(r.answer is None and r.meta["synth_method"] == mode and r.parent_id for r in rows)
        before = open(path).read()
        synth.main(cfg)
        assert open(path).read() == before


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-qwen3-vl", "tiny-glm4v", "tiny-internvl"])
def test_synthrl_and_mm_upt_run_on_other_families(tmp_path, model):
    """The math pipelines have no boxes: any family that generates text runs them. SynthRL's whole chain and MM-UPT's
    self-generated questions on Qwen3-VL, GLM-4.1V (its own stop tokens) and InternVL (crops) (random weights: what
    they write is noise, but every stage completes and every row lands in its file or its .rejected)."""
    out = str(tmp_path / "chain")
    stats = synth.main(_cfg(out, model, shapes_n=4, num_rollouts=4, select_min=0, t_min=0))
    assert os.path.exists(os.path.join(out, "passrate.jsonl")) and stats is not None
    out = str(tmp_path / "selfq")
    synth.main(_cfg(out, model, stage="selfq", mode="direct", shapes_n=3, questions_per_image=1))
    path = os.path.join(out, "selfq_direct.jsonl")
    assert len(read_rows(path)) + len(read_rows(path + ".rejected")) == 3


class _FakeOpenAI(BaseHTTPRequestHandler):
    """Stands in for a remote OpenAI-compatible endpoint: records requests, answers in its schema."""
    requests, fail = [], False

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        if type(self).fail:
            self.send_response(500)
            self.end_headers()
            return
        out = json.dumps({"choices": [{"message": {"content": "**New Question:** Count every shape twice, then "
                                                                "halve the total. What do you get?"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_api_synthesizer_never_sees_the_answer_and_failures_are_retried_later(tmp_path, monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_KEY", "sk-test")
    monkeypatch.setattr(synth.time, "sleep", lambda s: None)
    out = str(tmp_path / "api")
    cfg = SynthConfig(stage="synthesize", out_dir=out, shapes_n=4, api_url=f"http://127.0.0.1:{srv.server_port}/v1",
                      api_model="judge-7b", api_key_env="TEST_KEY", select_min=0)
    seeds = synth.load_seeds(cfg)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "passrate.jsonl"), "w") as f:     # pass counts as if measured
        for s in seeds:
            f.write(json.dumps({"id": s.id, "pass_count": 16, "n": 16, "answers": []}) + "\n")
    _FakeOpenAI.fail = True
    synth.main(cfg)
    assert read_rows(os.path.join(out, "candidates.jsonl")) == []   # nothing recorded: the rerun will try again
    _FakeOpenAI.fail, _FakeOpenAI.requests = False, []
    synth.main(cfg)
    cands = read_rows(os.path.join(out, "candidates.jsonl"))
    assert len(cands) == 4 and all(c["question"].startswith("Count every shape twice") for c in cands)
    path, headers, body = _FakeOpenAI.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-7b" and body["messages"][0]["role"] == "system"
    image, text = body["messages"][1]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    by_q = {s.problem: s for s in seeds}
    asked = [q for q in by_q if q in text["text"]]
    assert asked and text["text"] == synth.HARDER_PROMPT.format(question=asked[0])
    assert "answer" not in text["text"].lower().replace("same answer", "")       # the answer is withheld
    srv.shutdown()


class _ScriptedModels:
    """A synthesizer that appends ' Harder.' to the question it is shown, and a target whose pass count on a question
    is scripted by how many times it was made harder: the rounds of synth.py without a model."""

    def __init__(self, passes):
        self.passes, self.shown = passes, []

    def write(self, samples, texts, seed, model=""):
        self.shown += texts
        questions = [t.split("Original Question:\n")[1].split("\n\n")[0] for t in texts]
        return [f"New Question: {q} Harder." for q in questions]

    def answer(self, samples, n, seed):
        k = [self.passes[s.problem.count("Harder.")] for s in samples]
        return [[f"\\boxed{{{s.answer}}}"] * c + ["\\boxed{999}"] * (n - c) for s, c in zip(samples, k)]


@pytest.mark.parametrize("keep, rounds, kept_pass", [("first", 1, 10), ("hardest", 3, 6)])
def test_keep_first_is_the_papers_algorithm_and_keep_hardest_the_released_codes_chain(tmp_path, keep, rounds, kept_pass):
    """--keep first stops at a seed's first accepted variant; --keep hardest (SynthRL's released code) tries every
    round, each rewriting the latest accepted variant, and keeps the accepted one with the lowest pass count."""
    cfg = SynthConfig(stage="run", out_dir=str(tmp_path), shapes_n=1, select_min=0, attempts=3, keep=keep)
    seeds = synth.load_seeds(cfg)
    rates = {seeds[0].id: {"pass_count": 16}}
    models = _ScriptedModels(passes={1: 10, 2: 6, 3: 2})   # made harder once: 10 of 16, twice: 6, three times: 2
    for _ in range(3):
        synth.synthesize(cfg, models, seeds)
        synth.verify(cfg, models, seeds, rates)
    verified = read_rows(os.path.join(str(tmp_path), "verified.jsonl"))
    assert [r["verdict"] for r in verified] == ["accepted", "accepted", "unsolvable"][:rounds]
    if keep == "hardest":   # each round was shown the latest accepted variant
        assert models.shown[1].count("Harder.") == 1 and models.shown[2].count("Harder.") == 2
    rows = [json.loads(line) for line in open(synth.export(cfg, seeds, rates))]
    assert [r["meta"].get("pass_count") for r in rows] == [16, kept_pass]


def test_cli_parses_every_field_and_rejects_bad_values(tmp_path, capsys):
    from synth import main, parse_args
    cfg = parse_args(["selfq", "--mode", "direct", "--num-rollouts", "4", "--out-dir", str(tmp_path / "o")])
    assert (cfg.stage, cfg.mode, cfg.num_rollouts) == ("selfq", "direct", 4)
    for bad in (["run", "--mode", "sideways"], ["nonsense"], ["run", "--export-mode", "all"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(SystemExit, match="no such file"):
        main(parse_args(["run", "--data", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "o")]))
    assert not (tmp_path / "o").exists()


def test_synth_takes_a_config_file_like_every_program(tmp_path):
    from synth import parse_args
    (tmp_path / "s.yaml").write_text("num_rollouts: 8\nt_min: 2\n")
    cfg = parse_args(["verify", "--config", str(tmp_path / "s.yaml"), "--t-min", "3"])
    assert (cfg.stage, cfg.num_rollouts, cfg.t_min) == ("verify", 8, 3)


def test_counts_out_of_range_and_changed_settings_stop_before_anything_is_made(tmp_path):
    """synth.py passrate --num-rollouts 0 wrote n = 0 rows that a corrected rerun in the same out-dir then reused."""
    out = str(tmp_path / "o")
    for bad in (dict(num_rollouts=0), dict(t_min=20), dict(batch=0), dict(temperature=0)):
        with pytest.raises(SystemExit, match="synth.py: "):
            synth.main(SynthConfig(out_dir=out, **bad))
    assert not os.path.exists(out)
    os.makedirs(out)
    synth.keep_settings(SynthConfig(out_dir=out, num_rollouts=2))
    synth.keep_settings(SynthConfig(out_dir=out, num_rollouts=2, stage="verify", batch=4))   # neutral: no change
    with pytest.raises(SystemExit) as e:
        synth.keep_settings(SynthConfig(out_dir=out, num_rollouts=16, model="tiny-qwen-vocab"))
    assert str(e.value) == (f"synth.py: {out} holds rows made with other settings: --model tiny-qwen-vocab (its rows: "
                            "tiny), --num-rollouts 16 (its rows: 2); give another --out-dir")
