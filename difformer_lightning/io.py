"""Writing files so that an interruption never leaves a half-written one: the one helper every writer
of the project uses (checkpoints, JSON results, plots, predictions, logits, downloads).

A file is written under a temporary name in its own folder (``.<name>.tmp-<pid>-<random>``, which never
matches the final name nor Lightning's ``last*`` pattern), flushed to disk, renamed over the final name
(``os.replace``: atomic on POSIX within one file system), and the rename itself is flushed. A kill at any
moment leaves the previous file or the new one, never a mix; what a killed writer left is a temporary
name, removed on the next write of the same file.
"""
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

PathLike = Union[str, Path]


def staging_path(path: PathLike) -> Path:
    """A fresh temporary name beside ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish(staging: PathLike, path: PathLike) -> None:
    """Flushes ``staging`` (a complete file) to disk and renames it over ``path``, atomically; leftovers of
    killed writers of ``path`` are removed."""
    staging, path = Path(staging), Path(path)
    with open(staging, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)
    _fsync_directory(path.parent)
    remove_dead_staging(path)


def make_writable_folder(folder: PathLike) -> None:
    """Creates ``folder`` (and its parents) and writes and removes a temporary file there, so a folder that
    cannot be written is found before work is done; raises the ``OSError``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = staging_path(folder / "probe")
    probe.write_bytes(b"")
    probe.unlink()


def remove_dead_staging(path: PathLike) -> None:
    """Removes the temporary files of ``path`` (:func:`staging_path`) whose writing process is gone."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        if not _writer_alive(leftover):
            leftover.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_file(path) as handle: ...`` writes ``handle`` under a temporary name and publishes it
    as ``path`` when the block ends without an exception (and removes it when it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    try:
        with open(staging, mode) as handle:
            yield handle
            handle.flush()
        publish(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_json_atomic(path: PathLike, payload: Any) -> None:
    """Writes ``payload`` as indented JSON to ``path``, atomically."""
    with atomic_file(path, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def _writer_alive(staging: Path) -> bool:
    """Whether the process that named ``staging`` (``...tmp-<pid>-<random>``) still runs."""
    try:
        pid = int(staging.name.rsplit(".tmp-", 1)[1].split("-")[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(folder: Path) -> None:
    """Makes a rename in ``folder`` survive a power loss (a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def read_only_tensor(array):
    """``torch.from_numpy`` of a read-only memory-mapped array (``numpy.load(..., mmap_mode="r")``), without
    torch's warning that it does not support non-writable arrays: shared read-only mappings are how this
    project maps large files (a private copy-on-write one is charged against the kernel's commit limit at its
    full size: a 28 GB store array or 76 GB of logits cannot be mapped that way on a smaller host), and nothing
    writes into these tensors (a write would fault, not change the file)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)
