"""The normalised adjacency of DIFFormer's graph term, built once per forward pass."""
import warnings
from typing import Optional

import torch
from torch import Tensor
from torch_geometric.utils import add_remaining_self_loops


class NormalizedGraph:
    r"""The propagation matrix :math:`\hat{A} = D^{-1/2}(A + I)D^{-1/2}` of the graph term.

    ``edge_index`` holds the edges with one self loop per node (messages flow
    ``edge_index[0] -> edge_index[1]``), ``edge_weight`` the normalised value of
    every edge, and ``adjacency`` the same matrix as a sparse CSR tensor whose rows
    are targets, ready for ``adjacency @ V``. ``transposed`` (:math:`\hat{A}^\top`, for
    gradients) is built on first use and then shared by every layer of the forward pass.
    """

    def __init__(self, edge_index: Tensor, edge_weight: Tensor, adjacency: Tensor) -> None:
        self.edge_index, self.edge_weight, self.adjacency = edge_index, edge_weight, adjacency
        self._transposed: Optional[Tensor] = None

    @property
    def num_nodes(self) -> int:
        return self.adjacency.size(0)

    @property
    def transposed(self) -> Tensor:
        if self._transposed is None:
            self._transposed = _csr(self.edge_index[0], self.edge_index[1], self.edge_weight, self.num_nodes)
        return self._transposed

    @classmethod
    def build(cls, edge_index: Tensor, edge_weight: Optional[Tensor], num_nodes: int,
              dtype: torch.dtype = torch.float32) -> "NormalizedGraph":
        """Adds missing self loops and normalises as the reference code does.

        The degree counts edges at their target and ignores edge weights, which then
        multiply the normalised values. This differs from PyG's ``gcn_norm`` (weighted
        degree), so it is computed here. Values are float32 unless ``dtype`` asks for more.
        """
        if edge_weight is not None:
            edge_weight = edge_weight.to(dtype)
        edge_index, edge_weight = add_remaining_self_loops(edge_index, edge_weight, fill_value=1.0,
                                                           num_nodes=num_nodes)
        source, target = edge_index
        degree = torch.bincount(target, minlength=num_nodes).to(dtype)
        inv_sqrt = degree.pow(-0.5).masked_fill_(degree == 0, 0.0)
        norm = inv_sqrt[source] * inv_sqrt[target]
        if edge_weight is not None:
            norm = torch.nan_to_num(norm * edge_weight, nan=0.0, posinf=0.0, neginf=0.0)
        return cls(edge_index, norm, _csr(target, source, norm, num_nodes))

    def propagate(self, values: Tensor) -> Tensor:
        """:math:`\\hat{A} V` for ``values`` of shape ``[N, ...]``, in float32.

        Sparse CSR products have no bfloat16 kernel (nor a bfloat16 backward), so the
        product runs in float32 with autocast off. Its gradient is :math:`\\hat{A}^\\top G`
        with the cached ``transposed``: autograd's own backward of a sparse product would
        transpose (sort) the matrix again in every layer.
        """
        shape = values.shape
        with torch.autocast(device_type=values.device.type, enabled=False):
            dtype = accumulation_dtype(values.dtype)
            out = _Propagate.apply(self, values.reshape(shape[0], -1).to(dtype))
        return out.reshape(shape)


class _Propagate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: NormalizedGraph, values: Tensor) -> Tensor:
        ctx.graph = graph
        return graph.adjacency.to(values.dtype) @ values

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, ctx.graph.transposed.to(grad.dtype) @ grad


def _csr(rows: Tensor, columns: Tensor, values: Tensor, num_nodes: int) -> Tensor:
    """A sparse CSR matrix with an entry ``values[e]`` at ``(rows[e], columns[e])``.

    Repeated entries stay separate (a product sums them, as coalescing would): PyG's
    ``to_torch_csr_tensor`` coalesces, a sort by row and column plus a pass for duplicates,
    where a stable sort by row is all CSR needs.
    """
    order = torch.sort(rows, stable=True).indices
    row_pointer = torch.zeros(num_nodes + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=num_nodes), dim=0, out=row_pointer[1:])
    with warnings.catch_warnings():  # torch warns about sparse CSR on every build
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
        return torch.sparse_csr_tensor(row_pointer, columns[order], values[order], size=(num_nodes, num_nodes))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype global sums run in: float32 for low-precision inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)
