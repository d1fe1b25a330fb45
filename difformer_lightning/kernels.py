r"""The diffusivity of a DIFFormer layer, one class per kernel: the only place that knows what each kernel is.

A DIFFormer layer (:class:`~difformer_lightning.DIFFormerConv`) computes, per head,
:math:`\mathbf{c} = (1 - w)\,S V + w\,\hat{A} V` (Wu et al., ICLR 2023, eq. 10 and section 4); the kernel is
:math:`S`. Each class below owns what its :math:`S` needs and says what it is, so the layer, the streamed exact pass
(:mod:`.streaming`) and the data modules ask it instead of comparing names:

* what it reads: :attr:`DiffusionKernel.all_pairs` (every pair of nodes, from the layer's queries and keys; the
  graph term may be added), :attr:`DiffusionKernel.needs_graph` (diffusion along the observed edges),
  :attr:`DiffusionKernel.reads_edge_list` (each edge one by one, not only through :math:`\hat{A}`);
* its parameters (GAT's attention vectors; the layer owns the projections :math:`W_q, W_k, W_v`, which every
  all-pairs kernel reads, as in the paper and the reference's ``DIFFormerConv``);
* its cost and its fit: :meth:`DiffusionKernel.exact_evaluation_flops`, :attr:`DiffusionKernel.quadratic_cost`,
  :meth:`DiffusionKernel.check_fits`;
* how it runs in memory (:meth:`DiffusionKernel.attention`, :meth:`DiffusionKernel.propagate`) and streamed chunk by
  chunk over a graph that does not fit (:meth:`DiffusionKernel.summarize`, :attr:`DiffusionKernel.streamed_arrays`,
  :meth:`DiffusionKernel.attend`).

Configs name a kernel by its :data:`KERNELS` name (``kernel: simple``) or by a class path
(``kernel: my_package.kernels.GaussianKernel``) of a :class:`DiffusionKernel` subclass; :func:`kernel_class`
resolves both. docs/encoder.md shows a user's kernel, trained from the command line.
"""
import importlib
import inspect
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional, Tuple, Type, Union, get_args

import torch
from torch import Tensor, nn

from .attention import (LinearAttentionStats, QKNorm, edge_attention, linear_attention, sigmoid_attention,
                        sigmoid_rows_per_block, sigmoid_sums)
from .fused import fused_linear_diffusion
from .graph import NormalizedGraph

# Reads every chunk's rows of the arrays a kernel names in ``streamed_arrays``: one mapping name -> [L, H, D] per
# chunk, in chunk order, each time it is called.
ChunkReader = Callable[[], Iterable[Mapping[str, Tensor]]]


class DiffusionKernel(nn.Module):
    r"""The diffusivity :math:`S` of one layer (base class; subclass it for a kernel of your own).

    Tensors are ``[N, H, D]`` (nodes, heads, channels per head) in the dtype sums run in (float32, or float64);
    the layer calls every method with autocast disabled.

    A kernel is either **all-pairs** (:attr:`all_pairs`: :math:`S` from the layer's queries and keys over every
    pair of nodes; implement :meth:`attention`, and for exact evaluation of graphs larger than memory
    :meth:`summarize` / :attr:`streamed_arrays` / :meth:`attend`) or **local** (implement :meth:`propagate`:
    :math:`S V` from the graph, :attr:`needs_graph`, or from each node alone).

    Its ``__init__`` takes ``out_channels`` and ``num_heads`` (the layer's ``D`` and ``H``) and any of the layer's
    kernel options it names (``qk_norm``, ``sigmoid_block_bytes``), creates its parameters, and leaves their
    initialisation to :meth:`reset_parameters`, which the layer calls (after initialising its projections, so that
    a seed gives the weights it gave before kernels were classes).
    """

    #: What configs call it; a kernel not in :data:`KERNELS` is named by its class path.
    name: ClassVar[Optional[str]] = None
    #: How messages name it ("DIFFormer-s", "GAT").
    title: ClassVar[str] = ""
    #: :math:`S` covers every pair of nodes, from the layer's queries and keys (the layer projects them).
    all_pairs: ClassVar[bool] = False
    #: :math:`S` is defined by the observed edges: the layer needs the graph.
    needs_graph: ClassVar[bool] = False
    #: :meth:`propagate` reads the edges one by one (``graph.source``/``graph.target``), not only
    #: :meth:`NormalizedGraph.propagate`: the streamed pass then builds each block's edge list.
    reads_edge_list: ClassVar[bool] = False
    #: Exact evaluation costs :math:`O(N^2)` (every query against every key): the data modules then evaluate
    #: exactly only on request and within a FLOP budget.
    quadratic_cost: ClassVar[bool] = False
    #: Per-node arrays (``"key"``, ``"value"``, ``"query"``) a streamed pass stores in its scratch so that
    #: :meth:`attend` can read every chunk's rows of them.
    streamed_arrays: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, out_channels: int, num_heads: int) -> None:
        super().__init__()
        self.out_channels, self.num_heads = out_channels, num_heads

    @classmethod
    def qualified_name(cls) -> str:
        """Its :data:`KERNELS` name, or its class path (what a config names it by)."""
        return cls.name if KERNELS.get(cls.name) is cls else f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def build(cls, out_channels: int, num_heads: int, **options: Any) -> "DiffusionKernel":
        """An instance, given the layer's kernel ``options`` that ``__init__`` names (the others do not apply)."""
        accepted = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        return cls(out_channels, num_heads, **{key: value for key, value in options.items()
                                               if takes_any or key in accepted})

    def reset_parameters(self) -> None:
        """Initialises the kernel's own parameters (none by default)."""

    def check_fits(self, num_nodes: int) -> None:
        """Raises a ``ValueError`` before any work when one forward over ``num_nodes`` nodes cannot fit."""

    def exact_evaluation_flops(self, num_nodes: int) -> float:
        """Floating-point operations of the kernel over ``num_nodes`` nodes in one layer, beyond the layer's
        projections (an estimate; edges are not counted)."""
        return 0.0

    # all-pairs kernels
    def attention(self, query: Tensor, key: Tensor, value: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        """:math:`S V` over every pair of nodes in memory. ``batch`` ``[N]`` (sorted graph ids): pairs within a
        graph only. Shapes: ``[N, H, D]`` each -> ``[N, H, D]``."""
        raise NotImplementedError(f"{type(self).__name__} is not an all-pairs kernel (all_pairs=False)")

    def summarize(self, query: Tensor, key: Tensor, value: Tensor) -> Optional[Tensor]:
        """The streamed pass's first sweep: an additive summary ``[S]`` (float64) of one chunk of nodes (the
        chunks' summaries are added, over ranks too), or ``None`` when :meth:`attend` reads the chunks themselves
        (:attr:`streamed_arrays`)."""
        return None

    def attend(self, query: Tensor, summary: Optional[Tensor], chunks: ChunkReader) -> Tensor:
        """The streamed pass's second sweep: :math:`S V` ``[B, H, D]`` of a chunk's ``query`` ``[B, H, D]``
        over every node, from the sum of :meth:`summarize` over all chunks (``summary``) and/or the
        :attr:`streamed_arrays` of every chunk (``chunks()``). Must equal :meth:`attention` over all nodes."""
        raise NotImplementedError(f"{type(self).__name__} has no streamed form: exact evaluation of graphs larger "
                                  f"than memory needs attend() (and summarize() or streamed_arrays)")

    def fuses(self, batch: Optional[Tensor]) -> bool:
        """Whether the layer should run :meth:`fused` (one hand-differentiated function for projections,
        kernel and graph term) instead of :meth:`attention` plus the graph term."""
        return False

    def fused(self, projected: Tensor, value: Optional[Tensor], graph: Optional[NormalizedGraph],
              graph_weight: float) -> Tensor:
        raise NotImplementedError

    # local kernels
    def propagate(self, graph: Optional[NormalizedGraph], source_value: Tensor, target_value: Tensor) -> Tensor:
        """:math:`S V` ``[T, H, D]`` for the rows of ``graph`` (all nodes, or a block of targets): ``source_value``
        ``[S, H, D]`` the values of its columns, ``target_value`` ``[T, H, D]`` those of its rows. ``graph`` is
        ``None`` for a kernel without :attr:`needs_graph`."""
        raise NotImplementedError(f"{type(self).__name__} is not a local kernel (all_pairs=True)")

    def extra_repr(self) -> str:
        return repr(self.qualified_name())


class SimpleKernel(DiffusionKernel):
    r"""DIFFormer-s: :math:`S_{nl} \propto 1 + \tilde{q}_n^\top \tilde{k}_l` over all pairs, in linear cost
    (:func:`~.attention.linear_attention`; paper eq. 14, the reference's ``full_attention_conv``, kernel
    ``'simple'``). ``qk_norm``: ``'frobenius'`` (the reference code, the fused path) or ``'row'`` (the paper).
    Streamed: the global sums (:class:`~.attention.LinearAttentionStats`) then each chunk's queries against them.
    """

    name, title, all_pairs = "simple", "DIFFormer-s", True

    def __init__(self, out_channels: int, num_heads: int, qk_norm: QKNorm = "frobenius") -> None:
        super().__init__(out_channels, num_heads)
        check_choice("qk_norm", qk_norm, get_args(QKNorm))
        self.qk_norm = qk_norm

    def exact_evaluation_flops(self, num_nodes: int) -> float:
        return float(num_nodes) * 4 * self.num_heads * self.out_channels * (self.out_channels + 1)

    def attention(self, query: Tensor, key: Tensor, value: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        return linear_attention(query, key, value, self.qk_norm, batch)

    def summarize(self, query: Tensor, key: Tensor, value: Tensor) -> Optional[Tensor]:
        return self._statistics(query, key, value).flatten()

    def attend(self, query: Tensor, summary: Optional[Tensor], chunks: ChunkReader) -> Tensor:
        zeros = query.new_zeros(1, self.num_heads, self.out_channels)
        stats = self._statistics(zeros, zeros, zeros).unflatten(summary).to(query.dtype)
        return stats.attend(query.unsqueeze(0), self.qk_norm)[0]

    def _statistics(self, query: Tensor, key: Tensor, value: Tensor) -> LinearAttentionStats:
        return LinearAttentionStats.of(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), self.qk_norm)

    def fuses(self, batch: Optional[Tensor]) -> bool:
        return self.qk_norm == "frobenius" and batch is None

    def fused(self, projected: Tensor, value: Optional[Tensor], graph: Optional[NormalizedGraph],
              graph_weight: float) -> Tensor:
        """:func:`~.fused.fused_linear_diffusion` (the same function at a fraction of the memory traffic)."""
        return fused_linear_diffusion(projected, self.num_heads, graph, graph_weight, value)

    def extra_repr(self) -> str:
        return f"'simple', qk_norm={self.qk_norm!r}"


class SigmoidKernel(DiffusionKernel):
    r"""DIFFormer-a: :math:`S_{nl} \propto \sigma(q_n^\top k_l)` over all pairs, row-normalised
    (:func:`~.attention.sigmoid_attention`; paper eq. 15, the reference's kernel ``'sigmoid'``), in row blocks of
    at most ``sigmoid_block_bytes``. Exact evaluation costs :math:`O(N^2)`. Streamed: every chunk's queries
    against every chunk's keys and values."""

    name, title, all_pairs, quadratic_cost = "sigmoid", "DIFFormer-a", True, True
    streamed_arrays = ("key", "value")

    def __init__(self, out_channels: int, num_heads: int, sigmoid_block_bytes: int = 2**30) -> None:
        super().__init__(out_channels, num_heads)
        self.sigmoid_block_bytes = sigmoid_block_bytes

    def check_fits(self, num_nodes: int) -> None:
        sigmoid_rows_per_block(num_nodes, self.num_heads, self.sigmoid_block_bytes)

    def exact_evaluation_flops(self, num_nodes: int) -> float:
        return float(num_nodes) ** 2 * self.num_heads * (4 * self.out_channels + 4)

    def attention(self, query: Tensor, key: Tensor, value: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        return sigmoid_attention(query, key, value, self.sigmoid_block_bytes, batch)

    def attend(self, query: Tensor, summary: Optional[Tensor], chunks: ChunkReader) -> Tensor:
        # each chunk's keys read once; the query rows in blocks whose scores fit sigmoid_block_bytes; each row's
        # sums added in chunk order
        numerator = denominator = None
        heads_first = query.transpose(0, 1)
        for arrays in chunks():
            key, value = (arrays[name].transpose(0, 1) for name in ("key", "value"))
            rows = sigmoid_rows_per_block(key.size(1), self.num_heads, self.sigmoid_block_bytes)
            parts = [sigmoid_sums(block, key, value) for block in heads_first.split(rows, dim=1)]
            chunk_numerator, chunk_denominator = (torch.cat(side, dim=1) for side in zip(*parts))
            numerator = chunk_numerator if numerator is None else numerator + chunk_numerator
            denominator = chunk_denominator if denominator is None else denominator + chunk_denominator
        return (numerator / denominator).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"'sigmoid', sigmoid_block_bytes={self.sigmoid_block_bytes}"


class GCNKernel(DiffusionKernel):
    r"""GCN: :math:`S = \hat{A} = D^{-1/2}(A + I)D^{-1/2}`, diffusion along the observed edges only (Kipf and
    Welling 2017; the paper's special case, section 3.2)."""

    name, title, needs_graph = "gcn", "GCN", True

    def propagate(self, graph: Optional[NormalizedGraph], source_value: Tensor, target_value: Tensor) -> Tensor:
        return graph.propagate(source_value, target_value)


class GATKernel(DiffusionKernel):
    r"""GAT: :math:`S` is attention over each node's in-edges and itself,
    :math:`\mathrm{softmax}_l\, \mathrm{LeakyReLU}(a_t^\top v_n + a_s^\top v_l)` (Velickovic et al. 2018, as PyG's
    ``GATConv``; :func:`~.attention.edge_attention`). Parameters: ``att_source``, ``att_target`` ``[H, D]``."""

    name, title, needs_graph, reads_edge_list = "gat", "GAT", True, True

    def __init__(self, out_channels: int, num_heads: int) -> None:
        super().__init__(out_channels, num_heads)
        self.att_source = nn.Parameter(torch.empty(num_heads, out_channels))
        self.att_target = nn.Parameter(torch.empty(num_heads, out_channels))

    def reset_parameters(self) -> None:
        for att in (self.att_source, self.att_target):
            nn.init.xavier_uniform_(att)

    def propagate(self, graph: Optional[NormalizedGraph], source_value: Tensor, target_value: Tensor) -> Tensor:
        return edge_attention(source_value[graph.source], target_value, graph.target,
                              self.att_source.to(source_value.dtype), self.att_target.to(source_value.dtype))


class NoDiffusion(DiffusionKernel):
    """MLP: :math:`S = I`, no diffusion (the paper's special case)."""

    name, title = "none", "MLP"

    def propagate(self, graph: Optional[NormalizedGraph], source_value: Tensor, target_value: Tensor) -> Tensor:
        return target_value


#: The kernels configs name (``kernel: simple``).
KERNELS: Dict[str, Type[DiffusionKernel]] = {kernel.name: kernel for kernel in
                                             (SimpleKernel, SigmoidKernel, GCNKernel, GATKernel, NoDiffusion)}


def check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(repr, choices))}")


def kernel_class(kernel: Union[str, Type[DiffusionKernel]]) -> Type[DiffusionKernel]:
    """The class of ``kernel``: a :data:`KERNELS` name, a class path ``'package.module.Class'`` (importable: on
    ``PYTHONPATH``) or the class itself.

    Raises:
        ValueError: an unknown name, a path that does not import, or a class that is not a
            :class:`DiffusionKernel` subclass (naming the fix).
    """
    if isinstance(kernel, type):
        found = kernel
    elif kernel in KERNELS:
        return KERNELS[kernel]
    elif "." in str(kernel):
        module_name, _, class_name = str(kernel).rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"kernel {kernel!r} cannot be imported ({error}): a kernel of your own is named by the "
                             f"class path of a DiffusionKernel subclass in a module on PYTHONPATH") from error
    else:
        raise ValueError(f"unknown kernel {kernel!r}: choose one of {', '.join(map(repr, KERNELS))}, or name a "
                         f"DiffusionKernel subclass of your own by its class path ('package.module.Class')")
    if not (isinstance(found, type) and issubclass(found, DiffusionKernel)):
        raise ValueError(f"kernel {kernel!r} is {found!r}, not a subclass of difformer_lightning.DiffusionKernel")
    if found.all_pairs and found.needs_graph:
        raise ValueError(f"kernel {kernel!r} sets both all_pairs and needs_graph: an all-pairs kernel gets the graph "
                         f"as the layer's graph term (use_graph), a local one diffuses along it")
    return found
