"""The normalised adjacency of DIFFormer's graph term, built once per forward pass."""
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch_geometric.utils import add_remaining_self_loops, to_torch_csr_tensor


class NormalizedGraph(NamedTuple):
    r"""The propagation matrix :math:`\hat{A} = D^{-1/2}(A + I)D^{-1/2}` of the graph term.

    ``edge_index`` holds the edges with one self loop per node (messages flow
    ``edge_index[0] -> edge_index[1]``), ``edge_weight`` the normalised value of
    every edge, and ``adjacency`` the same matrix as a sparse CSR tensor whose rows
    are targets, ready for ``adjacency @ V``.
    """

    edge_index: Tensor
    edge_weight: Tensor
    adjacency: Tensor

    @property
    def num_nodes(self) -> int:
        return self.adjacency.size(0)

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
        with warnings.catch_warnings():  # torch warns about sparse CSR on every build
            warnings.filterwarnings("ignore", message="Sparse (CSR tensor support is in beta|invariant checks)")
            adjacency = to_torch_csr_tensor(edge_index.flip(0), norm, size=(num_nodes, num_nodes))
        return cls(edge_index, norm, adjacency)

    def propagate(self, values: Tensor) -> Tensor:
        """:math:`\\hat{A} V` for ``values`` of shape ``[N, ...]``, in float32.

        Sparse CSR products have no bfloat16 kernel (nor a bfloat16 backward), so the
        product runs in float32 with autocast off.
        """
        shape = values.shape
        with torch.autocast(device_type=values.device.type, enabled=False):
            dtype = accumulation_dtype(values.dtype)
            out = self.adjacency.to(dtype) @ values.reshape(shape[0], -1).to(dtype)
        return out.reshape(shape)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype global sums run in: float32 for low-precision inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)
