"""The forging report: every stage on the same test problems, intervals beside each figure, gates and wall time
per phase."""

import evomerge_fixtures
import pytest

from phases import forging_report as fr


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return evomerge_fixtures.build(tmp_path_factory.mktemp("report-models"))


def test_every_stage_answers_the_same_problems_of_every_skill(models):
    stages = [fr.Stage("a", models["a"]), fr.Stage("c", models["c"])]
    rows = fr.measure(stages, models["curriculum"], evomerge_fixtures.SEQ, per_skill=6)
    assert [r["stage"] for r in rows] == ["a", "c"]
    assert set(rows[0]["skills"]) == {"arithmetic", "kv_recall", "word_problem"}  # text has no answer to check
    for r in rows:
        assert all(n == 6 and 0 <= h <= n for h, n in r["skills"].values())
    with pytest.raises(ValueError, match="no thoughts"):  # a Cognate model cannot be scored with thoughts
        fr.measure([fr.Stage("a", models["a"], thoughts=True)], models["curriculum"], evomerge_fixtures.SEQ, 2)


def test_the_markdown_gives_intervals_means_gates_and_wall_times(tmp_path):
    rows = [{"stage": "cognate speed", "skills": {"arithmetic": [48, 50], "kv_recall": [0, 50]}},
            {"stage": "evomerge champion", "skills": {"arithmetic": [45, 50], "kv_recall": [40, 50]}}]
    phases = [fr.PhaseSummary("cognate", True, [], 251.4), fr.PhaseSummary("evomerge", False, ["accuracy_gain"], 60.2)]
    text = fr.write(tmp_path, rows, phases)
    assert (tmp_path / "report.md").read_text() == text and (tmp_path / "report.json").exists()
    lines = text.splitlines()
    assert "| stage | arithmetic | kv_recall | mean |" in lines
    assert "| cognate speed | 96.0% [87%, 99%] | 0.0% [0%, 7%] | 48.0% |" in lines
    assert "| evomerge champion | 90.0% [79%, 96%] | 80.0% [67%, 89%] | 85.0% |" in lines
    assert "| evomerge | FAIL | accuracy_gain | 60 s |" in lines and "| cognate | PASS | - | 251 s |" in lines
    linked = fr.markdown(rows, [fr.PhaseSummary("bitnet", False, ["speedup"], 70.0, "http://ui/flow-runs/flow-run/x")])
    assert "| [bitnet](http://ui/flow-runs/flow-run/x) | FAIL | speedup | 70 s |" in linked.splitlines()
    many = fr.markdown(rows, [fr.PhaseSummary("cognate", False, ["a", "b", "c", "d", "e"], 1.0)])
    assert "| cognate | FAIL | a, b, c and 2 more | 1 s |" in many.splitlines()  # the rest: the phase's own table
    stored = fr.markdown(rows, [])  # the store's table: no phase table, as no run's gates are in it
    assert "| phase | gates | failing | wall time |" not in stored and stored.rstrip().endswith("| 85.0% |")
