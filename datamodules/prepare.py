"""Preparing a dataset once per machine: one process downloads or converts, the others wait and reuse it.

Lightning calls ``prepare_data`` on one process per machine, but two runs (two jobs, or a test and a run)
can prepare the same dataset at once; a file lock beside the output serialises them, and a conversion
killed half-way leaves only a temporary folder (the store writers rename when complete), so the next
process converts again instead of using half a store.
"""
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union


@contextmanager
def exclusive(path: Union[str, Path]) -> Iterator[None]:
    """Holds an exclusive lock on ``<path>.lock`` (created beside ``path``) for the block; other processes
    wait. The lock goes with the process, so a killed holder never blocks the next one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def prepare_store_once(path: Union[str, Path], build: Callable[[Path], object]) -> bool:
    """Calls ``build(path)`` (which writes a graph store there) unless a complete store is already there,
    holding the lock; returns whether this process built it."""
    from .store import GraphStore, StoreError

    path = Path(path)
    with exclusive(path):
        if (path / "meta.json").is_file():
            try:
                GraphStore.open(path, validate=False)
                return False
            except StoreError:
                pass  # damaged: written again below
        build(path)
        return True
