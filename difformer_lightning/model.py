"""The DIFFormer encoder: an input block, L diffusion steps, an output map."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import QKNorm
from .conv import DIFFormerConv
from .graph import NormalizedGraph, accumulation_dtype, graph_term_weights
from .kernels import DiffusionKernel


def check_edge_ids(edge_index: Tensor, num_nodes: int) -> None:
    """Raises a ``ValueError`` when ``edge_index`` ``[2, E]`` holds a node id outside ``[0, num_nodes)`` (a
    sparse product would drop such an edge without a word), naming the smallest and largest id."""
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise ValueError(f"edge_index must be [2, num_edges], got {tuple(edge_index.shape)}")
    if edge_index.numel():
        low, high = int(edge_index.min()), int(edge_index.max())
        if low < 0 or high >= num_nodes:
            raise ValueError(f"edge_index holds node ids from {low} to {high}, but x has {num_nodes} rows (ids must "
                             f"be in [0, {num_nodes}))")


class DIFFormer(nn.Module):
    r"""DIFFormer (Wu et al., ICLR 2023), as the reference code computes it.

    .. math::
        h_0 &= \mathrm{Dropout}(\mathrm{ReLU}(\mathrm{LN}(x W_{in})))\\
        h_i &= \mathrm{Dropout}(\mathrm{LN}_i(\alpha\, \mathrm{conv}_i(h_{i-1}) + (1-\alpha) h_{i-1}))\\
        \mathrm{logits} &= h_L W_{out}

    Each step is an explicit Euler step of the energy-constrained diffusion with step
    size :math:`\alpha` (the paper's :math:`\tau`); there is no non-linearity between
    steps. ``use_bn`` switches the LayerNorms (the reference's flag name),
    ``use_residual`` the :math:`\alpha` mix. ``kernel`` chooses the diffusivity, so the
    paper's baselines are the same network: ``'none'`` (MLP), ``'gcn'``, ``'gat'``; a class path
    (``'package.module.Class'``) names a :class:`~.kernels.DiffusionKernel` of your own. See
    :class:`DIFFormerConv` for the remaining arguments.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, num_layers: int = 2,
                 num_heads: int = 1, kernel: str = "simple", use_graph: bool = True, graph_weight: float = -1.0,
                 alpha: float = 0.5, dropout: float = 0.0, use_bn: bool = True, use_residual: bool = True,
                 use_weight: bool = True, qk_norm: QKNorm = "frobenius", sigmoid_block_bytes: int = 2**30) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden_channels", hidden_channels),
                            ("out_channels", out_channels), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("sigmoid_block_bytes", sigmoid_block_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value, low, high, closed in (("alpha", alpha, 0.0, 1.0, True), ("dropout", dropout, 0.0, 1.0, False)):
            if not (low <= value <= high if closed else low <= value < high):
                raise ValueError(f"{name} must be in [{low}, {high}{']' if closed else ')'}, got {value}"
                                 + (" (the step h <- (1 - alpha) h + alpha update is a convex combination)"
                                    if name == "alpha" else ""))
        if graph_weight > 1:
            raise ValueError(f"graph_weight must be <= 1 (in (0, 1]: the graph term's share; <= 0: a plain sum), "
                             f"got {graph_weight}")
        self.alpha, self.dropout, self.use_residual = alpha, dropout, use_residual
        self.lin_in = nn.Linear(in_channels, hidden_channels)
        self.norm_in = nn.LayerNorm(hidden_channels) if use_bn else nn.Identity()
        self.convs = nn.ModuleList(
            DIFFormerConv(hidden_channels, hidden_channels, num_heads, kernel, use_graph, graph_weight, use_weight,
                          qk_norm, sigmoid_block_bytes) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_channels) if use_bn else nn.Identity()
                                   for _ in range(num_layers))
        self.lin_out = nn.Linear(hidden_channels, out_channels)

    @property
    def needs_graph(self) -> bool:
        return self.convs[0].needs_graph

    def reset_parameters(self) -> None:
        for module in (self.lin_in, self.norm_in, *self.convs, *self.norms, self.lin_out):
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def check_fits(self, num_nodes: int) -> None:
        """Raises before any work if a forward pass over ``num_nodes`` nodes cannot fit."""
        self.convs[0].check_fits(num_nodes)

    def forward(self, x: Tensor, edge_index: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None,
                batch: Optional[Tensor] = None) -> Tensor:
        """Logits ``[N, out_channels]`` for node features ``x`` [N, in_channels].

        ``edge_index`` [2, E] (messages ``edge_index[0] -> edge_index[1]``) and optional
        ``edge_weight`` [E] give the graph; self loops are added where missing. ``batch`` [N]
        (sorted graph ids, as in a PyG ``Batch``) treats the nodes as separate graphs: the
        global attention never crosses graphs, so each gets what it would get alone.
        """
        return self.decode(self.diffuse(x, edge_index, edge_weight, batch)[-1])

    def diffuse(self, x: Tensor, edge_index: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None,
                batch: Optional[Tensor] = None) -> List[Tensor]:
        r"""The states :math:`[h_0, h_1, \dots, h_L]` of the diffusion, each ``[N, hidden_channels]``
        (what :class:`~callbacks.Energy` evaluates the energy on; ``h_L`` is the node embedding)."""
        graph = None
        if self.needs_graph:
            if edge_index is None:
                raise ValueError("this DIFFormer uses the graph (use_graph=True or kernel 'gcn'/'gat') but no "
                                 "edge_index was given; pass one, or build the model with use_graph=False")
            check_edge_ids(edge_index, x.size(0))
            graph = NormalizedGraph.build(edge_index, edge_weight, x.size(0), accumulation_dtype(x.dtype))
        states = [self.encode(x)]
        for layer, conv in enumerate(self.convs):
            states.append(self.step(layer, states[-1], conv(states[-1], graph, batch)))
        return states

    def encode(self, x: Tensor) -> Tensor:
        r"""The input block, :math:`h_0 = \mathrm{Dropout}(\mathrm{ReLU}(\mathrm{LN}(x W_{in})))`:
        ``[N, in_channels]`` -> ``[N, hidden_channels]``. Row-wise, so any chunk of rows can be encoded alone."""
        return F.dropout(F.relu(self.norm_in(self.lin_in(x))), self.dropout, self.training)

    def step(self, layer: int, h: Tensor, update: Tensor) -> Tensor:
        r"""The explicit Euler step of layer ``layer`` (0-based) from state ``h`` and the layer's
        output ``update`` (both ``[N, hidden_channels]``): :math:`\alpha\, \mathrm{update} + (1 - \alpha) h`
        with ``use_residual`` (``update`` alone otherwise), then the layer's LayerNorm and dropout.
        Row-wise, so any chunk of rows can be stepped alone."""
        if self.use_residual:  # alpha * update + (1 - alpha) * h in one pass instead of three
            dtype = torch.promote_types(h.dtype, update.dtype)  # autocast may leave h in bfloat16
            h = torch.lerp(h.to(dtype), update.to(dtype), self.alpha)
        else:
            h = update
        return F.dropout(self.norms[layer](h), self.dropout, self.training)

    @property
    def mixes_graph_and_attention(self) -> bool:
        """Whether each layer adds the graph term to an all-pairs attention term (DIFFormer-s/-a with
        ``use_graph``), the models :meth:`graph_term_ratios` applies to."""
        return self.convs[0].use_graph and self.kernel.all_pairs

    @torch.no_grad()
    def graph_term_ratios(self, x: Tensor, edge_index: Tensor, edge_weight: Optional[Tensor] = None,
                          batch: Optional[Tensor] = None) -> List[float]:
        r"""Per layer, how much larger the graph term is than the all-pairs term it is added to:
        :math:`\lVert w_g \hat{A} V \rVert_F / \lVert w_a\, \mathrm{attention} \rVert_F` with the layer's
        weights (:func:`~.graph.graph_term_weights`), on the states the layer receives in this forward pass
        (arguments as :meth:`forward`; eval mode is the caller's choice). A ratio in the thousands means the
        layer is a graph diffusion whatever the kernel (england_covid's raw trip counts as edge weights:
        see ``datamodules.temporal.transform_edge_weights``).

        Raises:
            ValueError: the model has no attention term beside a graph term (``use_graph=False``, or the
                kernels ``'none'``, ``'gcn'``, ``'gat'``).
        """
        if not self.mixes_graph_and_attention:
            raise ValueError(f"graph_term_ratios compares the graph term with the attention term: this model "
                             f"(kernel {self.kernel.qualified_name()!r}, use_graph={self.convs[0].use_graph}) does not have both")
        check_edge_ids(edge_index, x.size(0))
        graph = NormalizedGraph.build(edge_index, edge_weight, x.size(0), accumulation_dtype(x.dtype))
        h, ratios = self.encode(x), []
        for layer, conv in enumerate(self.convs):
            value, attention, local = conv.terms(h, graph, batch)
            attention_weight, local_weight = graph_term_weights(conv.graph_weight)
            ratios.append(float((local_weight * local).norm() / (attention_weight * attention).norm()))
            h = self.step(layer, h, conv.combine(value, attention, local))
        return ratios

    def decode(self, h: Tensor) -> Tensor:
        """The output map: final states ``[N, hidden_channels]`` -> logits ``[N, out_channels]``."""
        return self.lin_out(h)

    @property
    def hidden_channels(self) -> int:
        return self.lin_in.out_features

    @property
    def kernel(self) -> DiffusionKernel:
        """The first layer's kernel (every layer's is of the same class): what the data modules and the streamed
        pass ask what it needs."""
        return self.convs[0].kernel

    @property
    def quadratic_cost(self) -> bool:
        """Whether an exact pass over N nodes costs O(N^2) (DIFFormer-a: every query against every key)."""
        return self.kernel.quadratic_cost

    def exact_evaluation_flops(self, num_nodes: int) -> float:
        """An estimate of the floating-point operations of one exact forward pass over ``num_nodes``
        nodes: quadratic in ``num_nodes`` for DIFFormer-a (every query against every key), linear for the
        other kernels (the edges' cost is not counted)."""
        return sum(conv.exact_evaluation_flops(num_nodes) for conv in self.convs)
