"""The CSR algorithms of the graph store, in one place: building the CSR of incoming edges from edge
chunks in bounded memory (:func:`write_csr`), and reading it back per batch: the subgraph induced by a set
of nodes (:func:`induced_subgraph`, with :class:`NodeBitmap` for membership) and sampled in-neighbours
(:func:`sample_neighbors`). Each reads only the rows it needs, so it works on a memory-mapped CSR of any
size.
"""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
import torch
import torch_geometric.typing
from torch import Tensor

if TYPE_CHECKING:
    from .store import StoreWriter


def column_dtype(num_nodes: int) -> np.dtype:
    """int32 column ids while they fit (half the size of the largest array), else int64."""
    return np.dtype(np.int32) if num_nodes < 2**31 else np.dtype(np.int64)


# Targets per bucket of the CSR writer's spill: a target's position in its bucket fits 16 bits.
BUCKET_NODES = 1 << 16
# Bytes of spilled edges held in memory before they are appended to their buckets' files.
SPILL_BUFFER_BYTES = 64 << 20


def write_csr(writer: "StoreWriter", num_nodes: int, edge_chunks, expected_edges: Optional[int] = None) -> None:
    """Builds ``rowptr``/``col`` (incoming edges per node) from ``edge_chunks``, a callable that returns an
    iterable of ``(source, target)`` int64 numpy chunks, or of ``(source, target, weight)`` for a weighted graph
    (then ``edge_weight`` is stored beside ``col``). It is called once: the input is read once.

    An external sort by target in two sequential passes, so the store's files are written front to back:

    1. every chunk's edges are appended, in their order, to one spill file per bucket of ``BUCKET_NODES``
       consecutive targets (the source and the target's 16-bit position in its bucket: 6 bytes an edge with
       int32 ids, plus 4 with weights), buffered ``SPILL_BUFFER_BYTES`` at a time;
    2. bucket by bucket, in target order, its edges are read back, counted per target (``rowptr``) and
       ordered by target with a stable sort (edges into one node keep their given order; duplicates and self
       loops are kept), then written at the end of ``col``; the bucket's file is deleted.

    Bytes written: the store's own plus the spill (6 of every 10 an edge's two ids take in it and in ``col``:
    1.45x the store for papers100M with float16 features). Memory: the spill buffer, one input chunk, and the
    largest bucket's edges (about 20 bytes each while sorted); nothing of size N or E. The writer's progress
    reports both passes (``expected_edges``, when known, sizes the first).
    """
    progress = writer.progress
    spill = writer.tmp / "spill"
    spill.mkdir()
    index_dtype = column_dtype(num_nodes)
    buckets = _BucketSpill(spill, num_nodes, index_dtype)
    if progress is not None:
        progress.stage("edges read", expected_edges, "edges")
    for chunk in edge_chunks():
        buckets.add(*chunk)
        if progress is not None:
            progress.advance(len(chunk[0]))
    buckets.flush()
    num_edges = buckets.total
    rowptr = writer.create("rowptr", (num_nodes + 1,), np.int64)
    col = writer.create("col", (num_edges,), index_dtype)
    weights = writer.create("edge_weight", (num_edges,), np.float32) if buckets.weighted else None
    rowptr[0] = 0
    if progress is not None:
        progress.stage("col written", num_edges, "edges")
    base = 0
    for bucket in range(buckets.count):
        low, high = bucket * BUCKET_NODES, min((bucket + 1) * BUCKET_NODES, num_nodes)
        records = buckets.read(bucket)
        position = records["position"]
        rowptr[low + 1:high + 1] = base + np.cumsum(np.bincount(position, minlength=high - low))
        order = np.argsort(position, kind="stable")
        col[base:base + len(order)] = records["source"][order]
        if weights is not None:
            weights[base:base + len(order)] = records["weight"][order]
        base += len(order)
        if progress is not None:
            progress.advance(len(order))
    shutil.rmtree(spill)


class _BucketSpill:
    """The first pass of :func:`write_csr`: edges appended to one file per bucket of targets."""

    def __init__(self, folder: Path, num_nodes: int, index_dtype: np.dtype) -> None:
        self.folder, self.num_nodes, self.index_dtype = folder, num_nodes, index_dtype
        self.count = -(-num_nodes // BUCKET_NODES)
        self.weighted: Optional[bool] = None
        self.record: Optional[np.dtype] = None
        self.buffers: Dict[int, list] = {}
        self.buffered, self.total = 0, 0

    def add(self, source: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray] = None) -> None:
        weighted = weight is not None
        if self.weighted is None:
            self.weighted = weighted
            fields = [("source", self.index_dtype), ("position", np.uint16)] + ([("weight", np.float32)]
                                                                             if weighted else [])
            self.record = np.dtype(fields)  # packed: 6 bytes an edge with int32 ids
        elif weighted != self.weighted:
            raise ValueError("edge chunks mix weighted and unweighted edges: give every chunk its weights, or none")
        target = np.asarray(target)
        if len(target) and (int(target.min()) < 0 or int(target.max()) >= self.num_nodes):
            bad = int(target.min()) if int(target.min()) < 0 else int(target.max())
            raise ValueError(f"an edge points to node {bad}, but the graph's ids are 0 .. {self.num_nodes - 1}")
        records = np.empty(len(target), self.record)
        records["source"], records["position"] = source, target & (BUCKET_NODES - 1)
        if weighted:
            records["weight"] = weight
        bucket = target >> 16
        order = np.argsort(bucket, kind="stable")  # keeps the chunk's order inside each bucket
        counts = np.bincount(bucket, minlength=self.count)
        records, start = records[order], 0
        for index in np.flatnonzero(counts):
            self.buffers.setdefault(int(index), []).append(records[start:start + counts[index]])
            start += counts[index]
        self.buffered += records.nbytes
        self.total += len(records)
        if self.buffered >= SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for index, parts in self.buffers.items():
            with open(self.folder / f"{index}.bin", "ab") as file:
                for part in parts:
                    part.tofile(file)
        self.buffers, self.buffered = {}, 0

    def read(self, index: int) -> np.ndarray:
        path = self.folder / f"{index}.bin"
        if self.record is None or not path.exists():
            return np.empty(0, self.record or np.dtype([("source", self.index_dtype), ("position", np.uint16)]))
        records = np.fromfile(path, self.record)
        path.unlink()
        return records


def count_self_loops(rowptr: Tensor, col: Tensor, chunk: int = 1 << 24) -> int:
    """How many entries of the CSR (``col[rowptr[i]:rowptr[i + 1]]`` the sources into node ``i``) are a node's
    edge to itself; reads ``col`` once, ``chunk`` entries (about) at a time."""
    num_nodes, loops, first = rowptr.numel() - 1, 0, 0
    while first < num_nodes:
        last = int(torch.searchsorted(rowptr, int(rowptr[first]) + chunk, right=True)) - 1
        last = min(max(last, first + 1), num_nodes)
        row_pointer = rowptr[first:last + 1]
        sources = col[int(row_pointer[0]):int(row_pointer[-1])]
        targets = torch.repeat_interleave(torch.arange(first, last, dtype=sources.dtype), row_pointer.diff(),
                                          output_size=sources.numel())
        loops += int(torch.count_nonzero(sources == targets))
        first = last
    return loops


# In-edge positions an induced subgraph reads at once (about 60 bytes each while they are tested).
SUBGRAPH_SLICE = 1 << 22

# pyg-lib's subgraph kernel when installed; DIFFORMER_NO_PYG_LIB=1 turns it off.
USE_PYG_LIB = torch_geometric.typing.WITH_PYG_LIB and not os.environ.get("DIFFORMER_NO_PYG_LIB")


def induced_subgraph(rowptr: Tensor, col: Tensor, nodes: Tensor,
                     member: Optional["NodeBitmap"] = None) -> Tuple[Tensor, Tensor]:
    """Edges among ``nodes`` as positions in ``nodes``: ``[2, E_b]``, messages row 0 -> row 1, and the
    position of each in ``col`` ``[E_b]`` (to pick its weight).

    ``nodes`` must be sorted and unique. Reads only the CSR rows of ``nodes``: cost
    O(sum of their in-degrees) for the gather and the membership test (a bitmap of N bits),
    plus a log(batch) search for the few neighbours that fall inside the batch. Nothing of
    size N is allocated per call (pass ``member``, an N-bit bitmap reused across calls, as
    :class:`BatchBuilder` does), so it works on a memory-mapped CSR of any size.

    pyg-lib's ``sampler.subgraph`` does the same in C++ and is used when installed, but it
    requires ``rowptr`` and ``col`` of one dtype: stores keep ``col`` in int32 to halve their
    largest array, so on those the pure-torch path below runs (edge order may differ between
    the two paths; the edge sets are equal).
    """
    if USE_PYG_LIB and rowptr.dtype == col.dtype:
        import pyg_lib

        sub_rowptr, sub_col, edge_id = pyg_lib.sampler.subgraph(rowptr, col, nodes.to(rowptr.dtype), True)
        target = torch.repeat_interleave(torch.arange(nodes.numel()), sub_rowptr[1:] - sub_rowptr[:-1])
        return torch.stack([sub_col.long(), target]), edge_id.long()
    member = member if member is not None else NodeBitmap(rowptr.numel() - 1)
    starts = rowptr[nodes]
    counts = rowptr[nodes + 1] - starts
    ends = torch.cumsum(counts, 0)
    # The nodes' in-edge positions are read in slices of about SUBGRAPH_SLICE positions (a node with more is a
    # slice of its own): memory grows with the slice, not with the batch's degree sum (a batch of high-degree
    # neighbours reads tens of millions of positions at about 60 bytes each).
    bounds = [0]
    while bounds[-1] < nodes.numel():
        reached = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
        bounds.append(max(int(torch.searchsorted(ends, reached + SUBGRAPH_SLICE, right=True)), bounds[-1] + 1))
    sources, targets, kept = [], [], []
    with member.marked(nodes):
        for first, last in zip(bounds[:-1], bounds[1:]):
            offset = int(ends[first - 1]) if first else 0
            part_counts, part_ends = counts[first:last], ends[first:last] - offset
            size = int(part_ends[-1])
            # position in col of every neighbour entry: its row's start plus its rank within the row
            positions = torch.arange(size) + (starts[first:last] - (part_ends - part_counts)).repeat_interleave(
                part_counts, output_size=size)
            source = col[positions]
            inside = member.contains(source).nonzero().flatten()
            sources.append(source[inside])
            targets.append(torch.searchsorted(part_ends, inside, right=True) + first)
            kept.append(positions[inside])
    if not sources:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.stack([empty, empty]), empty
    source = torch.cat(sources)
    return torch.stack([torch.searchsorted(nodes, source.long()), torch.cat(targets)]), torch.cat(kept)


class NodeBitmap:
    """One bit per node, for O(1) batch-membership tests with N/8 bytes of memory
    (14 MB for ogbn-papers100M), allocated once per process and cleared after each use."""

    def __init__(self, num_nodes: int) -> None:
        self.bits = torch.zeros((num_nodes >> 3) + 1, dtype=torch.uint8)

    @contextmanager
    def marked(self, nodes: Tensor):
        nodes = nodes.long()
        # nodes are unique, so bits landing in the same byte are distinct and adding them is OR
        self.bits.index_add_(0, nodes >> 3, torch.ones(1, dtype=torch.uint8).expand(nodes.numel())
                             .bitwise_left_shift((nodes & 7).to(torch.uint8)))
        try:
            yield self
        finally:
            self.bits[nodes >> 3] = 0

    def contains(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        return (self.bits[ids >> 3].bitwise_right_shift((ids & 7).to(torch.uint8)) & 1).bool()


def sample_neighbors(rowptr: Tensor, col: Tensor, nodes: Tensor, fanout: int, generator: torch.Generator) -> Tensor:
    """``fanout`` in-neighbours of every node in ``nodes``, drawn uniformly with replacement
    (nodes without neighbours contribute none); O(len(nodes) x fanout) from the CSR."""
    starts = rowptr[nodes]
    degree = rowptr[nodes + 1] - starts
    has_neighbors = degree > 0
    starts, degree = starts[has_neighbors].repeat_interleave(fanout), degree[has_neighbors].repeat_interleave(fanout)
    offsets = (torch.rand(degree.numel(), generator=generator, dtype=torch.float64) * degree).long()
    return col[starts + offsets].long()
