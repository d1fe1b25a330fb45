import csv
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/dense_reference.py
sys.path.insert(0, str(ROOT))  # train.py

SHARED_DATA = Path(os.environ.get("DIFFORMER_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def planetoid_root(tmp_path):
    """A writable copy of the Planetoid raw files from shared/data (read-only there)."""
    source = SHARED_DATA / "planetoid"
    if not source.is_dir():
        pytest.fail(f"test data not found at {source}: set DIFFORMER_TEST_DATA to the shared data folder")
    target = tmp_path / "planetoid"
    shutil.copytree(source, target)
    return target


def logged_epochs(run_dir: Path) -> dict:
    """``{epoch: {metric: value}}`` of a train.py run's CSV logs, over all log versions (a resumed run
    writes a new one)."""
    values = {}
    for path in sorted((Path(run_dir) / "logs").glob("version_*/metrics.csv")):
        with open(path) as file:
            for row in csv.DictReader(file):
                values.setdefault(int(row["epoch"]), {}).update({k: float(v) for k, v in row.items() if v})
    return values
