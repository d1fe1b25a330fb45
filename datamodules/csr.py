"""The CSR algorithms of the graph store, in one place: building the CSR of incoming edges from edge
chunks in bounded memory (:func:`write_csr`), and reading it back per batch: the subgraph induced by a set
of nodes (:func:`induced_subgraph`, with :class:`NodeBitmap` for membership) and sampled in-neighbours
(:func:`sample_neighbors`). Each reads only the rows it needs, so it works on a memory-mapped CSR of any
size.
"""
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np
import torch
import torch_geometric.typing
from torch import Tensor

if TYPE_CHECKING:
    from .store import StoreWriter


def column_dtype(num_nodes: int) -> np.dtype:
    """int32 column ids while they fit (half the size of the largest array), else int64."""
    return np.dtype(np.int32) if num_nodes < 2**31 else np.dtype(np.int64)


def write_csr(writer: "StoreWriter", num_nodes: int, edge_chunks) -> None:
    """Builds ``rowptr``/``col`` (incoming edges per node) from ``edge_chunks``, a callable that
    returns a fresh iterable of ``(source, target)`` int64 numpy chunks each time it is called, or of
    ``(source, target, weight)`` for a weighted graph (then ``edge_weight`` is stored beside ``col``).

    Two passes with bounded memory: the first counts in-degrees, the second places every
    source at its target's next free slot (edges into one node keep their given order; duplicates and
    self loops are kept). Memory is O(N) for the write cursors plus one chunk, never O(E).
    """
    degree = np.zeros(num_nodes, dtype=np.int64)
    weighted = False
    for chunk in edge_chunks():
        degree += np.bincount(chunk[1], minlength=num_nodes)
        weighted = weighted or len(chunk) == 3
    rowptr = writer.create("rowptr", (num_nodes + 1,), np.int64)
    rowptr[0] = 0
    np.cumsum(degree, out=rowptr[1:])
    col = writer.create("col", (int(rowptr[-1]),), column_dtype(num_nodes))
    weights = writer.create("edge_weight", (int(rowptr[-1]),), np.float32) if weighted else None
    cursor = np.array(rowptr[:-1])
    del degree
    for chunk in edge_chunks():
        source, target = chunk[0], chunk[1]
        order = np.argsort(target, kind="stable")
        target, source = target[order], source[order]
        # rank of each edge among the chunk's edges with the same target
        starts = np.flatnonzero(np.r_[True, target[1:] != target[:-1]])
        counts = np.diff(np.r_[starts, target.size])
        rank = np.arange(target.size) - np.repeat(starts, counts)
        slots = cursor[target] + rank
        col[slots] = source
        if weights is not None:
            weights[slots] = chunk[2][order]
        cursor[target[starts]] += counts


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
    total = int(ends[-1]) if ends.numel() else 0
    # position in col of every neighbour entry: its row's start plus its rank within the row
    positions = torch.arange(total) + (starts - (ends - counts)).repeat_interleave(counts, output_size=total)
    source = col[positions]
    with member.marked(nodes):
        inside = member.contains(source).nonzero().flatten()
    target = torch.searchsorted(ends, inside, right=True)
    return torch.stack([torch.searchsorted(nodes, source[inside].long()), target]), positions[inside]


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
