"""One DIFFormer diffusion layer."""
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import QKNorm
from .graph import NormalizedGraph, accumulation_dtype, graph_term_weights
from .kernels import DiffusionKernel, kernel_class


class DIFFormerConv(nn.Module):
    r"""The diffusivity-weighted propagation of one DIFFormer layer (Wu et al., ICLR 2023).

    For every head :math:`h` with :math:`Q = hW_q`, :math:`K = hW_k` and
    :math:`V = hW_v` (or :math:`V = h` when ``use_weight=False``):

    .. math::
        \mathbf{c} = \frac{1}{H} \sum_h \Big[(1 - w)\, S^{(h)} V^{(h)} + w\, \hat{A} V^{(h)}\Big]

    where :math:`S` is the layer's ``kernel``, a :class:`~.kernels.DiffusionKernel` (see :mod:`.kernels`):

    * ``'simple'`` (DIFFormer-s): :math:`S_{nl} \propto 1 + \tilde{q}_n^\top \tilde{k}_l`
      over all pairs, computed in linear cost;
    * ``'sigmoid'`` (DIFFormer-a): :math:`S_{nl} \propto \sigma(q_n^\top k_l)` over all
      pairs, computed in row blocks;
    * ``'gcn'``: :math:`S = \hat{A}`, diffusion along observed edges only;
    * ``'gat'``: :math:`S` is GAT attention over observed edges;
    * ``'none'``: :math:`S = I`, no diffusion (an MLP);
    * a class path ``'package.module.Class'``: a kernel of your own.

    The layer owns the projections (:math:`W_q, W_k` when the kernel is all-pairs, :math:`W_v`), the kernel
    its own parameters. The graph term :math:`\hat{A} V` (:math:`\hat{A} = D^{-1/2}(A+I)D^{-1/2}`) is added to
    the all-pairs kernels when ``use_graph``: with ``graph_weight <= 0`` as a plain sum
    (:math:`S V + \hat{A} V`), otherwise mixed with weight :math:`w`. The local kernels
    (``'gcn'``, ``'gat'``, ``'none'``) are defined by the graph or its absence, so
    ``use_graph`` and ``graph_weight`` do not apply to them.

    The layer is exposed as the pieces every executor composes (:meth:`forward` in memory, the
    streamed forward of :mod:`.streaming` chunk by chunk): :meth:`project`, the kernel's all-pairs
    term (``kernel.attention``, or streamed ``kernel.summarize`` / ``kernel.attend``), :meth:`local` (the
    graph term, or the local kernel's diffusion) and :meth:`combine`.

    Args:
        in_channels: size of each input row.
        out_channels: size of each head's output (equal to ``in_channels`` when
            ``use_weight=False``).
        num_heads: number of heads, averaged at the end.
        kernel: the diffusivity, see above: a name, a class path or a :class:`~.kernels.DiffusionKernel`
            subclass.
        use_graph: add the graph term to an all-pairs kernel.
        graph_weight: mixing weight of the graph term; ``<= 0`` sums the terms.
        use_weight: project V with a linear map; otherwise V is the input itself.
        qk_norm: ``'frobenius'`` (reference code) or ``'row'`` (paper), DIFFormer-s only.
        sigmoid_block_bytes: memory budget of one row block of DIFFormer-a.

    Raises:
        ValueError: an unknown kernel or option, or ``use_weight=False`` with ``in_channels != out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, num_heads: int = 1,
                 kernel: Union[str, Type[DiffusionKernel]] = "simple", use_graph: bool = True,
                 graph_weight: float = -1.0, use_weight: bool = True, qk_norm: QKNorm = "frobenius",
                 sigmoid_block_bytes: int = 2**30) -> None:
        super().__init__()
        kind = kernel_class(kernel)
        if not use_weight and in_channels != out_channels:
            raise ValueError(f"use_weight=False takes V = input, so in_channels ({in_channels}) must equal "
                             f"out_channels ({out_channels})")
        self.in_channels, self.out_channels, self.num_heads = in_channels, out_channels, num_heads
        self.use_weight = use_weight
        self.use_graph = use_graph and kind.all_pairs
        self.graph_weight = graph_weight
        # registered before the projections: the parameters keep 0.1.0's order (GAT's attention vectors first, as
        # the layer's own parameters were), so an optimiser state saved then maps onto them by position
        self.kernel = kind.build(out_channels, num_heads, qk_norm=qk_norm, sigmoid_block_bytes=sigmoid_block_bytes)
        width = out_channels * num_heads
        self.query = nn.Linear(in_channels, width) if kind.all_pairs else None
        self.key = nn.Linear(in_channels, width) if kind.all_pairs else None
        self.value = nn.Linear(in_channels, width) if use_weight else None
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)
        self.reset_parameters()

    @property
    def needs_graph(self) -> bool:
        return self.use_graph or self.kernel.needs_graph

    @property
    def needs_edge_list(self) -> bool:
        """Whether :meth:`local` reads the graph's edges one by one (GAT's attention over them), not only
        through :meth:`NormalizedGraph.propagate`."""
        return self.kernel.needs_graph and self.kernel.reads_edge_list

    def reset_parameters(self) -> None:
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                lin.reset_parameters()
        self.kernel.reset_parameters()

    def check_fits(self, num_nodes: int) -> None:
        """Raises before any work if the kernel cannot process ``num_nodes`` nodes at once."""
        self.kernel.check_fits(num_nodes)

    def exact_evaluation_flops(self, num_nodes: int) -> float:
        """An estimate of the floating-point operations of this layer over ``num_nodes`` nodes: the projections
        (Q, K and V for an all-pairs kernel, V otherwise) and the kernel's own (the edges' cost not counted)."""
        projections = 3 if self.kernel.all_pairs else 1
        return (float(num_nodes) * 2 * self.in_channels * self.num_heads * self.out_channels * projections
                + self.kernel.exact_evaluation_flops(num_nodes))

    def forward(self, x: Tensor, graph: Optional[NormalizedGraph] = None, batch: Optional[Tensor] = None) -> Tensor:
        """Maps ``x`` [N, in_channels] to [N, out_channels].

        ``graph`` is the :class:`NormalizedGraph` of the current nodes, required when
        ``needs_graph``; :class:`DIFFormer` builds it once for all its layers. ``batch``
        (sorted graph ids) keeps the global attention within each graph. DIFFormer-s on one
        graph with the reference's normalisation runs through :mod:`.fused` (the same function
        with a hand-written backward: ``kernel.fuses``); every other case through autograd on
        :meth:`project`, the kernel, :meth:`local` and :meth:`combine`.
        """
        if self.needs_graph and graph is None:
            raise ValueError(f"DIFFormerConv(kernel={self.kernel.qualified_name()!r}, use_graph={self.use_graph}) "
                             f"needs a graph: pass edge_index, or use use_graph=False / a kernel without a graph")
        if self.kernel.fuses(batch):
            return self._fused(x, graph)
        value, attention, local = self.terms(x, graph, batch)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.combine(value, attention, local)

    def terms(self, x: Tensor, graph: Optional[NormalizedGraph] = None, batch: Optional[Tensor] = None
              ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The parts :meth:`combine` mixes, each ``[N, H, out_channels]``: the values, the all-pairs
        term (``None`` for the local kernels) and the output of :meth:`local` (``None`` without a graph term),
        in float32 (float64 stays float64). Arguments as :meth:`forward`."""
        if self.needs_graph and graph is None:
            raise ValueError(f"DIFFormerConv(kernel={self.kernel.qualified_name()!r}, use_graph={self.use_graph}) "
                             f"needs a graph")
        query, key, value = self.project(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            attention = self.kernel.attention(query, key, value, batch) if self.kernel.all_pairs else None
            local = self.local(graph, value, value)
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

    def local(self, graph: Optional[NormalizedGraph], source_value: Tensor, target_value: Tensor
              ) -> Optional[Tensor]:
        r"""The local part, ``[T, H, D]``: a local kernel's diffusion (``kernel.propagate``), or for an all-pairs
        kernel the graph term :math:`\hat{A} V` (``None`` without ``use_graph``). ``graph`` holds rows of
        :math:`\hat{A}` (all of them, or a block of targets; ``None`` when not :attr:`needs_graph`),
        ``source_value`` ``[S, H, D]`` the values of its columns, ``target_value`` ``[T, H, D]`` those of its rows
        (read by GAT, by a block of :meth:`NormalizedGraph.row_block` for its self loops, and by ``'none'``)."""
        if not self.kernel.all_pairs:
            return self.kernel.propagate(graph, source_value, target_value)
        return graph.propagate(source_value, target_value) if self.use_graph else None

    def combine(self, value: Tensor, attention: Optional[Tensor], local: Optional[Tensor]) -> Tensor:
        """The layer's output ``[N, out_channels]``: the kernel's diffusion mixed with the graph term
        (:func:`~.graph.graph_term_weights`), averaged over heads. ``attention`` is the all-pairs term
        (``None`` for the local kernels), ``local`` the output of :meth:`local`."""
        if not self.kernel.all_pairs:
            out = local
        elif self.use_graph:
            attention_weight, local_weight = graph_term_weights(self.graph_weight)
            out = attention_weight * attention + local_weight * local
        else:
            out = attention
        return out[:, 0] if self.num_heads == 1 else out.mean(dim=1)  # one head: a view, not a copy

    def _fused(self, x: Tensor, graph: Optional[NormalizedGraph]) -> Tensor:
        """The kernel's fused form (DIFFormer-s on one graph, the reference's normalisation): one input
        projection for Q, K and V, then ``kernel.fused``, the same function at a fraction of the memory
        traffic."""
        projections = [self.query, self.key] + ([self.value] if self.use_weight else [])
        projected = F.linear(x, torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]))
        dtype = accumulation_dtype(projected.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            value = None if self.use_weight else x.to(dtype)
            return self.kernel.fused(projected.to(dtype), value, graph if self.use_graph else None,
                                     self.graph_weight)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.num_heads}, "
                f"kernel={self.kernel.qualified_name()!r}, use_graph={self.use_graph})")


# 0.1.0 kept GAT's attention vectors on the layer: its checkpoints name them ``<layer>.att_source``.
_MOVED_TO_KERNEL = ("att_source", "att_target")


def _upgrade_state_dict(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of :class:`DIFFormerConv` (``nn.Module.register_load_state_dict_pre_hook``):
    renames a 0.1.0 checkpoint's ``<prefix>att_source`` to ``<prefix>kernel.att_source`` in place."""
    for name in _MOVED_TO_KERNEL:
        if prefix + name in state_dict and prefix + "kernel." + name not in state_dict:
            state_dict[prefix + "kernel." + name] = state_dict.pop(prefix + name)


def upgrade_state_dict(model: nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Renames, in place, the entries a 0.1.0 checkpoint's ``state_dict`` holds under older names for every
    :class:`DIFFormerConv` of ``model`` (whose keys start with ``prefix``): what ``load_state_dict`` does by
    itself, for code that compares a checkpoint's names before loading it."""
    for name, module in model.named_modules():
        if isinstance(module, DIFFormerConv):
            _upgrade_state_dict(module, state_dict, f"{prefix}{name}." if name else prefix)
