"""experiments/paper.py at its smallest setting, so that the script behind the README's Table 1 cannot rot."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_table1_in_miniature_runs_every_row_and_writes_its_results(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import paper
    out = tmp_path / "results"
    paper.main(["--seeds", "1", "--steps", "2", "--sft-steps", "10", "--shapes-n", "8", "--eval-n", "4",
                "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    table = json.loads((out / "table1.json").read_text())
    assert [r["method"] for r in table["rows"]] == list(paper.ROWS)
    for r in table["rows"]:
        assert r["seeds"] == 1 and set(r["in_domain"]) == set(r["out_of_domain"]) == {"mean", "std"}
        assert 0 <= r["in_domain"]["mean"] <= 1 and 0 <= r["out_of_domain"]["mean"] <= 1
    # the table, Syn-GRPO's own warm start, and each row's gain over its warm start
    assert (out / "table1.md").read_text().count("\n| ") == (1 + len(paper.ROWS) + 1) + (1 + len(paper.ROWS) - 1)
    assert (out / "fig2_entropy_diversity.png").stat().st_size > 5000
    offline = tmp_path / "work" / "seed0" / "GRPO_plus_Offline_Generation" / "pool.json"
    assert '"generation": 1' in offline.read_text()                  # its images were made before training
