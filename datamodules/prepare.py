"""Preparing a dataset once per machine: one process downloads or converts, the others wait and reuse it.

Lightning calls ``prepare_data`` on one process per machine, but two runs (two jobs, or a test and a run)
can prepare the same dataset at once; a file lock beside the output serialises them, and a conversion
killed half-way leaves only a temporary folder (the store writers rename when complete), so the next
process converts again instead of using half a store.

Derived data (a converted graph store, PyG's ``processed/`` folder) records the identity of the raw files it
came from (:func:`source_identity`) and is rebuilt, with a line naming what changed, when they change: a
replaced ``.mat`` file, a fixed OGB label file, a new PyG raw file.
"""
import datetime
import fcntl
import hashlib
import inspect
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from lightning.pytorch.utilities import rank_zero_info

from difformer_lightning.io import write_json_atomic

# The file beside derived data that records its sources' identity.
SOURCE_RECORD = "source.json"
# Files up to this size are hashed whole; larger ones (papers100M's raw arrays: GBs) by their size and a hash
# of their first, middle and last MiB, which a copy to another folder keeps and a replaced or re-written file
# changes (a change confined to other bytes that keeps the size is not seen there).
HASH_WHOLE_LIMIT = 64 << 20
_SAMPLE = 1 << 20


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


def _digest(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= HASH_WHOLE_LIMIT:
            for block in iter(lambda: handle.read(_SAMPLE), b""):
                digest.update(block)
        else:
            for offset in (0, size // 2, size - _SAMPLE):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()


def source_identity(base: Union[str, Path], files: Iterable[Union[str, Path]]) -> Dict[str, dict]:
    """``{path relative to base: {"size", "mtime_ns", "sha256"}}`` of the files that exist (see
    :data:`HASH_WHOLE_LIMIT` for what the hash covers); keyed relative to ``base`` so that moving the data
    folder changes nothing."""
    base, identity = Path(base), {}
    for file in sorted({Path(f) for f in files}):
        if file.is_file():
            stat = file.stat()
            name = str(file.relative_to(base)) if file.is_relative_to(base) else file.name
            identity[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _digest(file, stat.st_size)}
    return identity


def _when(mtime_ns: int) -> str:
    return datetime.datetime.fromtimestamp(mtime_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def source_changes(recorded: Dict[str, dict], current: Dict[str, dict]) -> List[str]:
    """What differs between two :func:`source_identity` records, a phrase per file: files changed or added.
    Recorded files that are gone are not a change (raw files may be deleted once converted)."""
    changes = []
    for name, now in current.items():
        before = recorded.get(name)
        if before is None:
            changes.append(f"{name} is new")
        elif before.get("sha256") != now["sha256"] or before.get("size") != now["size"]:
            changes.append(f"{name} changed (size {before.get('size', '?'):,} -> {now['size']:,} bytes, modified "
                           f"{_when(before['mtime_ns']) if 'mtime_ns' in before else '?'} -> {_when(now['mtime_ns'])})")
    return changes


def stale_sources(record: Path, base: Path, files: Iterable[Path]) -> Tuple[Optional[List[str]], Dict[str, dict]]:
    """``(changes, identity now)``: ``changes`` is ``None`` when ``record`` does not exist, else the phrases of
    :func:`source_changes` (empty when nothing changed)."""
    current = source_identity(base, files)
    if not record.is_file():
        return None, current
    try:
        recorded = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"its record {record} is unreadable"], current
    return source_changes(recorded, current), current


def write_source_record(record: Path, identity: Dict[str, dict]) -> None:
    write_json_atomic(record, {"files": identity})


def prepare_store_once(path: Union[str, Path], build: Callable[[Path], object],
                       sources: Optional[Callable[[], Tuple[Path, List[Path]]]] = None) -> bool:
    """Calls ``build(path)`` (which writes a graph store there) unless a complete store built from the
    current sources is already there, holding the lock; returns whether this process built it.

    ``sources`` returns ``(base folder, raw files)``: their identity is recorded in ``<path>/source.json``
    after a build; when they changed since (a file replaced or added), the store is built again and a line
    says which file changed and how. A store without a record (written by an earlier version) records the
    files as they are now, saying so."""
    from .store import GraphStore, StoreError

    path = Path(path)
    record = path / SOURCE_RECORD
    with exclusive(path):
        if (path / "meta.json").is_file():
            try:
                GraphStore.open(path, validate=False)
            except StoreError:
                pass  # damaged: written again below
            else:
                if sources is None:
                    return False
                changes, current = stale_sources(record, *sources())
                if changes is None:
                    if current:
                        write_source_record(record, current)
                        rank_zero_info(f"{path}: no record of the raw files it was converted from (an earlier "
                                       f"version wrote it); recorded them as they are now. Delete the folder to "
                                       f"convert again if they changed since.")
                    return False
                if not changes:
                    return False
                rank_zero_info(f"rebuilding {path}: its raw files changed since it was converted: "
                               f"{'; '.join(changes)}")
        build(path)
        if sources is not None:
            write_source_record(record, source_identity(*sources()))
        return True


def load_pyg_dataset(dataset_class: type, folder: Union[str, Path], **kwargs):
    """``dataset_class(root=folder, **kwargs)`` (a ``torch_geometric.datasets`` class) under a lock, processed
    again when its raw files (``raw_paths``) changed since its ``processed/`` folder was written: PyG itself
    reprocesses only when its pre-transform or pre-filter change. The raw files' identity is recorded in
    ``<processed_dir>/source.json``; reprocessing uses PyG's public ``force_reload`` (or, for a class
    without it, removes the ``processed_paths`` first) and says which file changed."""
    folder = Path(folder)
    with exclusive(folder / ".pyg"):
        dataset = dataset_class(root=str(folder), **kwargs)
        record = Path(dataset.processed_dir) / SOURCE_RECORD
        changes, current = stale_sources(record, Path(dataset.raw_dir), dataset.raw_paths)
        if changes:
            rank_zero_info(f"processing {dataset_class.__name__} in {dataset.processed_dir} again: its raw files "
                           f"changed since it was processed: {'; '.join(changes)}")
            if "force_reload" in inspect.signature(dataset_class.__init__).parameters:
                dataset = dataset_class(root=str(folder), force_reload=True, **kwargs)
            else:
                for processed in dataset.processed_paths:
                    Path(processed).unlink(missing_ok=True)
                dataset = dataset_class(root=str(folder), **kwargs)
        if changes is None or changes:
            write_source_record(record, current)
        return dataset
