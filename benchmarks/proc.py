"""What a process tree uses, read from /proc (Linux): the benchmarks' one place for it.

* :func:`tree`: a process and all its live descendants (DDP ranks, DataLoader workers);
* :func:`memory_kb`: one process's RSS, PSS, private and anonymous memory;
* :func:`cpu_seconds`: user + system CPU of a tree;
* :class:`TreeSampler`: samples a tree in a thread while it runs: the largest anonymous memory any one of
  its processes reached, the largest summed PSS, and the byte counts of ``/proc/<pid>/io`` of the root.
"""
import os
import threading
from pathlib import Path
from typing import Dict, List, Optional

_TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> List[int]:
    """``pid`` and its live descendants."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid] + [p for child in children for p in tree(child)]


def memory_kb(pid: int) -> Dict[str, int]:
    """RSS, PSS, private (clean + dirty) and anonymous memory of ``pid`` in kB; empty once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    fields = {line.split(":")[0]: int(line.split()[1]) for line in lines}
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anonymous": fields["Anonymous"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    total = 0.0
    for member in tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError):
            pass
    return total


def io_bytes(pid: int) -> Dict[str, int]:
    """``/proc/<pid>/io``: ``write_bytes`` (bytes this process sent, or will send, to storage),
    ``cancelled_write_bytes`` (of those, the ones never written: files truncated or deleted while dirty) and
    ``read_bytes``."""
    try:
        lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(value) for key, value in (line.split(": ") for line in lines)}


def written_since(before: Dict[str, int], after: Dict[str, int]) -> int:
    """Bytes a process sent to storage between two :func:`io_bytes` readings, less those it cancelled (files
    deleted or truncated while still dirty: a spill file removed before writeback)."""
    return ((after.get("write_bytes", 0) - before.get("write_bytes", 0))
            - (after.get("cancelled_write_bytes", 0) - before.get("cancelled_write_bytes", 0)))


class TreeSampler:
    """Samples the tree of ``pid`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, pid: int, interval: float = 0.5, folder: Optional[Path] = None) -> None:
        self.pid, self.interval, self.folder = pid, interval, folder
        self.peak_process_anonymous_kb = 0
        self.peak_total_pss_kb = 0
        self.peak_folder_bytes = 0
        self.processes = 0
        self.cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            members = tree(self.pid)
            samples = [memory_kb(member) for member in members]
            samples = [s for s in samples if s]
            if samples:
                self.processes = max(self.processes, len(samples))
                self.peak_process_anonymous_kb = max(self.peak_process_anonymous_kb,
                                                     max(s["anonymous"] for s in samples))
                self.peak_total_pss_kb = max(self.peak_total_pss_kb, sum(s["pss"] for s in samples))
                self.cpu = max(self.cpu, cpu_seconds(self.pid))
            if self.folder is not None:
                self.peak_folder_bytes = max(self.peak_folder_bytes, folder_bytes(self.folder))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def folder_sizes(folder: Path) -> Dict[str, int]:
    """Bytes allocated on disk (``allocated``) and apparent bytes (``apparent``) of every file under ``folder``
    (0 when it does not exist)."""
    allocated = apparent = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                status = os.stat(os.path.join(root, name))
            except OSError:
                continue
            allocated, apparent = allocated + status.st_blocks * 512, apparent + status.st_size
    return {"allocated": allocated, "apparent": apparent}


def folder_bytes(folder: Path) -> int:
    """Bytes allocated on disk by every file under ``folder`` (0 when it does not exist)."""
    return folder_sizes(folder)["allocated"]
