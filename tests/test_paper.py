"""experiments/paper.py at its smallest setting, so that the script behind Table 1 in miniature cannot rot; and its
statistics, gate and work-dir guard as pure functions."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import paper  # noqa: E402


@pytest.mark.slow
def test_table1_in_miniature_runs_every_row_and_writes_its_results(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    argv = ["--seeds", "1", "--steps", "2", "--sft-steps", "10", "--sft-chunk", "5", "--sft-max-chunks", "1",
            "--shapes-n", "8", "--oracle-copies", "2", "--eval-n", "4", "--work-dir", str(work), "--out", str(out)]
    with pytest.raises(SystemExit, match="the gate failed on seed 0"):   # 10 SFT steps: no near-OOD gap to close
        paper.main(argv)
    assert json.loads((out / "gate.json").read_text())["gate"]["passed"] is False
    assert not (work / "seed0" / "Syn_GRPO").exists()                   # no method row ran after a failed gate
    paper.main(argv + ["--ignore-gate"])
    table = json.loads((out / "table1.json").read_text())
    assert [r["method"] for r in table["rows"]] == list(paper.ROWS)
    for r in table["rows"]:
        assert r["seeds"] == 1 and all(0 <= r[k]["mean"] <= 1 and r[k]["se"] == 0 for k in paper.SPLITS)
    assert len(table["contrasts"]) == len(paper.CONTRASTS) * len(paper.SPLITS)
    warm = table["warm_starts"]["0"]
    assert [h["sft_steps"] for h in warm["history"]] == [10, 15] and set(warm["four_tag"]) == set(paper.SPLITS)
    runs = table["runs"]["0"]
    assert runs["GRPO + Offline Generation"]["images_synthesized"] == 8          # one a sample, before step 0
    assert runs["GRPO"]["images_synthesized"] == 0 and runs["GRPO"]["batch_synth_frac"] == 0
    pools = {name: json.loads((work / "seed0" / paper.slug(name) / "pool.json").read_text())
             for name in ("Oracle (gate)", "GRPO + cheap augmentation")}
    assert all(len(p["slots"]) == 8 * (1 + 2) for p in pools.values())         # the originals and 2 copies each
    for name in ("fig2_entropy_variance.png", "fig8_description_families.png"):
        assert (out / name).stat().st_size > 5000
    with pytest.raises(SystemExit, match="holds runs of other settings"):      # never a silently mixed table
        paper.main([*argv, "--steps", "3"])
    settings = work / "settings.json"                                         # nor a stale one: runs of other code
    settings.write_text(json.dumps(dict(json.loads(settings.read_text()), code="0000000")))
    with pytest.raises(SystemExit, match="code 0000000 -> "):
        paper.main(argv)


def test_paired_differences_and_their_standard_error():
    per_seed = {s: {"scores": {"A": {"near_ood": a}, "B": {"near_ood": b}}} for s, (a, b) in
                enumerate([(0.5, 0.3), (0.4, 0.3), (0.6, 0.3)])}
    c = paper.paired(per_seed, "A", "B", "near_ood")
    assert c["per_seed"] == pytest.approx([0.2, 0.1, 0.3]) and c["mean"] == pytest.approx(0.2)
    assert c["se"] == pytest.approx(0.1 / 3 ** 0.5)                           # sample std 0.1 over sqrt(3) seeds


def test_the_gate_needs_a_near_ood_gap_and_an_oracle_that_closes_half_of_it():
    s = lambda i, n: {"in_domain": i, "near_ood": n}
    assert paper.gate({"Original": s(0.8, 0.4), "Oracle (gate)": s(0.8, 0.65)})["passed"]
    assert not paper.gate({"Original": s(0.8, 0.4), "Oracle (gate)": s(0.8, 0.55)})["passed"]    # 37 % recovered
    assert not paper.gate({"Original": s(0.8, 0.7), "Oracle (gate)": s(0.8, 0.8)})["passed"]     # a 10-point gap


def test_the_oracle_speaks_the_synthesizers_whole_vocabulary():
    import random

    from procedural import FAMILIES, describe
    rng = random.Random(0)
    assert {describe(paper.oracle_description(rng)).family for _ in range(200)} == set(FAMILIES)


def test_rows_are_named_as_in_the_table_and_a_wrong_name_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--rows: no row 'Syn-GRPO, four-tag'; the rows: Original; SFT; GRPO;"):
        paper.main(["--rows", "GRPO;Syn-GRPO, four-tag", "--work-dir", str(tmp_path)])
    assert set(paper.QUICK_ROWS) <= set(paper.ROWS) and not os.listdir(tmp_path)   # nothing run, nothing written
