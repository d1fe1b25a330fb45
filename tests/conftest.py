"""Shared test helpers: where the real datasets are, how long a subprocess may take, the runs' logs.

Real datasets are looked up, per dataset folder (laid out as ``shared/data``: ``planetoid``, ``temporal``,
``heterophilous``, ``actor``, ``webkb``, ``linkx``, ``ogb_format``), in this order: ``$DIFFORMER_TEST_DATA``;
``../shared/data`` beside the checkout; a per-user cache (``~/.cache/difformer-lightning/test-data``) that
the project's own loaders fill from the datasets' public sources on first use. Where none has it and it
cannot be downloaded, the tests that need it are skipped, and one line at the end names the missing
datasets and how to provide them; with ``CI=true`` a missing dataset fails those tests instead.
"""
import csv
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/dense_reference.py
sys.path.insert(0, str(ROOT))  # train.py

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difformer-lightning" / "test-data"
ON_CI = os.environ.get("CI", "").lower() == "true"


def _roots():
    roots = [Path(os.environ["DIFFORMER_TEST_DATA"])] if os.environ.get("DIFFORMER_TEST_DATA") else []
    return roots + [ROOT.parent / "shared" / "data", CACHE]


def _fetch_planetoid(folder: Path) -> None:
    from torch_geometric.datasets import Planetoid
    for name in ("Cora", "CiteSeer"):
        Planetoid(str(folder), name)


def _fetch_temporal(folder: Path) -> None:
    from datamodules import TemporalDataModule
    for name in ("chickenpox", "england_covid"):
        TemporalDataModule(name, root=str(folder.parent)).prepare_data()


def _fetch_pyg(folder: Path, dataset: str, names) -> None:
    import torch_geometric.datasets as datasets
    for name in names:
        getattr(datasets, dataset)(str(folder), **({"name": name} if name else {}))


def _derive_ogb_cora(folder: Path) -> None:
    """Planetoid's Cora written in OGB's raw CSV layout (as ``shared/data/ogb_format`` holds it): each
    undirected edge once, headerless gzipped CSV files, the Planetoid split under ``split/planetoid``. Written
    with numpy alone, not with the project's code, so the OGB reader is checked against an independent file."""
    import json
    import tempfile

    import numpy as np
    from torch_geometric.datasets import Planetoid
    with tempfile.TemporaryDirectory() as scratch:  # Planetoid writes processed/ beside raw/
        shutil.copytree(data_folder("planetoid") / "Cora", Path(scratch) / "Cora")
        cora = Planetoid(scratch, "Cora")[0]
    source, target = cora.edge_index.numpy()
    edges = np.stack([source, target], 1)[source < target]
    target_folder = folder / "ogbn_cora"
    partial = folder / "ogbn_cora.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "raw").mkdir(parents=True)
    (partial / "split" / "planetoid").mkdir(parents=True)

    def write(name: str, rows, fmt: str) -> None:
        np.savetxt(partial / name, np.asarray(rows), fmt=fmt, delimiter=",")  # .gz: numpy compresses

    write("raw/edge.csv.gz", edges, "%d")
    write("raw/node-feat.csv.gz", cora.x.numpy(), "%.1f")
    write("raw/node-label.csv.gz", cora.y.numpy()[:, None], "%d")
    write("raw/num-node-list.csv.gz", [[cora.num_nodes]], "%d")
    write("raw/num-edge-list.csv.gz", [[len(edges)]], "%d")
    for split, mask in (("train", cora.train_mask), ("valid", cora.val_mask), ("test", cora.test_mask)):
        write(f"split/planetoid/{split}.csv.gz", mask.nonzero().numpy(), "%d")
    meta = {"dir_path": "<set to a writable copy of this folder>", "download_name": "ogbn_cora", "version": 1,
            "url": "none (offline)", "add_inverse_edge": "True", "has_node_attr": "True", "has_edge_attr": "False",
            "split": "planetoid", "additional node files": "None", "additional edge files": "None",
            "is hetero": "False", "binary": "False", "num tasks": 1, "num classes": 7,
            "task type": "multiclass classification", "eval metric": "acc"}
    (partial / "meta_dict.json").write_text(json.dumps(meta, indent=2))
    (partial / "RELEASE_v1.txt").write_text("derived from Planetoid Cora by tests/conftest.py\n")
    shutil.rmtree(target_folder, ignore_errors=True)
    partial.rename(target_folder)


# folder: (a file that shows the folder is complete, how to fetch or derive it)
DATASETS: Dict[str, tuple] = {
    "planetoid": ("CiteSeer/raw/ind.citeseer.graph", _fetch_planetoid),
    "temporal": ("england_covid.json", _fetch_temporal),
    "heterophilous": ("minesweeper/raw/minesweeper.npz",
                      lambda f: _fetch_pyg(f, "HeterophilousGraphDataset", ["Minesweeper"])),
    "actor": ("raw/out1_graph_edges.txt", lambda f: _fetch_pyg(f, "Actor", [None])),
    "webkb": ("wisconsin/raw/out1_graph_edges.txt", lambda f: _fetch_pyg(f, "WebKB", ["cornell", "texas", "wisconsin"])),
    "linkx": ("johnshopkins55/raw/data.mat",
              lambda f: _fetch_pyg(f, "LINKXDataset", ["reed98", "amherst41", "johnshopkins55"])),
    # Planetoid's Cora rewritten in OGB's raw layout: nothing public to download, derived from Planetoid
    "ogb_format": ("ogbn_cora/meta_dict.json", _derive_ogb_cora),
}
_MISSING: Dict[str, str] = {}
_FOUND: Dict[str, Path] = {}


def data_folder(name: str) -> Path:
    """The folder of dataset ``name`` (read-only: copy it before a loader writes into it), or the test is
    skipped (failed under ``CI=true``) when it is nowhere and cannot be downloaded."""
    if name in _FOUND:
        return _FOUND[name]
    marker, fetch = DATASETS[name]
    for root in _roots():
        if (root / name / marker).is_file():
            _FOUND[name] = root / name
            return _FOUND[name]
    if name not in _MISSING and fetch is not None:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)
        try:
            fetch(CACHE / name)
            if (CACHE / name / marker).is_file():
                _FOUND[name] = CACHE / name
                return _FOUND[name]
        except Exception as error:  # noqa: BLE001  no network, a moved file: the dataset is missing
            _MISSING[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            shutil.rmtree(CACHE / name, ignore_errors=True)  # no half-fetched folder left for the next run
        except (pytest.skip.Exception, pytest.fail.Exception):  # derived from a dataset that is missing
            _MISSING[name] = "derived from a missing dataset"
            shutil.rmtree(CACHE / name, ignore_errors=True)
        finally:
            socket.setdefaulttimeout(previous)
    _MISSING.setdefault(name, "not downloaded")
    message = f"dataset {name!r} not found ({_MISSING[name]}); see the summary line"
    if ON_CI:
        pytest.fail(f"{message} (CI=true: a missing dataset is an error)")
    pytest.skip(message)


def data_root(*names: str) -> Path:
    """A data root holding the datasets ``names`` (their folders side by side, as the loaders expect)."""
    roots = {data_folder(name).parent for name in names}
    return roots.pop() if len(roots) == 1 else _merged(names)


def _merged(names) -> Path:
    merged = CACHE.parent / "merged"
    for name in names:
        if not (merged / name).exists():
            shutil.copytree(data_folder(name), merged / name)
    return merged


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _MISSING:
        outcome = "failed (CI=true)" if ON_CI else "skipped"
        terminalreporter.write_line(
            f"datasets not found, tests needing them {outcome}: {', '.join(sorted(_MISSING))}. Provide them: set "
            f"DIFFORMER_TEST_DATA to a folder laid out as shared/data (docs/tests.md), or allow network access "
            f"(the first run downloads into {CACHE}); CI=true makes a missing dataset an error.", yellow=True)


@pytest.fixture
def planetoid_root(tmp_path):
    """A writable data root holding a copy of the Planetoid raw files (``<root>/planetoid/<Name>/raw``)."""
    shutil.copytree(data_folder("planetoid"), tmp_path / "planetoid")
    return tmp_path


# --- how long a subprocess may take ----------------------------------------------------------------------

def _slowdown() -> float:
    """How much slower this machine is now than the 2-core machine the tests were written on (at least 1):
    a fixed piece of work, timed once per session."""
    import torch
    a = torch.randn(384, 384)
    start = time.perf_counter()
    for _ in range(60):
        a = torch.tanh(a @ a * 1e-3)
    elapsed = time.perf_counter() - start
    return max(1.0, elapsed / 0.12)


_SLOWDOWN: Optional[float] = None


def scaled_timeout(seconds: float) -> float:
    """A subprocess timeout for work that takes ``seconds`` on the project's 2-core machine: scaled by this
    machine's measured slowdown, with a margin of 4 (a hang still ends, a slow machine still passes)."""
    global _SLOWDOWN
    if _SLOWDOWN is None:
        _SLOWDOWN = _slowdown()
    return 60 + 4 * seconds * _SLOWDOWN


def logged_epochs(run_dir: Path) -> dict:
    """``{epoch: {metric: value}}`` of a train.py run's CSV logs, over all log versions (a resumed run
    writes a new one)."""
    values = {}
    for path in sorted((Path(run_dir) / "logs").glob("version_*/metrics.csv")):
        with open(path) as file:
            for row in csv.DictReader(file):
                values.setdefault(int(row["epoch"]), {}).update({k: float(v) for k, v in row.items() if v})
    return values




# --- the suite writes nothing into the checkout -----------------------------------------------------------

_RUNS_BEFORE: Optional[set] = None


def pytest_sessionstart(session) -> None:
    global _RUNS_BEFORE
    _RUNS_BEFORE = set((ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else set()


def pytest_sessionfinish(session, exitstatus) -> None:
    """A test that runs train.py without ``--trainer.default_root_dir`` leaves a run folder in the user's
    checkout: that fails the session, naming the folders."""
    if _RUNS_BEFORE is None or not (ROOT / "runs").is_dir():
        return
    left = sorted(str(path.relative_to(ROOT)) for path in set((ROOT / "runs").iterdir()) - _RUNS_BEFORE)
    if left:
        print(f"\ntests left run folders in the checkout: {', '.join(left)} (give each train.py run in a test "
              "--trainer.default_root_dir under tmp_path)")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _own_run_folder_choice():
    """train.py records the run folder it chose in the environment (for the DDP ranks it starts); a test that
    calls ``main()`` in this process must not pass that choice on to the next test."""
    before = os.environ.pop("DIFFORMER_RUN_DIR", None)
    yield
    os.environ.pop("DIFFORMER_RUN_DIR", None)
    if before is not None:
        os.environ["DIFFORMER_RUN_DIR"] = before
