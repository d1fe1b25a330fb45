"""A store's full check runs once (when written, or at the first open) and is recorded with the files it passed
on; later opens check the metadata only, a changed file is checked again, and store_check='full' forces it."""
import os

import numpy as np
import pytest

import datamodules.store as store_module
from datamodules import GraphStore, RandomPartitionDataModule
from datamodules.store import VALIDATED, StoreError, fingerprint
from datamodules.synthetic import write_synthetic_store


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = store_module.validate_store

    def validate(store):
        calls.append(store.path)
        return original(store)

    monkeypatch.setattr(store_module, "validate_store", validate)
    return calls


def test_a_written_store_is_checked_once_and_later_opens_read_only_its_metadata(tmp_path, counted):
    path = write_synthetic_store(tmp_path / "store", 500, num_classes=3)
    assert len(counted) == 1  # the writer's full check, recorded
    store = GraphStore.open(path)
    assert store.meta[VALIDATED] == fingerprint(path, store.meta)
    GraphStore.open(path)
    RandomPartitionDataModule(str(path), batch_size=100).store
    assert len(counted) == 1
    GraphStore.open(path, validate="full")
    RandomPartitionDataModule(str(path), batch_size=100, store_check="full").store
    assert len(counted) == 3


def test_a_store_without_a_record_is_checked_at_its_first_open_only(tmp_path, counted):
    path = write_synthetic_store(tmp_path / "store", 500, num_classes=3)
    meta = (path / "meta.json").read_text()
    (path / "meta.json").write_text(meta.replace(f'"{VALIDATED}"', '"validated_by_an_older_version"'))
    GraphStore.open(path)
    GraphStore.open(path)
    assert len(counted) == 2  # the writer's, then the first open's


def test_the_forced_check_finds_a_corrupted_col_that_kept_its_size_and_time(tmp_path):
    path = write_synthetic_store(tmp_path / "store", 500, num_classes=3)
    col = path / "col.npy"
    status = col.stat()
    array = np.load(col, mmap_mode="r+")
    array[7] = 10_000  # beyond the 500 nodes, in place: same size
    array.flush()
    del array
    os.utime(col, ns=(status.st_atime_ns, status.st_mtime_ns))  # and the same modification time
    GraphStore.open(path)  # the record still matches: not re-read
    with pytest.raises(StoreError, match=r"col holds node ids in \[.*10000\]"):
        GraphStore.open(path, validate="full")
    with pytest.raises(StoreError, match="col holds node ids"):
        RandomPartitionDataModule(str(path), batch_size=100, store_check="full").store
    os.utime(col)  # rewritten later: its new time voids the record, the next open checks again
    with pytest.raises(StoreError, match="col holds node ids"):
        GraphStore.open(path)


def test_store_check_values_are_named():
    with pytest.raises(ValueError, match="store_check must be 'once'"):
        RandomPartitionDataModule("x", store_check="always")
    with pytest.raises(ValueError, match="validate must be True, False, 'once' or 'full'"):
        GraphStore.open("x", validate="sometimes")


def test_the_full_check_counts_self_loops_and_the_exact_pass_skips_its_degree_reads_without_them(tmp_path):
    """A store without self loops gets its degrees from rowptr alone; the states are the same as when the
    count is unknown (the pass then reads every edge to find them); a store with loops records their count."""
    import json

    import torch

    from datamodules.store import write_store_from_data
    from difformer_lightning import DIFFormer
    from difformer_lightning.streaming import Scratch, exact_states
    from test_exact import awkward_graph

    plain = write_synthetic_store(tmp_path / "plain", 400, num_classes=3)
    assert GraphStore.open(plain).self_loops == 0
    looped = write_store_from_data(awkward_graph(), tmp_path / "looped")
    assert GraphStore.open(looped).self_loops == 4  # node 3 three times, node 5 once
    model = DIFFormer(64, 8, 3, num_layers=2).eval()
    states = []
    for known in (True, False):
        if not known:  # as a store checked before the count existed: unknown, so the pass looks for loops
            meta = json.loads((plain / "meta.json").read_text())
            del meta["self_loops"]
            store = GraphStore.open(plain, validate=False)
            store.meta = meta
        else:
            store = GraphStore.open(plain)
        scratch = Scratch(tmp_path)
        states.append(exact_states(model, store, 64, scratch).rows(slice(0, 400)))
        scratch.close()
    assert store.self_loops is None
    assert torch.equal(states[0], states[1])


def test_a_store_array_larger_than_the_hosts_memory_is_mapped(tmp_path):
    """papers100M's 28 GB feature file could not be mapped copy-on-write on the 24 GB rehearsal host (ENOMEM: a
    private mapping is charged against the commit limit at its full size); a store maps its arrays shared and
    read-only. A sparse file twice this host's memory (no disk used) stands in for it."""
    import numpy as np
    from datamodules.store import _map_array
    from difformer_lightning.io import read_only_tensor
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = 2 * memory // (128 * 2) + 1
    path = tmp_path / "x.npy"
    created = np.lib.format.open_memmap(path, "w+", np.float16, (rows, 128))  # sparse: a hole, not written data
    del created
    spec = {"dtype": "float16", "shape": [rows, 128], "bytes": path.stat().st_size}
    tensor = read_only_tensor(_map_array(tmp_path, "x", spec))
    assert tensor.shape == (rows, 128) and float(tensor[-1, -1]) == 0.0
    path.unlink()
