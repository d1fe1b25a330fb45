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
        original(store)

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
