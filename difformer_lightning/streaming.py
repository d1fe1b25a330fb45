"""The exact forward pass of a DIFFormer over every node of a graph of any size, chunk by chunk.

DIFFormer-s attends over all nodes through a handful of global sums, so an exact forward pass over a
graph that fits no batch needs, per layer, one streaming pass that accumulates those sums
(:class:`~.attention.LinearAttentionStats`) and writes every node's values, and a second pass that
combines the sums with each chunk of queries, adds the graph term gathered over each target's in-edges,
and steps the state. DIFFormer-a's second pass sums each chunk of queries against every chunk of keys
(quadratic, so only on request); GCN and GAT need only the graph rows; the MLP neither. What a layer needs is
its kernel's to say (:class:`~.kernels.DiffusionKernel`: ``all_pairs``, ``needs_graph``, ``reads_edge_list``,
``streamed_arrays``, ``summarize``, ``attend``), so a kernel of one's own streams too.

Every piece of math is the model's own: :meth:`DIFFormer.encode`, :meth:`DIFFormerConv.project`, the kernel's
``summarize`` and ``attend``, :meth:`~DIFFormerConv.local` on :meth:`NormalizedGraph.rows`,
:meth:`~DIFFormerConv.combine` and :meth:`DIFFormer.step`; nothing here reads a weight.

Work and memory, whatever the size of the graph:

* Several processes (DDP ranks) share the work. The chunks are cut into :data:`STATISTICS_GROUPS` groups of
  consecutive chunks (fewer when there are fewer chunks), fixed by the number of chunks alone; rank ``r``
  of ``W`` streams groups ``r, r + W, ...``. Each group's statistics are summed in chunk order in float64
  by the one rank that owns it, into a table of one row per group that is all-reduced (each row has a
  single contributor, so the sum is exact) and added up in group order: the result is bitwise the same for
  any number of ranks, and the table's size (``groups x (H D (D + 2) + 3)`` float64, 33.8 MB at hidden 256)
  does not grow with the graph or the number of chunks.
* Layer states and values live in memory-mapped scratch arrays (:class:`Scratch`) that every rank of a
  machine maps (one copy in the page cache), with a barrier between passes; several machines need a
  scratch folder on a file system they all mount (``flush=True`` then writes each rank's rows back before
  every barrier). States and values are stored in the run's precision (16 bits under a 16-bit precision),
  every sum runs in float32 or wider.
* The graph term of a chunk reads its sources' values by one sparse product straight from the scratch file
  (on the CPU, 32-bit storage) or from the rows gathered to the device (an accelerator, 16-bit storage, or
  ``gather=True``); :func:`~.graph.sparse_matmul` keeps every offset of the product below 2**31.
"""
import atexit
import errno
import fcntl
import logging
import math
import mmap
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .contracts import GraphSource
from .graph import NormalizedGraph, accumulation_dtype, edge_targets, gcn_degree
from .io import publish, read_only_tensor, staging_path
from .model import DIFFormer
from .progress import Progress

log = logging.getLogger(__name__)

# Scratch arrays are allocated up front only when they take at most this share of the available memory: beyond
# it their pages could not all stay cached, and populating would write every byte to disk before the first chunk.
POPULATE_SHARE = 0.75

# Groups of consecutive chunks whose DIFFormer-s statistics are summed apart (see the module docstring): the
# table all-reduced per layer has this many rows, whatever the graph's size. 64 divides evenly among 1, 2, 4,
# 8, 16, 32 and 64 ranks.
STATISTICS_GROUPS = 64


def _identity(value):
    return value


def _nothing() -> None:
    return None


@dataclass
class Collectives:
    """How the processes of one exact pass cooperate: this one's ``rank`` of ``world_size``, a sum over
    all of them (``all_reduce``, returning the summed tensor), a ``barrier``, ``broadcast`` of a picklable
    object from rank 0, and whether writes must be flushed to a shared file system before a barrier.
    The defaults are one process. Lightning's strategy gives all of them (``reduce``, ``barrier``,
    ``broadcast``)."""

    rank: int = 0
    world_size: int = 1
    all_reduce: Callable[[Tensor], Tensor] = _identity
    barrier: Callable[[], None] = _nothing
    broadcast: Callable[[object], object] = _identity
    flush: bool = False


# --- the scratch arrays ----------------------------------------------------------------------------------

class ScratchError(RuntimeError):
    """The scratch folder of an exact pass is missing, not writable, or has too little free space."""


@dataclass(frozen=True)
class ArraySpec:
    """One scratch array: its shape and its dtype (bfloat16 is stored as 16-bit words)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def numpy_dtype(self) -> np.dtype:
        # numpy has no bfloat16: its 16-bit words are stored as uint16 and viewed as bfloat16 by torch
        return np.dtype(np.uint16) if self.dtype == torch.bfloat16 else np.dtype(str(self.dtype).replace("torch.", ""))


Layout = Dict[str, ArraySpec]


def scratch_layout(model: DIFFormer, num_nodes: int, storage_dtype: Optional[torch.dtype] = None) -> Layout:
    """The scratch arrays :func:`exact_states` needs for ``model`` over ``num_nodes`` nodes: the states
    ``h`` ``[N, hidden]`` (one array, updated in place: a rank reads and writes only its own chunks' states,
    and a chunk is read before its new state is written), the values (and DIFFormer-a's keys) ``[N, H, D]``
    that other chunks gather, and the graph term's degrees ``[N]``.

    The kernel's ``streamed_arrays`` (DIFFormer-a's keys and values) are stored too. States, values and keys are
    stored in ``storage_dtype`` (the model's float32 or float64 by default;
    :func:`storage_dtype` gives bfloat16 or float16 under a 16-bit precision), the degrees in the dtype sums
    run in. ``sum(spec.nbytes ...)`` is the disk the pass takes."""
    conv = model.convs[0]
    compute = accumulation_dtype(next(model.parameters()).dtype)
    storage = storage_dtype or compute
    layout = {"h": ArraySpec((num_nodes, model.hidden_channels), storage)}
    per_node = (num_nodes, conv.num_heads, conv.out_channels)
    if conv.needs_graph:
        layout["value"] = ArraySpec(per_node, storage)
    for name in conv.kernel.streamed_arrays:
        layout[name] = ArraySpec(per_node, storage)
    if conv.needs_graph:
        layout["inv_sqrt_degree"] = ArraySpec((num_nodes,), compute)
    return layout


def storage_dtype(precision: str, model: DIFFormer) -> torch.dtype:
    """The dtype an exact pass stores states and values in under a Lightning ``precision`` (``'bf16-mixed'``,
    ``'16-mixed'``, ``'32-true'``, ...): bfloat16 / float16 under the 16-bit ones (projections already run in
    that dtype there; only the residual step then reads its input rounded to 16 bits), else the model's dtype
    (float32, or float64)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return accumulation_dtype(next(model.parameters()).dtype)


def layout_bytes(layout: Layout) -> int:
    return sum(spec.nbytes for spec in layout.values())


def format_bytes(count: int) -> str:
    """``"6,400,000 bytes (6.4 MB)"``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count:,} bytes ({count / size:,.1f} {unit})"
    return f"{count:,} bytes"


class Scratch:
    """The memory-mapped scratch arrays of exact passes, in a folder of their own under ``scratch_dir``
    (the system's temporary folder by default) that rank 0 creates at the first pass and every rank maps.

    * :meth:`check` (every rank, before any work: the LightningModule's ``setup``) refuses a missing folder,
      one that cannot be written, or one whose file system has less free space than the arrays need, with a
      :class:`ScratchError` naming ``option`` (``data.scratch_dir``), the bytes needed and the bytes free.
    * :meth:`get` creates the arrays at the first pass and reserves their disk blocks (``posix_fallocate``:
      a file system that fills up later cannot kill the run with SIGBUS), then reuses them for later passes
      that ask for the same layout. Their pages are allocated up front only when the arrays take at most
      :data:`POPULATE_SHARE` of the available memory; the value arrays, read at random, are mapped without
      read-ahead.
    * The folder holds a lock file every user of it keeps locked (shared); :meth:`remove_stale` deletes the
      folders under ``scratch_dir`` whose lock nobody holds (a run killed during a pass), and :meth:`close`
      (also at the end of the process, on rank 0) deletes this one.
    """

    PREFIX = "difformer-exact-"
    # A folder is created under this name, locked, then renamed: another process never sees it unlocked.
    CREATING = ".difformer-exact-creating-"
    LOCK = "lock"

    def __init__(self, scratch_dir: Optional[Union[str, Path]] = None,
                 collectives: Optional[Collectives] = None, option: str = "data.scratch_dir") -> None:
        self.explicit = scratch_dir is not None
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
        self.collectives = collectives or Collectives()
        self.option = option
        self.folder: Optional[Path] = None
        self._lock: Optional[int] = None
        self._layout: Optional[Layout] = None
        self.arrays: Dict[str, np.ndarray] = {}
        self.files: Dict[str, Tuple[int, int]] = {}  # each array's open file and the byte offset of its data
        # what the arrays hold for the whole run: ("degrees", id(graph), chunk_nodes) -> the chunks with self loops
        self.filled: dict = {}
        atexit.register(self.close)

    def _where(self) -> str:
        return (f"{self.option} {self.scratch_dir}" if self.explicit
                else f"{self.option} (unset: the system's temporary folder {self.scratch_dir})")

    def _remedy(self) -> str:
        return (f"point {self.option} at a folder on a local disk with room, store states in 16 bits "
                f"(they are under a bf16-mixed or 16-mixed precision), or evaluate by batches (evaluation='partition')")

    def check(self, layout: Layout) -> None:
        """Raises a :class:`ScratchError` unless the scratch folder exists, can be written, and has room for
        ``layout`` (counting the space this object's own arrays already take). A collective: rank 0 looks and
        every rank raises the same error, so none is left waiting for another."""
        problem = self.problem(layout) if self.collectives.rank == 0 else None
        problem = self.collectives.broadcast(problem)
        if problem is not None:
            raise ScratchError(problem)

    def problem(self, layout: Layout) -> Optional[str]:
        """What :meth:`check` refuses, as a message, or ``None``."""
        folder = self.scratch_dir
        needed = layout_bytes(layout)
        if not folder.exists():
            return (f"{self._where()} does not exist: exact evaluation keeps {format_bytes(needed)} of scratch "
                    f"arrays there; create the folder, or {self._remedy()}")
        if not folder.is_dir():
            return f"{self._where()} is not a folder; {self._remedy()}"
        try:
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".difformer-probe-")
            probe.close()
        except OSError as error:
            return (f"{self._where()} cannot be written ({error.strerror or error}): exact evaluation needs "
                    f"{format_bytes(needed)} of scratch arrays there; {self._remedy()}")
        if self.arrays:  # reused arrays, or replaced ones: their space comes back
            needed = max(0, needed - layout_bytes(self._layout))
        free = free_bytes(folder)
        if needed > free:
            return (f"{self._where()} has {format_bytes(free)} free, but exact evaluation needs "
                    f"{format_bytes(needed)} for its scratch arrays ({describe_layout(layout)}); free space, or "
                    f"{self._remedy()}")
        return None

    def remove_stale(self) -> List[Tuple[Path, int]]:
        """Deletes the folders of exact passes under ``scratch_dir`` that no running process holds (their lock
        is free, or they predate locks and are more than an hour old); logs and returns ``(folder, bytes)``
        for each. Call on one process per file system (rank 0)."""
        removed = []
        try:
            candidates = sorted(self.scratch_dir.glob(self.PREFIX + "*"))
            # folders whose creator died before renaming them: an hour is far longer than a creation takes
            candidates += [folder for folder in sorted(self.scratch_dir.glob(self.CREATING + "*"))
                           if time.time() - folder.stat().st_mtime > 3600]
        except OSError:
            return removed
        for folder in candidates:
            if folder == self.folder or not folder.is_dir():
                continue
            if _unused(folder / self.LOCK):
                size = _disk_bytes(folder)
                shutil.rmtree(folder, ignore_errors=True)
                if not folder.exists():
                    removed.append((folder, size))
                    log.warning(f"removed {folder} ({size / 1e9:,.1f} GB on disk): the scratch folder of an exact "
                                f"evaluation whose process is no longer running")
        return removed

    def get(self, layout: Layout) -> Dict[str, np.ndarray]:
        """Arrays of ``layout`` (created, or reused when the last call asked for the same). A collective:
        every rank calls it. Raises a :class:`ScratchError` on every rank when the files cannot be created."""
        if layout == self._layout:
            return self.arrays
        self._release()
        collectives = self.collectives
        if self.folder is None:
            folder = None
            if collectives.rank == 0:
                try:
                    folder = str(self._create_folder())
                except OSError as error:
                    folder = ScratchError(f"{self._where()}: cannot create the scratch folder "
                                          f"({error.strerror or error}); {self._remedy()}")
            folder = collectives.broadcast(folder)
            if isinstance(folder, ScratchError):
                raise folder
            self.folder = Path(folder)
            if collectives.rank != 0:
                self._lock = _lock_shared(self.folder / self.LOCK)
        problem = None
        if collectives.rank == 0:
            problem = self._create_files(layout)
        problem = collectives.broadcast(problem)
        if problem is not None:
            raise ScratchError(problem)
        populate = layout_bytes(layout) <= POPULATE_SHARE * available_memory()
        for name in layout:
            path = self.folder / f"{name}.npy"
            self.arrays[name], offset = _map(path, populate, random=name not in ("h", "inv_sqrt_degree"))
            self.files[name] = (os.open(path, os.O_RDWR), offset)
        self._layout = layout
        return self.arrays

    def _create_folder(self) -> Path:
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        creating = Path(tempfile.mkdtemp(prefix=f"{self.CREATING}{os.getpid()}-", dir=self.scratch_dir))
        self._lock = _lock_shared(creating / self.LOCK)
        folder = self.scratch_dir / (self.PREFIX + creating.name[len(self.CREATING):])
        creating.rename(folder)  # locked before any other process can see it under the name they clean
        return folder

    def _create_files(self, layout: Layout) -> Optional[str]:
        """Creates the ``.npy`` files of ``layout`` with their blocks reserved; returns a message instead of
        raising (the other ranks raise it too)."""
        for old in self.folder.glob("*.npy"):
            old.unlink()
        needed = layout_bytes(layout)
        for name, spec in layout.items():
            path = self.folder / f"{name}.npy"
            try:
                np.lib.format.open_memmap(path, "w+", spec.numpy_dtype, spec.shape).flush()
                with open(path, "r+b") as file:
                    try:
                        os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
                    except OSError as error:
                        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no reservation on this file system
                            continue
                        raise
            except OSError as error:
                for created in self.folder.glob("*.npy"):
                    created.unlink()
                if error.errno == errno.ENOSPC:
                    return (f"{self._where()} has {format_bytes(free_bytes(self.scratch_dir))} free, but exact "
                            f"evaluation needs {format_bytes(needed)} for its scratch arrays "
                            f"({describe_layout(layout)}); free space, or {self._remedy()}")
                return f"{self._where()}: cannot create {path} ({error.strerror or error}); {self._remedy()}"
        return None

    def _release(self) -> None:
        for descriptor, _ in self.files.values():
            os.close(descriptor)
        self.arrays, self.files, self._layout, self.filled = {}, {}, None, {}

    def close(self) -> None:
        self._release()
        if self.folder is not None and self.collectives.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        self.folder = None


def describe_layout(layout: Layout) -> str:
    return ", ".join(f"{name} {list(spec.shape)} {str(spec.dtype).replace('torch.', '')}"
                     for name, spec in layout.items())


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write on ``folder``'s file system."""
    status = os.statvfs(folder)
    return status.f_bavail * status.f_frsize


def available_memory() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _lock_shared(path: Path) -> int:
    """Opens (creating) ``path`` and holds a shared lock on it until the descriptor is closed."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    return descriptor


def _unused(lock: Path) -> bool:
    """Whether no process holds ``lock`` (an exclusive lock can be taken); a folder without a lock file (made
    by a version without locks) counts as unused when it is more than an hour old."""
    try:
        if not lock.exists():
            return time.time() - lock.parent.stat().st_mtime > 3600
        descriptor = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


def _disk_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_blocks * 512
        except OSError:
            pass
    return total


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (<linux/mman.h>); Python's mmap module does not name it


def _map(path: Path, populate: bool, random: bool) -> Tuple[np.ndarray, int]:
    """A writable shared mapping of the ``.npy`` file ``path``, and the byte offset of its data in the file.

    ``populate``: its pages allocated up front with ``MADV_POPULATE_WRITE`` (measured here, the first exact
    pass over 8M nodes spent 14 s faulting in fresh pages one at a time; a no-op where the kernel lacks it).
    Only for arrays that fit in memory: populating writes every page, so a larger file would be written to
    disk whole before the first chunk. ``random``: no read-ahead (``MADV_RANDOM``) for arrays read by row at
    random, where reading ahead multiplies the bytes read from disk when the array is not cached."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        offset = file.tell()
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for advice, wanted in ((_MADV_POPULATE_WRITE, populate), (getattr(mmap, "MADV_RANDOM", None), random)):
        if wanted and advice is not None:
            try:
                mapping.madvise(advice)
            except (OSError, ValueError):
                pass
    return np.ndarray(shape, dtype, buffer=mapping, offset=offset, order="F" if fortran else "C"), offset


# --- the pass ----------------------------------------------------------------------------------------------

@dataclass
class ExactStates:
    """The final hidden states ``[N, hidden]`` of every node, memory-mapped from the scratch folder
    (valid until the next pass over the same :class:`Scratch`); :meth:`rows` reads any rows. ``timings``: the
    pass's seconds by part (``encode``, ``degrees``, ``statistics``, ``graph``, ``update``) with the ``nodes``
    and in-edge ``entries`` of this rank's chunks, for cost models."""

    states: np.ndarray
    dtype: torch.dtype = torch.float32
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return self.states.shape[0]

    def rows(self, ids: Union[Tensor, slice]) -> Tensor:
        """``[len(ids), hidden]`` in float32 (float64 for a float64 model) on the CPU, for node ids (any order)
        or a slice."""
        if isinstance(ids, Tensor):
            ids = ids.cpu().numpy()
        return _to_torch(np.ascontiguousarray(self.states[ids]), self.dtype)


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A numpy array of scratch storage as a tensor of ``dtype`` (bfloat16 storage: uint16 words)."""
    tensor = torch.from_numpy(array)
    if array.dtype == np.uint16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(dtype)


def chunk_ranges(num_nodes: int, chunk_nodes: int) -> List[Tuple[int, int]]:
    """Consecutive ``(start, stop)`` node ranges of at most ``chunk_nodes`` covering ``0 .. num_nodes - 1``."""
    if chunk_nodes < 1:
        raise ValueError(f"chunk_nodes must be >= 1, got {chunk_nodes}")
    return [(start, min(start + chunk_nodes, num_nodes)) for start in range(0, num_nodes, chunk_nodes)]


def chunk_groups(num_chunks: int, groups: int = STATISTICS_GROUPS) -> List[range]:
    """``groups`` ranges of consecutive chunk indices covering ``0 .. num_chunks - 1``, sizes differing by at
    most one (the larger first; empty ones when there are fewer chunks than groups). They depend on the number
    of chunks only, never on the number of ranks."""
    size, larger = divmod(num_chunks, groups)
    bounds = [0]
    for index in range(groups):
        bounds.append(bounds[-1] + size + (index < larger))
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


def rank_groups(num_chunks: int, rank: int, world_size: int) -> List[Tuple[int, range]]:
    """The groups (index, chunk indices) rank ``rank`` of ``world_size`` streams: ``rank, rank + world_size, ...``."""
    return list(enumerate(chunk_groups(num_chunks)))[rank::world_size]


class PassProgress(Progress):
    """How far an exact pass is (:class:`~.progress.Progress`): the stage (encoding, or layer ``l`` of ``L``
    and its first or second sweep), this rank's chunks done, nodes per second and the time left."""

    def __init__(self, report: Callable[[str], None] = print, bar: bool = False, interval: float = 30.0) -> None:
        super().__init__("exact pass", report, bar, interval)
        self.chunks = 0

    def begin_pass(self, num_layers: int, num_chunks: int, total_chunks: int, nodes: int, total_nodes: int,
                   sweeps: int, scratch_bytes: int = 0, scratch_folder: Optional[Path] = None) -> None:
        self.chunks = num_chunks
        where = f"; scratch {scratch_bytes / 1e9:,.3f} GB in {scratch_folder}" if scratch_folder is not None else ""
        self.begin(nodes * sweeps, "nodes", f"{num_layers} layers over {total_nodes:,} nodes in {total_chunks:,} "
                                            f"chunks; this process streams {num_chunks:,} chunks ({nodes:,} nodes)"
                                            f"{where}")

    def stage(self, name: str, total: Optional[int] = None, unit: str = "chunks") -> None:
        super().stage(name, self.chunks if total is None else total, unit)


@torch.no_grad()
def exact_states(model: DIFFormer, source: GraphSource, chunk_nodes: int = 65_536, scratch: Optional[Scratch] = None,
                 device: Optional[torch.device] = None, gather: Optional[bool] = None,
                 storage: Optional[torch.dtype] = None, progress: Optional[PassProgress] = None) -> ExactStates:
    """The final states of ``model`` (evaluated as it is: call ``model.eval()`` first) for every node of
    ``source``, exactly as ``model.diffuse(x, edge_index, edge_weight)[-1]`` over the whole graph.

    Chunks of ``chunk_nodes`` rows run on ``device`` (the model's by default) under the caller's autocast
    (projections in its dtype, every sum in float32 or wider, as in training). The scratch arrays
    (:func:`scratch_layout`: states and values in ``storage``, the model's dtype by default; about ``N x (hidden
    + heads x width)`` times 4 bytes, or 2 in 16 bits, plus the keys for DIFFormer-a) come from ``scratch``
    (a new :class:`Scratch` under the system's temporary folder by default), whose collectives say which rank
    this is: call on every rank with the same arguments. The graph term reads its sources' values straight
    from the scratch file on the CPU when they are stored in the dtype sums run in; otherwise (an accelerator,
    16-bit storage, or ``gather=True``) the rows a chunk needs are gathered to the device. ``progress``
    reports how far the pass is.

    Raises :class:`ScratchError` when the scratch arrays cannot be created.
    """
    scratch = scratch or Scratch()
    collectives = scratch.collectives
    device = device or next(model.parameters()).device
    conv = model.convs[0]
    num_nodes = source.num_nodes
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    layout = scratch_layout(model, num_nodes, storage)
    direct = "value" in layout and layout["value"].dtype == dtype and device.type == "cpu"
    # gather=False cannot read 16-bit storage or another device's values in place: those are always gathered
    gather_to = device if not direct or (gather if gather is not None else False) else None
    chunks = chunk_ranges(num_nodes, chunk_nodes)
    groups = rank_groups(len(chunks), collectives.rank, collectives.world_size)
    mine = [(index, chunks[index]) for _, members in groups for index in members]
    arrays = scratch.get(layout)
    rows = _Rows(scratch, layout, device, dtype)
    timings = dict.fromkeys(("encode", "degrees", "statistics", "graph", "update"), 0.0)
    timings["nodes"] = float(sum(stop - start for _, (start, stop) in mine))
    timings["entries"] = 0.0
    if progress is not None:
        sweeps = 1 + len(model.convs) * (2 if _has_first_pass(conv) else 1)
        progress.begin_pass(len(model.convs), len(mine), len(chunks), int(timings["nodes"]), num_nodes, sweeps,
                            layout_bytes(layout), scratch.folder)
        progress.stage("encoding")
    # The degrees depend on the graph only: computed in the first pass over it with these arrays, with the
    # chunks that hold a self loop (the others' graph rows skip looking for them).
    known = scratch.filled.get(("degrees", id(source), chunk_nodes))
    loops = known if known is not None else set()
    for index, (start, stop) in mine:
        clock = time.perf_counter()
        rows.write("h", start, model.encode(source.features(start, stop).to(device)))
        timings["encode"] += time.perf_counter() - clock
        if conv.needs_graph and known is None:
            clock = time.perf_counter()
            row_pointer, edge_source, _ = source.in_rows(start, stop)
            if source.self_loops == 0:  # the degree is the row's length plus the one self loop: no edge read
                degree = row_pointer.diff() + 1
            else:
                target = edge_targets(row_pointer, edge_source.dtype)
                degree = gcn_degree(edge_source, target, stop - start, start)
                if bool((edge_source == target + start).any()):
                    loops.add(index)
            rows.write("inv_sqrt_degree", start, degree.to(dtype).pow(-0.5))
            timings["degrees"] += time.perf_counter() - clock
        if progress is not None:
            progress.advance(1, stop - start)
    if conv.needs_graph:
        scratch.filled[("degrees", id(source), chunk_nodes)] = loops
    rows.sync()
    inv_sqrt_degree = _to_torch(arrays["inv_sqrt_degree"], dtype) if conv.needs_graph else None
    for layer, conv in enumerate(model.convs):
        if progress is not None and _has_first_pass(conv):
            progress.stage(f"layer {layer + 1}/{len(model.convs)}, values")
        clock = time.perf_counter()
        summary = _first_pass(conv, rows, groups, chunks, progress)
        timings["statistics"] += time.perf_counter() - clock
        if progress is not None:
            progress.stage(f"layer {layer + 1}/{len(model.convs)}, states")
        for index, (start, stop) in mine:
            clock = time.perf_counter()
            h = rows.read("h", start, stop)
            query = conv.project(h, "q")[0] if conv.kernel.all_pairs else None
            # this chunk's values as the first pass wrote them, else (no graph, 'none') projected again
            value = rows.read("value", start, stop) if "value" in rows.arrays else conv.project(h, "v")[2]
            with torch.autocast(device_type=device.type, enabled=False):
                attention = None
                if conv.kernel.all_pairs:
                    attention = conv.kernel.attend(query, summary, lambda: (
                        {name: rows.read(name, *chunk) for name in conv.kernel.streamed_arrays} for chunk in chunks))
                local = None
                if conv.needs_graph:
                    graph_clock = time.perf_counter()
                    row_pointer, edge_source, weight = source.in_rows(start, stop)
                    timings["entries"] += edge_source.numel()
                    if conv.needs_edge_list:  # GAT: the edges one by one, self loops merged in
                        graph, ids = NormalizedGraph.rows(edge_source.long(), edge_targets(row_pointer), weight,
                                                          inv_sqrt_degree, start, stop - start, gather_to)
                    else:
                        graph, ids = NormalizedGraph.row_block(row_pointer, edge_source, weight, inv_sqrt_degree,
                                                               start, index in loops, gather_to)
                    local = conv.local(graph, rows.gather("value", ids), value)
                    timings["graph"] += time.perf_counter() - graph_clock
                    clock += time.perf_counter() - graph_clock
                elif not conv.kernel.all_pairs:  # a local kernel without a graph ('none')
                    local = conv.local(None, value, value)
                update = conv.combine(value, attention, local)
            rows.write("h", start, model.step(layer, h, update))
            timings["update"] += time.perf_counter() - clock
            if progress is not None:
                progress.advance(1, stop - start)
        rows.sync()
    if progress is not None:
        progress.end()
    return ExactStates(arrays["h"], dtype, timings)


def _has_first_pass(conv) -> bool:
    """Whether a layer needs the sweep before its states: every node's values for the graph term, the
    kernel's summary or streamed arrays for its all-pairs term."""
    return conv.needs_graph or conv.kernel.all_pairs


def _first_pass(conv, scratch: "_Rows", groups: Sequence[Tuple[int, range]], chunks: Sequence[Tuple[int, int]],
                progress: Optional[PassProgress]) -> Optional[Tensor]:
    """Writes every node's values (and the kernel's ``streamed_arrays``) where later passes gather them; for a
    kernel with a summary (DIFFormer-s's global statistics) returns it: each of this rank's groups of chunks
    summed in chunk order (float64), one row per group of a table all-reduced over ranks, the rows added in
    group order (see the module docstring)."""
    if not _has_first_pass(conv):
        return None
    kernel = conv.kernel
    template = None
    if kernel.all_pairs:  # the summary's size, from a zero row (None: the kernel has none)
        zeros = torch.zeros(1, conv.num_heads, conv.out_channels, device=scratch.device, dtype=scratch.dtype)
        with torch.autocast(device_type=scratch.device.type, enabled=False):
            template = kernel.summarize(zeros, zeros, zeros)
    table = template.new_zeros(STATISTICS_GROUPS, template.numel(), dtype=torch.float64) if template is not None \
        else None
    for group, members in groups:
        group_sum = None
        for index in members:
            start, stop = chunks[index]
            query, key, value = conv.project(scratch.read("h", start, stop))
            projected = {"query": query, "key": key, "value": value}
            for name in ("value",) * ("value" in scratch.arrays) + tuple(n for n in kernel.streamed_arrays
                                                                          if n != "value"):
                scratch.write(name, start, projected[name])
            if table is not None:
                with torch.autocast(device_type=scratch.device.type, enabled=False):
                    flat = kernel.summarize(query, key, value).double()
                group_sum = flat if group_sum is None else group_sum.add_(flat)
            if progress is not None:
                progress.advance(1, stop - start)
        if table is not None and group_sum is not None:
            table[group] = group_sum
    if table is None:
        scratch.sync()
        return None
    table = scratch.collectives.all_reduce(table)
    scratch.sync()
    total = table[0].clone()
    for row in table[1:]:  # in group order, one row at a time: the same additions for any number of ranks
        total.add_(row)
    return total


class _Rows:
    """Reads and writes rows of the scratch arrays, moving them between the CPU (in their storage dtype) and
    the device (in ``dtype``, the dtype sums run in).

    A chunk's consecutive rows are read and written with ``pread``/``pwrite`` on the array's file (the same
    page cache as the mappings): when the scratch does not stay cached (papers100M's does not beside its store),
    a write through the mapping first reads every page it touches back from disk, a file write of whole pages
    does not, and a file read is read ahead. Rows gathered at random go through the mapping."""

    def __init__(self, scratch: Scratch, layout: Layout, device: torch.device, dtype: torch.dtype) -> None:
        self.arrays, self.files, self.layout = scratch.arrays, scratch.files, layout
        self.collectives, self.device, self.dtype = scratch.collectives, device, dtype

    def _span(self, name: str, start: int, stop: int) -> Tuple[np.ndarray, int, int]:
        array = self.arrays[name]
        row_bytes = array.strides[0] if array.ndim > 1 else array.itemsize
        descriptor, offset = self.files[name]
        return array, descriptor, offset + start * row_bytes

    def read(self, name: str, start: int, stop: int) -> Tensor:
        array, descriptor, offset = self._span(name, start, stop)
        rows = np.empty((stop - start, *array.shape[1:]), array.dtype)
        _read_exactly(descriptor, memoryview(rows).cast("B"), offset)
        return _to_torch(rows, self.layout[name].dtype).to(self.device).to(self.dtype)

    def gather(self, name: str, ids: Optional[Tensor]) -> Tensor:
        """Rows ``ids`` (sorted, unique) of ``name`` on the device; ``None``: the whole array, memory-mapped
        (on the CPU, stored in ``dtype``: a sparse product then reads only the rows it needs)."""
        if ids is None:
            return torch.from_numpy(self.arrays[name])
        return _to_torch(self.arrays[name][ids.cpu().numpy()], self.layout[name].dtype).to(self.device).to(self.dtype)

    def write(self, name: str, start: int, rows: Tensor) -> None:
        stored = rows.detach().to("cpu", self.layout[name].dtype).contiguous()
        if stored.dtype == torch.bfloat16:
            stored = stored.view(torch.uint16)
        _, descriptor, offset = self._span(name, start, start + rows.size(0))
        _write_exactly(descriptor, memoryview(stored.numpy()).cast("B"), offset)

    def sync(self) -> None:
        """Every rank's rows visible to every rank: written back first when ranks share a file system."""
        if self.collectives.flush:
            for array in self.arrays.values():
                array.flush()
            for descriptor, _ in self.files.values():
                os.fsync(descriptor)
        self.collectives.barrier()


def _read_exactly(descriptor: int, buffer: memoryview, offset: int) -> None:
    """``pread`` until ``buffer`` is full (one call reads at most about 2 GiB)."""
    done = 0
    while done < len(buffer):
        count = os.preadv(descriptor, [buffer[done:]], offset + done)
        if count == 0:
            raise OSError(errno.EIO, f"the scratch file ended {len(buffer) - done} bytes early")
        done += count


def _write_exactly(descriptor: int, buffer: memoryview, offset: int) -> None:
    """``pwrite`` all of ``buffer`` (one call writes at most about 2 GiB)."""
    done = 0
    while done < len(buffer):
        done += os.pwritev(descriptor, [buffer[done:]], offset + done)


@torch.no_grad()
def layerwise_inference(model: DIFFormer, source: GraphSource, chunk_nodes: int = 65_536,
                        workdir: Optional[Union[str, Path]] = None, out: Optional[Union[str, Path]] = None,
                        gather: Optional[bool] = None, nodes: Optional[Tensor] = None,
                        progress: Optional[PassProgress] = None) -> Tensor:
    """Logits ``[N, out_channels]`` of ``model`` (in eval mode) over every node of ``source``, in one
    process: :func:`exact_states` and :meth:`DIFFormer.decode` chunk by chunk. ``nodes`` (sorted node ids)
    keeps only their rows (``[len(nodes), out_channels]``, in that order). Returned in memory, or, with
    ``out``, written to that ``.npy`` file (a temporary name, then renamed) and returned memory-mapped (for
    111M nodes x 172 classes they take 76 GB). The scratch folder (``workdir``, the system's temporary
    folder by default) is checked before the pass (:meth:`Scratch.check`) and removed after it."""
    model.eval()
    scratch = Scratch(workdir, option="workdir")
    try:
        scratch.check(scratch_layout(model, source.num_nodes))
        states = exact_states(model, source, chunk_nodes, scratch, gather=gather, progress=progress)
        classes = model.lin_out.out_features
        count = source.num_nodes if nodes is None else nodes.numel()
        if out is None:
            logits = np.empty((count, classes), np.float32)
        else:
            out, staging = Path(out), staging_path(out)
            logits = np.lib.format.open_memmap(staging, "w+", np.float32, (count, classes))
        device = next(model.parameters()).device
        for start, stop in chunk_ranges(count, chunk_nodes):
            ids = slice(start, stop) if nodes is None else nodes[start:stop]
            logits[start:stop] = model.decode(states.rows(ids).to(device)).float().cpu().numpy()
        if out is None:
            return torch.from_numpy(logits)
        logits.flush()
        del logits
        publish(staging, out)
        return read_only_tensor(np.load(out, mmap_mode="r"))
    finally:
        scratch.close()
