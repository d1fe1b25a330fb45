"""The exact forward pass of a DIFFormer over every node of a graph of any size, chunk by chunk.

DIFFormer-s attends over all nodes through a handful of global sums, so an exact forward pass over a
graph that fits no batch needs, per layer, one streaming pass that accumulates those sums
(:class:`~.attention.LinearAttentionStats`) and writes every node's values, and a second pass that
combines the sums with each chunk of queries, adds the graph term gathered over each target's in-edges,
and steps the state. DIFFormer-a's second pass sums each chunk of queries against every chunk of keys
(quadratic, so only on request); GCN and GAT need only the graph rows; the MLP neither.

Every piece of math is the model's own: :meth:`DIFFormer.encode`, :meth:`DIFFormerConv.project`,
:meth:`~DIFFormerConv.statistics`, :meth:`~DIFFormerConv.attend`, :meth:`~DIFFormerConv.sigmoid_sums`,
:meth:`~DIFFormerConv.local` on :meth:`NormalizedGraph.rows`, :meth:`~DIFFormerConv.combine` and
:meth:`DIFFormer.step`; nothing here reads a weight.

Several processes (DDP ranks) share the work: rank ``r`` of ``W`` streams chunks ``r, r + W, ...``; the
per-chunk statistics go into one table that is all-reduced (each slot has a single contributor, so the
sum is exact) and added up in chunk order, so the result is bitwise the same for any number of ranks.
Layer states and values live in memory-mapped scratch arrays that every rank of a machine maps (one copy
in the page cache), with a barrier between passes. Several machines need a scratch folder on a file system
they all mount (``flush=True`` then writes each rank's rows back before every barrier).
"""
import atexit
import mmap
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .attention import LinearAttentionStats, sigmoid_rows_per_block
from .contracts import GraphSource
from .graph import NormalizedGraph, accumulation_dtype, gcn_degree
from .io import publish, staging_path
from .model import DIFFormer


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


class Scratch:
    """The memory-mapped scratch arrays of exact passes, in a folder of their own under ``scratch_dir``
    (the system's temporary folder by default) that rank 0 creates on first use and every rank maps.

    Arrays are created once and reused by later passes that ask for the same shapes (the files' pages
    stay in the page cache: a pass does not fault fresh ones in). :meth:`close` (or the end of the
    process, on rank 0) deletes the folder.
    """

    def __init__(self, scratch_dir: Optional[Union[str, Path]] = None,
                 collectives: Optional[Collectives] = None) -> None:
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
        self.collectives = collectives or Collectives()
        self.folder: Optional[Path] = None
        self._layout = None
        self.arrays: Dict[str, np.ndarray] = {}
        # arrays that hold what they hold for the whole run (the degrees of the graph given by `key`)
        self.filled: set = set()
        atexit.register(self.close)

    def get(self, shapes: Dict[str, Tuple[int, ...]], dtype: np.dtype) -> Dict[str, np.ndarray]:
        """Arrays of these shapes and dtype (created, or reused when the last call asked for the same).
        A collective: every rank calls it."""
        layout = (tuple(shapes.items()), np.dtype(dtype).str)
        if layout == self._layout:
            return self.arrays
        self.arrays = {}
        if self.folder is None:
            folder = None
            if self.collectives.rank == 0:
                self.scratch_dir.mkdir(parents=True, exist_ok=True)
                folder = tempfile.mkdtemp(prefix="difformer-exact-", dir=self.scratch_dir)
            self.folder = Path(self.collectives.broadcast(folder))
        if self.collectives.rank == 0:
            for old in self.folder.glob("*.npy"):
                old.unlink()
            for name, shape in shapes.items():
                np.lib.format.open_memmap(self.folder / f"{name}.npy", "w+", dtype, shape).flush()
        self.collectives.barrier()
        self.arrays = {name: _map_populated(self.folder / f"{name}.npy") for name in shapes}
        self._layout, self.filled = layout, set()
        return self.arrays

    def close(self) -> None:
        self.arrays, self._layout, self.filled = {}, None, set()
        if self.folder is not None and self.collectives.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (<linux/mman.h>); Python's mmap module does not name it


def _map_populated(path: Path) -> np.ndarray:
    """A writable shared mapping of the ``.npy`` file ``path``, its pages allocated up front.

    Faulting in a fresh file page on its first write costs microseconds per 4 KiB page: measured here, the
    first exact pass over 8M nodes spent 14 s in such faults, more than in any computation.
    ``MADV_POPULATE_WRITE`` allocates them in one call (a no-op where the kernel lacks it)."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        offset = file.tell()
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        mapping.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError):
        pass
    return np.ndarray(shape, dtype, buffer=mapping, offset=offset, order="F" if fortran else "C")


@dataclass
class ExactStates:
    """The final hidden states ``[N, hidden]`` of every node, memory-mapped from the scratch folder
    (valid until the next pass over the same :class:`Scratch`); :meth:`rows` reads any rows."""

    states: np.ndarray

    @property
    def num_nodes(self) -> int:
        return self.states.shape[0]

    def rows(self, ids: Union[Tensor, slice]) -> Tensor:
        """``[len(ids), hidden]`` float32 (or float64) on the CPU, for node ids (any order) or a slice."""
        if isinstance(ids, Tensor):
            ids = ids.cpu().numpy()
        return torch.from_numpy(np.ascontiguousarray(self.states[ids]))


def chunk_ranges(num_nodes: int, chunk_nodes: int) -> List[Tuple[int, int]]:
    """Consecutive ``(start, stop)`` node ranges of at most ``chunk_nodes`` covering ``0 .. num_nodes - 1``."""
    if chunk_nodes < 1:
        raise ValueError(f"chunk_nodes must be >= 1, got {chunk_nodes}")
    return [(start, min(start + chunk_nodes, num_nodes)) for start in range(0, num_nodes, chunk_nodes)]


@torch.no_grad()
def exact_states(model: DIFFormer, source: GraphSource, chunk_nodes: int = 65_536, scratch: Optional[Scratch] = None,
                 device: Optional[torch.device] = None, gather: Optional[bool] = None) -> ExactStates:
    """The final states of ``model`` (evaluated as it is: call ``model.eval()`` first) for every node of
    ``source``, exactly as ``model.diffuse(x, edge_index, edge_weight)[-1]`` over the whole graph.

    Chunks of ``chunk_nodes`` rows run on ``device`` (the model's by default) under the caller's autocast
    (projections in its dtype, every sum in float32 or wider, as in training). The scratch arrays (the
    states, updated in place, plus values, keys and degrees where the kernel needs them: about ``N x
    (hidden + heads x width) x 4`` bytes of disk, twice the values' part for DIFFormer-a) come from ``scratch`` (a new :class:`Scratch` under the
    system's temporary folder by default), whose collectives say which rank this is: call on every rank
    with the same arguments. The graph term reads its sources' values straight from the scratch file on
    the CPU; on another device (or with ``gather=True``) the rows a chunk needs are gathered to it.
    """
    scratch = scratch or Scratch()
    collectives = scratch.collectives
    device = device or next(model.parameters()).device
    gather_to = device if (gather if gather is not None else device.type != "cpu") else None
    conv = model.convs[0]
    num_nodes = source.num_nodes
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    chunks = chunk_ranges(num_nodes, chunk_nodes)
    mine = list(enumerate(chunks))[collectives.rank::collectives.world_size]
    arrays = scratch.get(*scratch_layout(model, num_nodes))
    rows = _Rows(arrays, collectives, device, dtype)
    # The degrees depend on the graph only: computed in the first pass over it with these arrays.
    degrees = conv.needs_graph and ("inv_sqrt_degree", id(source)) not in scratch.filled
    for _, (start, stop) in mine:
        rows.write("h", start, model.encode(source.features(start, stop).to(device)))
        if degrees:
            edge_source, target, _ = source.in_edges(start, stop)
            rows.write("inv_sqrt_degree", start, gcn_degree(edge_source, target, stop - start, start)
                       .to(dtype).pow(-0.5))
    if degrees:
        scratch.filled.add(("inv_sqrt_degree", id(source)))
    rows.sync()
    inv_sqrt_degree = torch.from_numpy(arrays["inv_sqrt_degree"]) if conv.needs_graph else None
    for layer, conv in enumerate(model.convs):
        stats = _first_pass(conv, rows, mine, len(chunks))
        for _, (start, stop) in mine:
            h = rows.read("h", start, stop)
            query = conv.project(h, "q")[0] if conv.kernel in ("simple", "sigmoid") else None
            # this chunk's values as the first pass wrote them, else (no graph, 'none') projected again
            value = rows.read("value", start, stop) if "value" in rows.arrays else conv.project(h, "v")[2]
            with torch.autocast(device_type=device.type, enabled=False):
                attention = None
                if conv.kernel == "simple":
                    attention = conv.attend(query, stats)
                elif conv.kernel == "sigmoid":
                    attention = _sigmoid_rows(conv, query, rows, chunks)
                local = None
                if conv.needs_graph:
                    edge_source, target, weight = source.in_edges(start, stop)
                    graph, ids = NormalizedGraph.rows(edge_source, target, weight, inv_sqrt_degree, start,
                                                      stop - start, gather_to)
                    local = conv.local(graph, rows.gather("value", ids), value)
                update = conv.combine(value, attention, local)
            rows.write("h", start, model.step(layer, h, update))
        rows.sync()
    return ExactStates(arrays["h"])


def scratch_layout(model: DIFFormer, num_nodes: int) -> Tuple[Dict[str, Tuple[int, ...]], np.dtype]:
    """The scratch arrays :func:`exact_states` needs for ``model`` over ``num_nodes`` nodes, and their dtype
    (``Scratch.get(*scratch_layout(...))`` allocates them ahead of the first pass)."""
    conv = model.convs[0]
    # One state array, updated in place: a rank reads and writes only its own chunks' states (other ranks
    # read its values, never its states), and a chunk is read before its new state is written.
    shapes = {"h": (num_nodes, model.hidden_channels)}
    per_node = (num_nodes, conv.num_heads, conv.out_channels)
    if conv.needs_graph or conv.kernel == "sigmoid":
        shapes["value"] = per_node
    if conv.kernel == "sigmoid":
        shapes["key"] = per_node
    if conv.needs_graph:
        shapes["inv_sqrt_degree"] = (num_nodes,)
    dtype = accumulation_dtype(next(model.parameters()).dtype)
    return shapes, np.dtype(str(dtype).replace("torch.", ""))


def _first_pass(conv, scratch: "_Rows", mine, num_chunks: int) -> Optional[LinearAttentionStats]:
    """Writes every node's values (and keys) where later passes gather them; for DIFFormer-s returns the
    global statistics, summed over chunks in chunk order whatever the number of ranks."""
    if not (conv.needs_graph or conv.kernel in ("simple", "sigmoid")):
        return None
    table, template = None, None
    for index, (start, stop) in mine:
        query, key, value = conv.project(scratch.read("h", start, stop))
        if "value" in scratch.arrays:
            scratch.write("value", start, value)
        if conv.kernel == "sigmoid":
            scratch.write("key", start, key)
        if conv.kernel == "simple":
            with torch.autocast(device_type=scratch.device.type, enabled=False):
                template = conv.statistics(query, key, value)
            flat = template.flatten().double()
            if table is None:
                table = flat.new_zeros(num_chunks, flat.numel())
            table[index] = flat
    if conv.kernel != "simple":
        scratch.sync()
        return None
    if template is None:  # this rank has no chunk: its slots stay zero
        width, heads = conv.out_channels, conv.num_heads
        zeros = torch.zeros(1, 1, heads, width, device=scratch.device, dtype=scratch.dtype)
        template = LinearAttentionStats.of(zeros, zeros, zeros, conv.qk_norm)
        table = template.flatten().double().new_zeros(num_chunks, template.flatten().numel())
    table = scratch.collectives.all_reduce(table)
    scratch.sync()
    return template.unflatten(table.sum(dim=0).to(scratch.dtype))


def _sigmoid_rows(conv, query: Tensor, scratch: "_Rows", chunks) -> Tensor:
    """DIFFormer-a for one chunk of queries against the keys of every chunk (each read once), in row
    blocks that keep each block's scores within ``conv.sigmoid_block_bytes``."""
    largest = max(stop - start for start, stop in chunks)
    rows = sigmoid_rows_per_block(largest, conv.num_heads, conv.sigmoid_block_bytes)
    blocks = query.split(rows)
    numerators, denominators = [None] * len(blocks), [None] * len(blocks)
    for start, stop in chunks:
        key, value = scratch.read("key", start, stop), scratch.read("value", start, stop)
        for i, block in enumerate(blocks):
            numerator, denominator = conv.sigmoid_sums(block, key, value)
            numerators[i] = numerator if numerators[i] is None else numerators[i] + numerator
            denominators[i] = denominator if denominators[i] is None else denominators[i] + denominator
    return torch.cat(numerators) / torch.cat(denominators)


class _Rows:
    """Reads and writes rows of the scratch arrays, moving them between the CPU and the device."""

    def __init__(self, arrays, collectives: Collectives, device: torch.device, dtype: torch.dtype) -> None:
        self.arrays, self.collectives, self.device, self.dtype = arrays, collectives, device, dtype

    def read(self, name: str, start: int, stop: int) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.arrays[name][start:stop])).to(self.device)

    def gather(self, name: str, ids: Optional[Tensor]) -> Tensor:
        """Rows ``ids`` (sorted, unique) of ``name`` on the device; ``None``: the whole array, memory-mapped
        (on the CPU, where a sparse product reads only the rows it needs)."""
        if ids is None:
            return torch.from_numpy(self.arrays[name])
        return torch.from_numpy(self.arrays[name][ids.cpu().numpy()]).to(self.device)

    def write(self, name: str, start: int, rows: Tensor) -> None:
        self.arrays[name][start:start + rows.size(0)] = rows.detach().to("cpu", self.dtype).numpy()

    def sync(self) -> None:
        """Every rank's rows visible to every rank: written back first when ranks share a file system."""
        if self.collectives.flush:
            for array in self.arrays.values():
                array.flush()
        self.collectives.barrier()


@torch.no_grad()
def layerwise_inference(model: DIFFormer, source: GraphSource, chunk_nodes: int = 65_536,
                        workdir: Optional[Union[str, Path]] = None, out: Optional[Union[str, Path]] = None,
                        gather: Optional[bool] = None) -> Tensor:
    """Logits ``[N, out_channels]`` of ``model`` (in eval mode) over every node of ``source``, in one
    process: :func:`exact_states` and :meth:`DIFFormer.decode` chunk by chunk. Returned in memory, or,
    with ``out``, written to that ``.npy`` file (a temporary name, then renamed) and returned
    memory-mapped (for 111M nodes x 172 classes they take 76 GB)."""
    model.eval()
    scratch = Scratch(workdir)
    try:
        states = exact_states(model, source, chunk_nodes, scratch, gather=gather)
        classes, num_nodes = model.lin_out.out_features, source.num_nodes
        if out is None:
            logits = np.empty((num_nodes, classes), np.float32)
        else:
            out, staging = Path(out), staging_path(out)
            logits = np.lib.format.open_memmap(staging, "w+", np.float32, (num_nodes, classes))
        device = next(model.parameters()).device
        for start, stop in chunk_ranges(num_nodes, chunk_nodes):
            logits[start:stop] = model.decode(states.rows(slice(start, stop)).to(device)).float().cpu().numpy()
        if out is None:
            return torch.from_numpy(logits)
        logits.flush()
        del logits
        publish(staging, out)
        return torch.from_numpy(np.load(out, mmap_mode="c"))
    finally:
        scratch.close()
