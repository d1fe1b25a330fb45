"""benchmarks/reproduce.py writes its result after every run, and benchmarks/table.py says when a result
stopped short of the runs it was planned for."""
import json
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, scaled_timeout


@pytest.mark.slow
def test_reproduce_writes_every_run_and_the_table_marks_a_stopped_one(tmp_path):
    out = tmp_path / "synthetic_s.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--config",
                           str(ROOT / "configs" / "synthetic.yaml"), "--runs", "2", "--out", str(out),
                           "--trainer.max_epochs", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=scaled_timeout(20))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["runs"]) == result["planned"] == 2 and result["over"] == "seeds"
    assert result["mean"] == round(statistics.mean(result["runs"]), 2)
    assert not (tmp_path / "runs").exists()  # each run trains in a temporary folder

    stopped = {**result, "over": "splits", "runs": result["runs"][:1], "planned": 5}
    (tmp_path / "toy_s.json").write_text(json.dumps(stopped))
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "table.py"), str(out),
                            str(tmp_path / "toy_s.json")], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| 2 (seeds 0..1) |" in table.stdout  # finished: no mark
    assert "(1 splits of 5 planned)" in table.stdout
