r"""DIFFormer's graph term :math:`\hat{A} V`, :math:`\hat{A} = D^{-1/2}(A + I)D^{-1/2}`, and its rules.

The rules are defined once here and used by every executor (the in-memory forward over a whole
graph, the partition batches, and the streamed exact forward over the rows of a graph store):

* :func:`self_loop_rule`: every target keeps exactly one self loop (existing ones are dropped; the
  new one carries the weight of the last existing one, else 1), as PyG's
  ``add_remaining_self_loops`` does, but for any block of consecutive targets; :func:`one_self_loop`
  merges the loops into the edge list;
* :func:`gcn_degree`: the degree counts a target's in-edges after that rule (edges, not weights);
* :func:`normalized_in_edges`: the value of edge ``source -> target`` is
  ``deg(source)^-1/2 * deg(target)^-1/2``, times the edge weight when there are weights, with NaN/inf
  values zeroed;
* :func:`graph_term_weights`: how the graph term is mixed with the all-pairs attention.

:class:`NormalizedGraph` holds :math:`\hat{A}` of a whole graph (:meth:`~NormalizedGraph.build`), a block of
its rows as an edge list (:meth:`~NormalizedGraph.rows`) or, for the streamed pass, straight from a store's
CSR rows (:meth:`~NormalizedGraph.row_block`); :func:`sparse_matmul` is every product with it, safe past
2**31 elements.

Source: the reference's ``gcn_conv`` and ``DIFFormer`` forward (DIFFORMER.md section 1).
"""
import math
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor


def one_self_loop(source: Tensor, target: Tensor, weight: Optional[Tensor], num_targets: int,
                  start: int = 0) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The in-edges of targets ``start .. start + num_targets - 1`` with exactly one self loop each.

    ``source`` holds global node ids, ``target`` positions in the block (``0 .. num_targets - 1``).
    Existing self loops (``source == start + target``), repeated or not, are replaced by one loop per
    target, appended at the end (or, when the edges are sorted by target, at the end of its target's
    run, so they stay sorted); it carries the weight of the target's last existing loop in edge order,
    else 1 (PyG's ``add_remaining_self_loops`` semantics). Written here rather than calling PyG's function
    because the streamed forward applies it to one block of targets of a graph at a time.

    Shapes: ``source``, ``target``, ``weight`` ``[E]`` -> the same three ``[E' ]`` (``weight`` stays
    ``None`` when it is).
    """
    keep, loop_weight = self_loop_rule(source, target, weight, num_targets, start)
    loops = torch.arange(num_targets, device=target.device)
    if weight is not None and loop_weight is None:
        loop_weight = torch.ones(num_targets, dtype=weight.dtype, device=weight.device)
    kept = (lambda t: t[keep]) if keep is not None else (lambda t: t)  # noqa: E731  (no copy without loops)
    parts = [(kept(source), loops + start), (kept(target), loops)] + \
        ([(kept(weight), loop_weight)] if weight is not None else [])
    if target.numel() and bool((target[1:] >= target[:-1]).all()):
        # Edges sorted by target (a store's CSR rows) stay sorted, each loop last in its row, so the
        # sparse matrix needs no sort: the same order a stable sort of the appended loops would give.
        kept_target = parts[1][0]
        kept_slots = torch.arange(kept_target.numel(), device=target.device) + kept_target
        loop_slots = torch.cumsum(torch.bincount(kept_target, minlength=num_targets), 0) + loops
        merged = []
        for kept, loop in parts:
            out = kept.new_empty(kept.numel() + num_targets)
            out[kept_slots], out[loop_slots] = kept, loop
            merged.append(out)
    else:
        merged = [torch.cat(pair) for pair in parts]
    return merged[0], merged[1], merged[2] if weight is not None else None


def edge_targets(row_pointer: Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
    """The target position (``0 .. T - 1``) of every edge of a CSR block with ``row_pointer`` ``[T + 1]``."""
    counts = row_pointer.diff()
    return torch.repeat_interleave(torch.arange(counts.numel(), dtype=dtype, device=row_pointer.device), counts,
                                   output_size=int(row_pointer[-1] - row_pointer[0]))


def self_loop_rule(source: Tensor, target: Tensor, weight: Optional[Tensor], num_targets: int,
                   start: int = 0) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The self-loop rule of :func:`one_self_loop` for the in-edges of targets ``start ..`` (``source`` global
    ids, ``target`` positions in the block, int32 or int64): ``(keep, loop_weight)``, ``keep`` the bool mask
    ``[E]`` of the edges that are not self loops (``None`` when there is no self loop: all are kept), and
    ``loop_weight`` ``[num_targets]`` the weight of each target's one self loop: its last existing loop's
    weight in edge order, else 1 (``None`` when every loop weighs 1: no self loop, or no weights)."""
    is_loop = source == target + start
    if not bool(is_loop.any()):
        return None, None
    loop_weight = None
    if weight is not None:
        loop_weight = torch.ones(num_targets, dtype=weight.dtype, device=weight.device)
        position = torch.nonzero(is_loop).flatten()
        last = torch.full((num_targets,), -1, dtype=torch.long, device=target.device)
        last.scatter_reduce_(0, target[position].long(), position, reduce="amax")
        has_loop = last >= 0
        loop_weight[has_loop] = weight[last[has_loop]]
    return ~is_loop, loop_weight


def gcn_degree(source: Tensor, target: Tensor, num_targets: int, start: int = 0) -> Tensor:
    """In-degrees of targets ``start ..`` after :func:`one_self_loop`: in-edges other than self loops,
    plus one. Counts edges, not weights (as the reference). ``[num_targets]`` int64, never 0."""
    degree = torch.bincount(target, minlength=num_targets) + 1
    is_loop = source == target + start
    if bool(is_loop.any()):
        degree -= torch.bincount(target[is_loop], minlength=num_targets)
    return degree


def normalized_in_edges(source: Tensor, target: Tensor, weight: Optional[Tensor], inv_sqrt_degree: Tensor,
                        num_targets: int, start: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Edges into targets ``start .. start + num_targets - 1`` with their values in :math:`\hat{A}`.

    ``inv_sqrt_degree`` is :math:`\deg^{-1/2}` of every node (:func:`gcn_degree`), indexed by global id.
    Returns ``source`` (global ids), ``target`` (positions in the block) and the values, after
    :func:`one_self_loop`; the values are in ``inv_sqrt_degree``'s dtype.
    """
    if weight is not None:
        weight = weight.to(inv_sqrt_degree.dtype)
    source, target, weight = one_self_loop(source, target, weight, num_targets, start)
    values = torch.index_select(inv_sqrt_degree, 0, source) * torch.index_select(inv_sqrt_degree, 0, target + start)
    if weight is not None:
        values = torch.nan_to_num(values * weight, nan=0.0, posinf=0.0, neginf=0.0)
    return source, target, values


def graph_term_weights(graph_weight: float) -> Tuple[float, float]:
    """Weights of the all-pairs attention and of the graph term: ``(1 - w, w)`` for ``graph_weight = w
    > 0``, a plain sum ``(1, 1)`` otherwise (the reference's ``graph_weight`` rule)."""
    if graph_weight > 0:
        return 1.0 - graph_weight, graph_weight
    return 1.0, 1.0


class NormalizedGraph:
    r"""The propagation matrix :math:`\hat{A}` of the graph term, or a block of its rows.

    ``source`` (column ids, positions in the values given to :meth:`propagate`), ``target`` (row ids)
    and ``edge_weight`` (the normalised values) list the edges with one self loop per target;
    ``adjacency`` is the same matrix as a sparse CSR tensor ``[num_targets, num_sources]``, ready for
    ``adjacency @ V``. For a whole graph both sizes are N; the streamed forward builds one block of
    target rows at a time (:meth:`rows`) against the gathered rows of its sources. ``transposed``
    (:math:`\hat{A}^\top`, for gradients) is built on first use and then shared by every layer.
    """

    def __init__(self, source: Optional[Tensor], target: Optional[Tensor], edge_weight: Optional[Tensor],
                 num_targets: int, num_sources: int, adjacency: Optional[Tensor] = None,
                 row_scale: Optional[Tensor] = None, loop_values: Optional[Tensor] = None) -> None:
        self.source, self.target, self.edge_weight = source, target, edge_weight
        self.num_targets, self.num_sources = num_targets, num_sources
        self.adjacency = adjacency if adjacency is not None else _csr(target, source, edge_weight, num_targets,
                                                                      num_sources)
        self._transposed: Optional[Tensor] = None
        self._cast: dict = {}  # the matrices in each dtype products asked for
        # A block of rows from :meth:`row_block` (no edge list): adjacency holds the edges without self loops,
        # scaled by their sources' degrees only; each row is scaled by its target's (row_scale) and its one self
        # loop added apart (loop_values, times the target's own values).
        self.row_scale, self.loop_values = row_scale, loop_values

    @property
    def num_nodes(self) -> int:
        return self.num_targets

    @property
    def edge_index(self) -> Tensor:
        """``[2, E]``: sources (row 0) and targets (row 1), self loops included."""
        return torch.stack([self.source, self.target])

    @property
    def transposed(self) -> Tensor:
        if self._transposed is None:
            self._transposed = _csr(self.source, self.target, self.edge_weight, self.num_sources, self.num_targets)
        return self._transposed

    @classmethod
    def build(cls, edge_index: Tensor, edge_weight: Optional[Tensor], num_nodes: int,
              dtype: torch.dtype = torch.float32) -> "NormalizedGraph":
        """:math:`\\hat{A}` of a whole graph: ``edge_index`` ``[2, E]`` (messages row 0 -> row 1), optional
        ``edge_weight`` ``[E]``; values in ``dtype`` (float32 unless more is asked for).

        The degree counts edges at their target and ignores edge weights, which then multiply the
        normalised values. This differs from PyG's ``gcn_norm`` (weighted degree), so it is computed here.
        """
        source, target = edge_index
        inv_sqrt_degree = gcn_degree(source, target, num_nodes).to(dtype).pow(-0.5)
        source, target, values = normalized_in_edges(source, target, edge_weight, inv_sqrt_degree, num_nodes)
        return cls(source, target, values, num_nodes, num_nodes)

    @classmethod
    def rows(cls, source: Tensor, target: Tensor, weight: Optional[Tensor], inv_sqrt_degree: Tensor, start: int,
             num_targets: int, gather_to: Optional[torch.device] = None) -> Tuple["NormalizedGraph", Optional[Tensor]]:
        """Rows ``start .. start + num_targets - 1`` of :math:`\\hat{A}` from their in-edges (``source``
        global ids, ``target`` positions in the block, ``weight`` or ``None``), all on
        ``inv_sqrt_degree``'s device (the CPU for a store).

        By default the block's columns are all N nodes: ``block.propagate(V)`` with ``V`` ``[N, ...]`` (a
        memory-mapped array's tensor: only the rows the block needs are read) equals rows ``start ..`` of
        ``build(...).propagate(V)``; the second value returned is ``None``. With ``gather_to`` (a device)
        the columns are the distinct sources, whose global ids ``[S]`` (sorted, on the CPU) are returned,
        and the block is moved there: gather ``V[ids]`` onto that device and propagate that.
        """
        source, target, values = normalized_in_edges(source, target, weight, inv_sqrt_degree, num_targets, start)
        if gather_to is None:
            return cls(source, target, values, num_targets, inv_sqrt_degree.numel()), None
        ids, columns = torch.unique(source, return_inverse=True)
        return cls(columns.to(gather_to), target.to(gather_to), values.to(gather_to), num_targets, ids.numel()), ids

    @classmethod
    def row_block(cls, row_pointer: Tensor, source: Tensor, weight: Optional[Tensor], inv_sqrt_degree: Tensor,
                  start: int, has_loops: bool = True,
                  gather_to: Optional[torch.device] = None) -> Tuple["NormalizedGraph", Optional[Tensor]]:
        """Rows ``start .. start + T - 1`` of :math:`\\hat{A}` from their in-edges in CSR form, for the graph
        term without gradients: ``row_pointer`` ``[T + 1]`` (offsets into ``source``, from any base),
        ``source`` ``[E]`` (global ids, int32 or int64, as a store keeps them), ``weight`` ``[E]`` or ``None``,
        ``inv_sqrt_degree`` of every node; ``has_loops=False`` promises no self loop among them (their check
        is skipped).

        The same matrix as :meth:`rows` (the same rules: :func:`self_loop_rule`, :func:`gcn_degree`,
        NaN/inf values zeroed), laid out for a cheap build from a store's rows: the edges keep the store's
        order and dtype (no merge of self loops, no sort, no per-edge target), the target's normalisation is
        a scale of each output row and the self loop a term of its own, so :meth:`propagate` needs the
        targets' own values too. Returns the block and, as :meth:`rows` does, the sorted distinct sources
        (``gather_to``: the block's columns are those, on that device) or ``None`` (columns: all N nodes).
        """
        num_targets = row_pointer.numel() - 1
        counts = row_pointer.diff()
        dtype = inv_sqrt_degree.dtype
        loop_weight = None
        if weight is not None:
            weight = weight.to(dtype)
        if has_loops:
            target = edge_targets(row_pointer, source.dtype)
            keep, loop_weight = self_loop_rule(source, target, weight, num_targets, start)
            if keep is not None:
                source, counts = source[keep], torch.bincount(target[keep], minlength=num_targets)
                weight = weight[keep] if weight is not None else None
        # index_select, not inv_sqrt_degree[source]: 8x faster with int32 ids (advanced indexing converts them)
        values = torch.index_select(inv_sqrt_degree, 0, source)
        if weight is not None:
            values = values * weight
        row_scale = inv_sqrt_degree[start:start + num_targets]
        loop_values = row_scale.square()
        if loop_weight is not None:
            loop_values = loop_values * loop_weight
        if weight is not None:  # the rule zeroes non-finite values of A^; the degrees are finite
            values, loop_values = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (values, loop_values))
        ids, columns, num_columns = None, source, inv_sqrt_degree.numel()
        if gather_to is not None:
            ids, columns = torch.unique(source, return_inverse=True)
            num_columns = ids.numel()
        # int32 indices where they fit (a store's col): no int64 copy of the chunk's edges
        index_dtype = torch.int32 if columns.dtype == torch.int32 and source.numel() < 2**31 else torch.int64
        pointer = torch.zeros(num_targets + 1, dtype=index_dtype, device=source.device)
        pointer[1:] = torch.cumsum(counts, dim=0)
        device = gather_to or source.device
        with warnings.catch_warnings():  # torch warns about sparse CSR on every build
            warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
            adjacency = torch.sparse_csr_tensor(pointer.to(device), columns.to(device, index_dtype), values.to(device),
                                                size=(num_targets, num_columns))
        return cls(None, None, None, num_targets, num_columns, adjacency, row_scale.to(device),
                   loop_values.to(device)), ids

    def matmul(self, dense: Tensor, transpose: bool = False, out: Optional[Tensor] = None,
               alpha: float = 1.0) -> Tensor:
        """:math:`\\hat{A}` ``dense`` (:math:`\\hat{A}^\\top` ``dense`` with ``transpose``), no autograd: a new
        ``[num_targets, W]`` tensor, or added to ``out`` times ``alpha``. ``dense`` ``[num_sources, W]`` (or
        ``[num_targets, W]`` with ``transpose``) may be a memory-mapped array's tensor of any size: see
        :func:`sparse_matmul`. The matrix is cast to ``dense``'s dtype."""
        key = ("transposed" if transpose else "adjacency", dense.dtype)
        if key not in self._cast:
            self._cast[key] = (self.transposed if transpose else self.adjacency).to(dense.dtype)
        return sparse_matmul(self._cast[key], dense, out, alpha)

    def propagate(self, values: Tensor, target_values: Optional[Tensor] = None) -> Tensor:
        """:math:`\\hat{A} V` for ``values`` ``[num_sources, ...]`` -> ``[num_targets, ...]``, in float32
        (or float64 for float64 values). A block of :meth:`row_block` also needs ``target_values``
        ``[num_targets, ...]``, the targets' own rows of ``V`` (their self loops).

        Sparse CSR products have no bfloat16 kernel (nor a bfloat16 backward), so the product runs in
        float32 with autocast off. Its gradient is :math:`\\hat{A}^\\top G` with the cached ``transposed``:
        autograd's own backward of a sparse product would transpose (sort) the matrix again in every layer.
        """
        shape = values.shape
        with torch.autocast(device_type=values.device.type, enabled=False):
            dtype = accumulation_dtype(values.dtype)
            width = math.prod(shape[1:])  # not -1: a block may have no source row
            if self.row_scale is None:
                out = _Propagate.apply(self, values.reshape(shape[0], width).to(dtype))
            else:  # a row block: no gradient (see row_block)
                if target_values is None:
                    raise ValueError("a row block of NormalizedGraph.row_block adds each target's self loop: pass the "
                                     "targets' own values as target_values")
                out = self.matmul(values.reshape(shape[0], width).to(dtype))
                out.mul_(self.row_scale.to(dtype).unsqueeze(1))
                out.addcmul_(self.loop_values.to(dtype).unsqueeze(1), target_values.reshape(self.num_targets, width))
        return out.reshape(self.num_targets, *shape[1:])


class _Propagate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: NormalizedGraph, values: Tensor) -> Tensor:
        ctx.graph = graph
        return graph.matmul(values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, ctx.graph.matmul(grad, transpose=True)


# torch's sparse-CSR x dense product on the CPU (MKL's LP64 routines, pytorch/pytorch#100158) addresses the dense
# operand with a 32-bit element offset: an entry in a column c with c * row_stride >= 2**31 segfaults or, at some
# widths, sums wrong values (measured with torch 2.13: width 16 fails from row 134,217,728 on, width 256 from row
# 8,388,608; the last row below the limit is right). No public API says which kernels are affected, so every product
# whose dense operand reaches the limit runs over blocks of its rows, each addressed from its own first row.
DENSE_OFFSET_LIMIT = 2**31


def sparse_matmul(matrix: Tensor, dense: Tensor, out: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """``matrix @ dense`` for a sparse CSR ``matrix`` ``[M, K]`` and a strided ``dense`` ``[K, W]`` of any size
    (a memory-mapped array's tensor too: only the rows the matrix uses are read): a new ``[M, W]`` tensor, or
    ``out += alpha * matrix @ dense`` in place (``out`` is returned).

    When the dense operand's element offsets reach :data:`DENSE_OFFSET_LIMIT`, the matrix is cut into blocks of
    columns (entries kept in row order inside each block) and each block multiplies its own slice of ``dense``,
    the products added into the output one after another: every offset stays below the limit, on every device.
    """
    width, stride = dense.size(1), max(dense.stride(0), 1)
    rows_per_block = (DENSE_OFFSET_LIMIT - width) // stride + 1
    if dense.size(0) <= rows_per_block:
        if out is None:
            return matrix @ dense if alpha == 1.0 else torch.mul(matrix @ dense, alpha)
        return out.addmm_(matrix, dense, alpha=alpha)
    if out is None:
        out = dense.new_zeros(matrix.size(0), width)
    for first, block in _column_blocks(matrix, rows_per_block):
        out.addmm_(block, dense[first:first + block.size(1)], alpha=alpha)
    return out


def _column_blocks(matrix: Tensor, columns_per_block: int) -> List[Tuple[int, Tensor]]:
    """``matrix`` (sparse CSR ``[M, K]``) cut into blocks of at most ``columns_per_block`` columns: ``(first column,
    block [M, columns])`` for every block holding an entry. One stable sort by block keeps each row's entries in
    their order."""
    row_pointer, columns, values = matrix.crow_indices().long(), matrix.col_indices().long(), matrix.values()
    num_rows, num_columns = matrix.shape
    rows = torch.repeat_interleave(torch.arange(num_rows, device=columns.device), row_pointer.diff(),
                                   output_size=columns.numel())
    block_of = torch.div(columns, columns_per_block, rounding_mode="floor")
    order = torch.sort(block_of, stable=True).indices
    rows, columns, values, block_of = rows[order], columns[order], values[order], block_of[order]
    counts = torch.bincount(block_of).tolist()
    blocks, start = [], 0
    for index, count in enumerate(counts):
        if count:
            first = index * columns_per_block
            size = min(columns_per_block, num_columns - first)
            part = slice(start, start + count)
            blocks.append((first, _csr(rows[part], columns[part] - first, values[part], num_rows, size)))
        start += count
    return blocks


def _csr(rows: Tensor, columns: Tensor, values: Tensor, num_rows: int, num_columns: int) -> Tensor:
    """A sparse CSR matrix with an entry ``values[e]`` at ``(rows[e], columns[e])``.

    Repeated entries stay separate (a product sums them, as coalescing would): PyG's
    ``to_torch_csr_tensor`` coalesces, a sort by row and column plus a pass for duplicates,
    where a stable sort by row is all CSR needs, and none when the rows are already sorted.
    """
    if rows.numel() and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.sort(rows, stable=True).indices
        columns, values = columns[order], values[order]
    row_pointer = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=num_rows), dim=0, out=row_pointer[1:])
    with warnings.catch_warnings():  # torch warns about sparse CSR on every build
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
        return torch.sparse_csr_tensor(row_pointer, columns, values, size=(num_rows, num_columns))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype global sums run in: float32 for low-precision inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)
