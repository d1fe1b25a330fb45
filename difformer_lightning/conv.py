"""One DIFFormer diffusion layer."""
from typing import Literal, Optional, Tuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (QKNorm, LinearAttentionStats, edge_attention, linear_attention, sigmoid_attention,
                        sigmoid_rows_per_block, sigmoid_sums)
from .fused import fused_linear_diffusion
from .graph import NormalizedGraph, accumulation_dtype, graph_term_weights

Kernel = Literal["simple", "sigmoid", "gcn", "gat", "none"]
KERNELS = get_args(Kernel)
# Kernels whose diffusion covers all pairs of nodes; the graph term is added to them.
GLOBAL_KERNELS = ("simple", "sigmoid")


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(repr, choices))}")


class DIFFormerConv(nn.Module):
    r"""The diffusivity-weighted propagation of one DIFFormer layer (Wu et al., ICLR 2023).

    For every head :math:`h` with :math:`Q = hW_q`, :math:`K = hW_k` and
    :math:`V = hW_v` (or :math:`V = h` when ``use_weight=False``):

    .. math::
        \mathbf{c} = \frac{1}{H} \sum_h \Big[(1 - w)\, S^{(h)} V^{(h)} + w\, \hat{A} V^{(h)}\Big]

    where :math:`S` is chosen by ``kernel``:

    * ``'simple'`` (DIFFormer-s): :math:`S_{nl} \propto 1 + \tilde{q}_n^\top \tilde{k}_l`
      over all pairs, computed in linear cost (see :func:`linear_attention`);
    * ``'sigmoid'`` (DIFFormer-a): :math:`S_{nl} \propto \sigma(q_n^\top k_l)` over all
      pairs, computed in row blocks (see :func:`sigmoid_attention`);
    * ``'gcn'``: :math:`S = \hat{A}`, diffusion along observed edges only;
    * ``'gat'``: :math:`S` is GAT attention over observed edges;
    * ``'none'``: :math:`S = I`, no diffusion (an MLP).

    The graph term :math:`\hat{A} V` (:math:`\hat{A} = D^{-1/2}(A+I)D^{-1/2}`) is added to the
    all-pairs kernels when ``use_graph``: with ``graph_weight <= 0`` as a plain sum
    (:math:`S V + \hat{A} V`), otherwise mixed with weight :math:`w`. The local kernels
    (``'gcn'``, ``'gat'``, ``'none'``) are defined by the graph or its absence, so
    ``use_graph`` and ``graph_weight`` do not apply to them.

    The layer is exposed as the pieces every executor composes (:meth:`forward` in memory, the
    streamed forward of :mod:`.streaming` chunk by chunk): :meth:`project`, the kernel's global part
    (:meth:`statistics` and :meth:`attend` for ``'simple'``, :meth:`sigmoid_sums` for ``'sigmoid'``),
    :meth:`local` (the graph term, or the ``'gcn'``/``'gat'`` diffusion) and :meth:`combine`.

    Args:
        in_channels: size of each input row.
        out_channels: size of each head's output (equal to ``in_channels`` when
            ``use_weight=False``).
        num_heads: number of heads, averaged at the end.
        kernel: the diffusivity, see above.
        use_graph: add the graph term to an all-pairs kernel.
        graph_weight: mixing weight of the graph term; ``<= 0`` sums the terms.
        use_weight: project V with a linear map; otherwise V is the input itself.
        qk_norm: ``'frobenius'`` (reference code) or ``'row'`` (paper), DIFFormer-s only.
        sigmoid_block_bytes: memory budget of one row block of DIFFormer-a.
    """

    def __init__(self, in_channels: int, out_channels: int, num_heads: int = 1, kernel: Kernel = "simple",
                 use_graph: bool = True, graph_weight: float = -1.0, use_weight: bool = True,
                 qk_norm: QKNorm = "frobenius", sigmoid_block_bytes: int = 2**30) -> None:
        super().__init__()
        check_choice("kernel", kernel, KERNELS)
        check_choice("qk_norm", qk_norm, get_args(QKNorm))
        if not use_weight and in_channels != out_channels:
            raise ValueError(f"use_weight=False takes V = input, so in_channels ({in_channels}) must equal "
                             f"out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.num_heads = in_channels, out_channels, num_heads
        self.kernel, self.use_weight, self.qk_norm = kernel, use_weight, qk_norm
        self.use_graph = use_graph and kernel in GLOBAL_KERNELS
        self.graph_weight = graph_weight
        self.sigmoid_block_bytes = sigmoid_block_bytes
        width = out_channels * num_heads
        self.query = nn.Linear(in_channels, width) if kernel in GLOBAL_KERNELS else None
        self.key = nn.Linear(in_channels, width) if kernel in GLOBAL_KERNELS else None
        self.value = nn.Linear(in_channels, width) if use_weight else None
        self.att_source = nn.Parameter(torch.empty(num_heads, out_channels)) if kernel == "gat" else None
        self.att_target = nn.Parameter(torch.empty(num_heads, out_channels)) if kernel == "gat" else None
        self.reset_parameters()

    @property
    def needs_graph(self) -> bool:
        return self.use_graph or self.kernel in ("gcn", "gat")

    @property
    def needs_edge_list(self) -> bool:
        """Whether :meth:`local` reads the graph's edges one by one (GAT's attention over them), not only
        through :meth:`NormalizedGraph.propagate`."""
        return self.kernel == "gat"

    def reset_parameters(self) -> None:
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                lin.reset_parameters()
        for att in (self.att_source, self.att_target):
            if att is not None:
                nn.init.xavier_uniform_(att)

    def check_fits(self, num_nodes: int) -> None:
        """Raises before any work if DIFFormer-a cannot process ``num_nodes`` nodes at once."""
        if self.kernel == "sigmoid":
            sigmoid_rows_per_block(num_nodes, self.num_heads, self.sigmoid_block_bytes)

    def forward(self, x: Tensor, graph: Optional[NormalizedGraph] = None, batch: Optional[Tensor] = None) -> Tensor:
        """Maps ``x`` [N, in_channels] to [N, out_channels].

        ``graph`` is the :class:`NormalizedGraph` of the current nodes, required when
        ``needs_graph``; :class:`DIFFormer` builds it once for all its layers. ``batch``
        (sorted graph ids) keeps the global attention within each graph. DIFFormer-s on one
        graph with the reference's normalisation runs through :mod:`.fused` (the same function
        with a hand-written backward); every other case through autograd on :meth:`project`,
        the kernel, :meth:`local` and :meth:`combine`.
        """
        if self.needs_graph and graph is None:
            raise ValueError(f"DIFFormerConv(kernel={self.kernel!r}, use_graph={self.use_graph}) needs a graph: "
                             f"pass edge_index, or use use_graph=False / a kernel without a graph")
        if self.kernel == "simple" and self.qk_norm == "frobenius" and batch is None:
            return self._fused_simple(x, graph)
        value, attention, local = self.terms(x, graph, batch)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.combine(value, attention, local)

    def terms(self, x: Tensor, graph: Optional[NormalizedGraph] = None, batch: Optional[Tensor] = None
              ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The parts :meth:`combine` mixes, each ``[N, H, out_channels]``: the values, the all-pairs
        term (``None`` for the local kernels) and the output of :meth:`local` (``None`` without a graph),
        in float32 (float64 stays float64). Arguments as :meth:`forward`."""
        if self.needs_graph and graph is None:
            raise ValueError(f"DIFFormerConv(kernel={self.kernel!r}, use_graph={self.use_graph}) needs a graph")
        query, key, value = self.project(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.kernel == "simple":
                attention = linear_attention(query, key, value, self.qk_norm, batch)
            elif self.kernel == "sigmoid":
                attention = sigmoid_attention(query, key, value, self.sigmoid_block_bytes, batch)
            else:
                attention = None
            local = self.local(graph, value, value) if self.needs_graph else None
        return value, attention, local

    def project(self, x: Tensor, parts: str = "qkv") -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``(Q, K, V)`` of ``x`` ``[N, in_channels]``, each ``[N, H, out_channels]``, in float32 (float64
        stays float64): the projections run in autocast's dtype, everything after them sums over nodes.
        Q and K are ``None`` for the local kernels, and so is any of the three not named in ``parts``."""
        shape = (x.size(0), self.num_heads, self.out_channels)
        linears = {"q": self.query, "k": self.key, "v": self.value}
        out = []
        for name, linear in linears.items():
            if name not in parts:
                out.append(None)
            elif name == "v" and not self.use_weight:
                out.append(x.unsqueeze(1).expand(shape))
            else:
                out.append(linear(x).view(shape) if linear is not None else None)
        dtype = accumulation_dtype(next(t.dtype for t in out if t is not None))
        return tuple(None if t is None else t.to(dtype) for t in out)

    def statistics(self, query: Tensor, key: Tensor, value: Tensor) -> LinearAttentionStats:
        """DIFFormer-s: the global sums over the nodes of ``query``, ``key``, ``value`` ``[N, H, D]``
        (one graph, or one chunk of it; chunks' statistics add up)."""
        return LinearAttentionStats.of(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), self.qk_norm)

    def attend(self, query: Tensor, stats: LinearAttentionStats) -> Tensor:
        """DIFFormer-s attention ``[N, H, D]`` of ``query`` ``[N, H, D]`` over the nodes of ``stats``."""
        return stats.attend(query.unsqueeze(0), self.qk_norm)[0]

    def sigmoid_sums(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor]:
        """DIFFormer-a: numerator ``[B, H, D]`` and denominator ``[B, H, 1]`` of ``query`` ``[B, H, D]``
        against the keys and values ``[L, H, D]`` of one chunk of nodes (chunks' sums add up)."""
        numerator, denominator = sigmoid_sums(*(t.transpose(0, 1) for t in (query, key, value)))
        return numerator.transpose(0, 1), denominator.transpose(0, 1)

    def local(self, graph: NormalizedGraph, source_value: Tensor, target_value: Tensor) -> Tensor:
        """The diffusion along the graph, ``[T, H, D]``: :math:`\\hat{A} V` (the graph term, and
        ``'gcn'``), or GAT attention over each target's in-edges (``'gat'``). ``graph`` holds rows of
        :math:`\\hat{A}` (all of them, or a block of targets), ``source_value`` ``[S, H, D]`` the values of
        its columns, ``target_value`` ``[T, H, D]`` those of its rows (used by ``'gat'``, and by a block of
        :meth:`NormalizedGraph.row_block` for its self loops)."""
        if self.kernel == "gat":
            return edge_attention(source_value[graph.source], target_value, graph.target,
                                  self.att_source.to(source_value.dtype), self.att_target.to(source_value.dtype))
        return graph.propagate(source_value, target_value)

    def combine(self, value: Tensor, attention: Optional[Tensor], local: Optional[Tensor]) -> Tensor:
        """The layer's output ``[N, out_channels]``: the kernel's diffusion mixed with the graph term
        (:func:`~.graph.graph_term_weights`), averaged over heads. ``attention`` is the all-pairs term
        (``None`` for the local kernels), ``local`` the output of :meth:`local` (``None`` without graph)."""
        if self.kernel == "none":
            out = value
        elif self.kernel in ("gcn", "gat"):
            out = local
        elif self.use_graph:
            attention_weight, local_weight = graph_term_weights(self.graph_weight)
            out = attention_weight * attention + local_weight * local
        else:
            out = attention
        return out[:, 0] if self.num_heads == 1 else out.mean(dim=1)  # one head: a view, not a copy

    def _fused_simple(self, x: Tensor, graph: Optional[NormalizedGraph]) -> Tensor:
        """DIFFormer-s on one graph (the reference's normalisation): one input projection for
        Q, K and V, then :func:`fused_linear_diffusion`, the same function at a fraction of the
        memory traffic."""
        projections = [self.query, self.key] + ([self.value] if self.use_weight else [])
        projected = F.linear(x, torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]))
        dtype = accumulation_dtype(projected.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            value = None if self.use_weight else x.to(dtype)
            return fused_linear_diffusion(projected.to(dtype), self.num_heads, graph if self.use_graph else None,
                                          self.graph_weight, value)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.num_heads}, "
                f"kernel={self.kernel!r}, use_graph={self.use_graph})")
