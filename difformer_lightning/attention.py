"""The diffusivity kernels of DIFFormer, each defined once, as pieces every executor calls.

* DIFFormer-s (``'simple'``): :class:`LinearAttentionStats`, the global sums over the nodes (that can
  be accumulated over chunks, added, and all-reduced over ranks), and :meth:`LinearAttentionStats.attend`,
  their combination with a block of queries. :func:`linear_attention` is the in-memory forward; the
  fused layer (:mod:`.fused`) and the streamed forward (:mod:`.streaming`) use the same two pieces.
* DIFFormer-a (``'sigmoid'``): :func:`sigmoid_sums`, the numerator and denominator of a block of
  queries against a block of keys; :func:`sigmoid_attention` runs it in row blocks over all keys,
  the streamed forward over chunks of keys too.
* GAT (``'gat'``): :func:`edge_attention`, the softmax over each target's in-edges, exact for any
  block of targets given their in-edges.

Tensors are ``[N, H, D]`` (nodes, heads, channels) unless stated. The functions compute in their
inputs' dtype; :class:`~difformer_lightning.DIFFormerConv` hands them float32 (float64 stays
float64) with autocast disabled: the global sums over all N nodes lose the data-dependent part of
the denominator in bfloat16 and overflow in float16 above 65,504 nodes.
"""
import math
from dataclasses import dataclass, fields
from typing import Iterator, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch_geometric.utils import scatter, softmax

QKNorm = Literal["frobenius", "row"]

# The clamp of the Frobenius norms (the reference's, and the fused layer's).
NORM_EPS = 1e-12
# Bytes a row block of the sigmoid kernel may hold per (row, node, head) entry: the
# scores, their sigmoid, and in backward the recomputed pair plus their gradient, in
# float32.
_SIGMOID_BYTES_PER_ENTRY = 16
# Graphs of a batch are padded to a common size in groups whose sizes differ by at most this factor.
_SIZE_GROUP_RATIO = 1.25


@dataclass
class LinearAttentionStats:
    r"""The global sums of DIFFormer-s over a set of nodes, for each graph ``g`` and head ``h``.

    With :math:`\tilde{k}_l` the key of node ``l`` (normalised to unit length per row when
    ``qk_norm='row'``, raw for ``'frobenius'``, whose scale is applied in :meth:`operator`):

    * ``key_value`` ``[G, H, D, D]``: :math:`\sum_l \tilde{k}_l v_l^\top`;
    * ``key_sum`` ``[G, H, D]``: :math:`\sum_l \tilde{k}_l`; ``value_sum`` ``[G, H, D]``: :math:`\sum_l v_l`;
    * ``query_square``, ``key_square`` ``[G]``: :math:`\lVert Q \rVert_F^2`, :math:`\lVert K \rVert_F^2`
      (the Frobenius normalisation's norms, over all heads);
    * ``num_nodes`` ``[G]``, float64 whatever the other fields' dtype (a count, exact up to 2**53: float32
      would hold 111,059,956 as 111,059,952), cast to their dtype only where it enters the denominator.

    Every field is a sum over nodes, so the statistics of a graph are the sum (``+``) of those of any
    partition of its nodes into chunks, in any order, and over DDP ranks (:meth:`flatten` /
    :meth:`unflatten` for one all-reduce). Source: DIFFORMER.md section 1, the reference's
    ``full_attention_conv`` (kernel ``'simple'``).
    """

    key_value: Tensor
    key_sum: Tensor
    value_sum: Tensor
    query_square: Tensor
    key_square: Tensor
    num_nodes: Tensor

    @classmethod
    def of(cls, query: Tensor, key: Tensor, value: Tensor, qk_norm: QKNorm = "frobenius",
           num_nodes: Optional[Tensor] = None) -> "LinearAttentionStats":
        """The sums over the nodes of ``query``, ``key``, ``value`` ``[G, S, H, D]`` (``G`` graphs padded
        to ``S`` rows with zeros; ``num_nodes`` ``[G]`` the real sizes, ``S`` each by default)."""
        if num_nodes is None:
            num_nodes = torch.full((query.size(0),), query.size(1), dtype=torch.float64, device=query.device)
        key = _normalized(key, qk_norm)
        return cls(key_value=torch.einsum("gnhm,gnhd->ghmd", key, value), key_sum=key.sum(dim=1),
                   value_sum=value.sum(dim=1), query_square=_square_norm(query), key_square=_square_norm(key),
                   num_nodes=num_nodes.to(torch.float64))

    def __add__(self, other: "LinearAttentionStats") -> "LinearAttentionStats":
        return LinearAttentionStats(*(a + b for a, b in zip(self._fields(), other._fields())))

    def _fields(self) -> Tuple[Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, dtype: torch.dtype) -> "LinearAttentionStats":
        """The sums in ``dtype``; the count stays float64."""
        return LinearAttentionStats(*(t if f.name == "num_nodes" else t.to(dtype)
                                      for f, t in zip(fields(self), self._fields())))

    def flatten(self) -> Tensor:
        """All fields in one 1-D float64 tensor (for one all-reduce); :meth:`unflatten` inverts it."""
        return torch.cat([t.reshape(-1).to(torch.float64) for t in self._fields()])

    def unflatten(self, flat: Tensor) -> "LinearAttentionStats":
        """Fields of ``self``'s shapes read back from ``flat`` (in ``flat``'s dtype)."""
        parts, start = [], 0
        for t in self._fields():
            parts.append(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return LinearAttentionStats(*parts)

    def operator(self, qk_norm: QKNorm = "frobenius", columns: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        r"""``(M, b)`` such that a query row :math:`q` gives :math:`P = q M + b` with the numerator in
        ``P[..., :D]`` and the denominator in ``P[..., D]``:

        .. math::
            M = s\,[\textstyle\sum_l \tilde{k}_l v_l^\top \mid \sum_l \tilde{k}_l], \qquad
            b = [\textstyle\sum_l v_l \mid N]

        ``M`` ``[G, H, Dk, C]``, ``b`` ``[G, H, C]`` with ``C = columns`` (zero-padded, at least ``D + 1``;
        ``D`` is the values' width, ``Dk`` the keys').
        :math:`s = 1 / (\lVert Q \rVert_F \lVert K \rVert_F)` (each clamped at ``NORM_EPS``) for
        ``'frobenius'``, 1 for ``'row'`` (the queries are then normalised by :meth:`attend`).
        """
        width = self.value_sum.size(-1)
        columns = columns or width + 1
        scale = self.scale(qk_norm).view(-1, 1, 1)
        mix = torch.cat([self.key_value, self.key_sum.unsqueeze(-1)], dim=-1) * scale.unsqueeze(-1)
        count = self.num_nodes.to(self.value_sum.dtype).view(-1, 1, 1).expand(*self.value_sum.shape[:2], 1)
        bias = torch.cat([self.value_sum, count], dim=-1)
        if columns > width + 1:
            mix, bias = F.pad(mix, (0, columns - width - 1)), F.pad(bias, (0, columns - width - 1))
        return mix, bias

    def scale(self, qk_norm: QKNorm = "frobenius") -> Tensor:
        """``[G]``: the Frobenius normalisation's :math:`1 / (\\lVert Q \\rVert \\lVert K \\rVert)`, or ones."""
        if qk_norm == "row":
            return torch.ones_like(self.query_square)
        # clamped before the square root: a clamped norm is a constant, with no (NaN) gradient
        norms = torch.stack([self.query_square, self.key_square]).clamp_min(NORM_EPS ** 2).sqrt()
        return 1.0 / norms.prod(dim=0)

    def attend(self, query: Tensor, qk_norm: QKNorm = "frobenius") -> Tensor:
        r"""DIFFormer-s attention of ``query`` ``[G, S, H, D]`` over the nodes the statistics were summed
        over: :math:`\mathrm{attn}_n = (\tilde{q}_n^\top \sum_l \tilde{k}_l v_l^\top + \sum_l v_l) /
        (\tilde{q}_n^\top \sum_l \tilde{k}_l + N)`. Returns ``[G, S, H, D]``."""
        mix, bias = self.operator(qk_norm)
        width, query = self.value_sum.size(-1), _normalized(query, qk_norm)
        # The operator's columns split before the product: slicing the small [D, D + 1] matrix, not the
        # [N, D + 1] product, keeps autograd from zero-filling product-sized gradients.
        numerator = torch.einsum("gnhm,ghmd->gnhd", query, mix[..., :width]) + bias[..., :width].unsqueeze(1)
        denominator = torch.einsum("gnhm,ghm->gnh", query, mix[..., width]) + bias[..., width].unsqueeze(1)
        return numerator / denominator.unsqueeze(-1)


def _square_norm(t: Tensor) -> Tensor:
    """``[G]``: the squared Frobenius norm of each graph's ``[S, H, D]`` block (no temporary of t's size)."""
    return torch.linalg.vector_norm(t, dim=(1, 2, 3)).square()


def _normalized(t: Tensor, qk_norm: QKNorm) -> Tensor:
    """Rows of unit length for ``'row'`` (zero rows stay zero); ``'frobenius'`` scales in ``operator``."""
    return F.normalize(t, dim=-1) if qk_norm == "row" else t


def linear_attention(query: Tensor, key: Tensor, value: Tensor, qk_norm: QKNorm = "frobenius",
                     batch: Optional[Tensor] = None) -> Tensor:
    r"""DIFFormer-s: :math:`f(z_n, z_l) = 1 + \tilde{q}_n^\top \tilde{k}_l`, in O(N H D^2).

    .. math::
        \mathrm{attn}_n = \frac{\tilde{q}_n^\top \sum_l \tilde{k}_l v_l^\top + \sum_l v_l}
                               {\tilde{q}_n^\top \sum_l \tilde{k}_l + N}

    ``qk_norm='frobenius'`` divides Q and K by the norm of the whole ``[N, H, D]``
    tensor, as the reference code does and as the published numbers were produced;
    each :math:`\tilde{q}_n` is then about :math:`1/\sqrt{N}` long and the attention is
    close to a uniform mean. ``qk_norm='row'`` normalises every row of every head to
    unit length, as the paper writes, which gives O(1) deviations from the mean.

    ``batch`` (sorted graph ids, as in a PyG ``Batch``) makes every sum, norm and ``N`` run
    over each node's own graph: attention never crosses graphs, and every graph gets exactly
    what it would get alone. Graphs are padded only to the largest of their size group (sizes
    within a factor 1.25), so many graphs cost at most 1.25 times one graph of the same total size.

    Shapes: ``query``, ``key``, ``value`` ``[N, H, D]``, ``batch`` ``[N]`` -> ``[N, H, D]``.
    """
    if batch is None:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        return LinearAttentionStats.of(query, key, value, qk_norm).attend(query, qk_norm)[0]
    check_sorted(batch)
    groups = list(size_groups(batch))
    consecutive = all(isinstance(nodes, slice) for nodes, _ in groups)
    if consecutive:  # split (one gradient cat) instead of per-group slices (a zero-filled gradient each)
        groups.sort(key=lambda group: group[0].start)
        lengths = [nodes.stop - nodes.start for nodes, _ in groups]
        pieces = list(zip(*(t.split(lengths) for t in (query, key, value))))
    else:  # a mix of consecutive and scattered groups: every group as an index
        groups = [(torch.arange(nodes.start, nodes.stop, device=batch.device) if isinstance(nodes, slice) else nodes,
                   graph_ids) for nodes, graph_ids in groups]
        pieces = [tuple(t.index_select(0, nodes) for t in (query, key, value)) for nodes, _ in groups]
    parts = [_attend_group(*piece, graph_ids, qk_norm) for piece, (_, graph_ids) in zip(pieces, groups)]
    if consecutive:
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    positions = torch.cat([nodes for nodes, _ in groups])
    inverse = torch.empty_like(positions)
    inverse[positions] = torch.arange(batch.numel(), device=batch.device)
    return torch.cat(parts).index_select(0, inverse)


def _attend_group(query: Tensor, key: Tensor, value: Tensor, graph_ids: Tensor, qk_norm: QKNorm) -> Tensor:
    """DIFFormer-s within each graph of a group of similar size (``graph_ids`` sorted, from 0), its graphs
    padded to the largest. Padding and unpadding by index_copy / index_select: their gradients are
    index_select / index_add, far cheaper on the CPU than the accumulating index_put of boolean-mask
    indexing; graphs of equal size need neither (a view)."""
    sizes = torch.bincount(graph_ids)
    largest = int(sizes.max())
    shape = (sizes.numel(), largest, *query.shape[1:])
    slots = None
    if largest * sizes.numel() != graph_ids.numel():
        rows = torch.arange(graph_ids.numel(), device=graph_ids.device) - (torch.cumsum(sizes, 0) - sizes)[graph_ids]
        slots = graph_ids * largest + rows
        query, key, value = (t.new_zeros(shape[0] * shape[1], *shape[2:]).index_copy(0, slots, t)
                             for t in (query, key, value))
    query, key, value = (t.reshape(shape) for t in (query, key, value))
    out = LinearAttentionStats.of(query, key, value, qk_norm, num_nodes=sizes).attend(query, qk_norm).flatten(0, 1)
    return out if slots is None else out.index_select(0, slots)


def size_groups(batch: Tensor) -> Iterator[Tuple[Union[slice, Tensor], Tensor]]:
    """Groups the graphs of a sorted ``batch`` by size so that padding a group to its largest graph at
    most multiplies its rows by 1.25. Yields ``(nodes, graph_ids)``: the group's node positions (a
    ``slice`` when they are consecutive) and their graph ids renumbered ``0, 1, ...``."""
    sizes = torch.bincount(batch)
    level = torch.floor(torch.log(sizes.clamp_min(1).double()) / math.log(_SIZE_GROUP_RATIO)).long()
    node_level = level[batch]
    for value in torch.unique(node_level):
        nodes = torch.nonzero(node_level == value).flatten()
        first, last = int(nodes[0]), int(nodes[-1])
        if last - first + 1 == nodes.numel():
            nodes = slice(first, last + 1)
        yield nodes, torch.unique_consecutive(batch[nodes], return_inverse=True)[1]


def check_sorted(batch: Tensor) -> None:
    """Graph ids must be sorted (each graph's nodes contiguous), as PyG's ``Batch`` makes them."""
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (the nodes of each graph contiguous, as torch_geometric's Batch "
                         "builds it); sort the nodes by graph id first")


def sigmoid_rows_per_block(num_nodes: int, num_heads: int, block_bytes: int) -> int:
    """How many query rows one block of DIFFormer-a may hold against ``num_nodes`` keys within
    ``block_bytes``. Raises a ``ValueError`` when not even one row fits, before any work is done."""
    bytes_per_row = _SIGMOID_BYTES_PER_ENTRY * num_nodes * num_heads
    rows = block_bytes // bytes_per_row
    if rows < 1:
        raise ValueError(
            f"DIFFormer-a (kernel='sigmoid') needs {bytes_per_row / 2**20:.1f} MiB for a single row of its "
            f"{num_nodes} x {num_nodes} x {num_heads} attention, more than its block budget of "
            f"{block_bytes / 2**20:.1f} MiB (sigmoid_block_bytes). Use kernel='simple' (linear cost), train on "
            f"smaller batches (random node partition), or raise sigmoid_block_bytes if memory allows.")
    return min(rows, num_nodes)


def sigmoid_sums(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
    r"""DIFFormer-a's sums for a block of queries against a block of keys:
    :math:`\sum_l \sigma(q_n^\top k_l) v_l` ``[H, B, D]`` and :math:`\sum_l \sigma(q_n^\top k_l)` ``[H, B, 1]``.

    ``query`` ``[H, B, D]``, ``key`` and ``value`` ``[H, L, D]`` (heads first). The attention over all
    keys is the sum of these over any partition of the keys, numerator over denominator. Source: the
    reference's ``full_attention_conv`` (kernel ``'sigmoid'``), unnormalised Q and K.
    """
    scores = torch.sigmoid(query @ key.transpose(-1, -2))  # [H, B, L]
    # Normalising after the product divides B x D entries instead of B x L.
    return scores @ value, scores.sum(dim=-1, keepdim=True)


def _sigmoid_block(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Rows of DIFFormer-a for ``query`` [H, B, D] against all keys/values [H, N, D]."""
    numerator, denominator = sigmoid_sums(query, key, value)
    return numerator / denominator


def sigmoid_attention(query: Tensor, key: Tensor, value: Tensor, block_bytes: int = 2**30,
                      batch: Optional[Tensor] = None) -> Tensor:
    r"""DIFFormer-a: :math:`A_{nl} = \sigma(q_n^\top k_l)`, row-normalised, times V.

    The ``[N, N, H]`` attention is never materialised: query rows are processed in
    blocks whose attention fits in ``block_bytes``. With gradients enabled and more
    than one block, each block is recomputed in backward (activation checkpointing),
    so extra memory stays O(block x N) in training too. With ``batch`` (sorted graph ids)
    each graph attends only to itself: consecutive graphs of one size (the snapshots of a series) in one
    batched product within ``block_bytes``, others one after another.

    Shapes: ``[N, H, D]`` each -> ``[N, H, D]``.
    """
    num_nodes, num_heads, _ = query.shape
    if batch is not None:
        check_sorted(batch)
        sizes = torch.bincount(batch).tolist()
        out, start, first = [], 0, 0
        while first < len(sizes):  # runs of consecutive graphs of one size (all snapshots of a series: one run)
            size, last = sizes[first], first
            while last < len(sizes) and sizes[last] == size:
                last += 1
            # as many graphs as fit block_bytes attend in one batched product, [G, H, n, n] scores
            per_block = block_bytes // max(1, _SIGMOID_BYTES_PER_ENTRY * size * size * num_heads)
            for group in range(first, last, max(1, per_block)) if size else ():
                count = min(max(1, per_block), last - group)
                rows = slice(start, start + count * size)
                if per_block < 1:  # one graph's attention exceeds the budget: its rows in blocks
                    out.append(sigmoid_attention(query[rows], key[rows], value[rows], block_bytes))
                else:
                    q, k, v = (t[rows].view(count, size, num_heads, -1).transpose(1, 2) for t in (query, key, value))
                    out.append(_sigmoid_block(q, k, v).transpose(1, 2).reshape(count * size, num_heads, -1))
                start += count * size
            first = last
        return torch.cat(out) if out else value.new_zeros(0, num_heads, value.size(-1))
    rows = sigmoid_rows_per_block(num_nodes, num_heads, block_bytes)
    query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # [H, N, D]
    if rows >= num_nodes:
        return _sigmoid_block(query, key, value).transpose(0, 1)
    recompute = torch.is_grad_enabled()
    blocks = []
    for start in range(0, num_nodes, rows):
        block = query[:, start:start + rows]
        if recompute:
            blocks.append(checkpoint(_sigmoid_block, block, key, value, use_reentrant=False))
        else:
            blocks.append(_sigmoid_block(block, key, value))
    return torch.cat(blocks, dim=1).transpose(0, 1)


def edge_attention(source_value: Tensor, target_value: Tensor, target: Tensor, att_source: Tensor,
                   att_target: Tensor, negative_slope: float = 0.2) -> Tensor:
    r"""GAT as a special case: attention restricted to the observed edges (self loops included).

    .. math::
        \alpha_{nl} = \mathrm{softmax}_{l \in \mathcal{N}(n)}
            \mathrm{LeakyReLU}(a_t^\top v_n + a_s^\top v_l)

    Exact for any block of targets given all their in-edges: ``source_value`` ``[E, H, D]`` is the
    value of each edge's source, ``target_value`` ``[T, H, D]`` those of the targets, ``target`` ``[E]``
    each edge's target position in ``0 .. T - 1``; ``att_source``/``att_target`` are ``[H, D]``.
    Returns ``[T, H, D]``. Source: Velickovic et al. 2018, as PyG's ``GATConv``.
    """
    score_source = (source_value * att_source).sum(dim=-1)  # [E, H]
    score_target = (target_value * att_target).sum(dim=-1)  # [T, H]
    scores = F.leaky_relu(score_source + score_target[target], negative_slope)
    alpha = softmax(scores, target, num_nodes=target_value.size(0))  # [E, H]
    return scatter(source_value * alpha.unsqueeze(-1), target, dim=0, dim_size=target_value.size(0), reduce="sum")
