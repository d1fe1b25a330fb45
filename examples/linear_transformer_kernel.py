r"""A diffusivity kernel of one's own: the linear Transformer's :math:`S_{nl} \propto \phi(q_n)^\top \phi(k_l)`,
:math:`\phi = \mathrm{elu} + 1` (Katharopoulos et al., ICML 2020), with a learnable per-head temperature.

Put this file's folder on ``PYTHONPATH`` and name the class in a config or on the command line:

    PYTHONPATH=examples python train.py fit --config configs/synthetic.yaml \
        --model.encoder.init_args.kernel linear_transformer_kernel.LinearTransformerKernel

It trains, evaluates exactly (also streamed over a graph larger than memory: :meth:`summarize` and
:meth:`attend`) and resumes like the built-in kernels; ``tests/test_kernels.py`` checks each of these against a
dense float64 computation.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difformer_lightning import DiffusionKernel


class LinearTransformerKernel(DiffusionKernel):
    r""":math:`S_{nl} = \phi(q_n / t)^\top \phi(k_l) / \sum_m \phi(q_n / t)^\top \phi(k_m)` over all pairs, in
    linear cost: :math:`\sum_l \phi(k_l) v_l^\top` ``[H, D, D]`` and :math:`\sum_l \phi(k_l)` ``[H, D]`` are all it
    needs of the other nodes, so the streamed pass adds them up chunk by chunk. ``t`` is a learnable per-head
    temperature (initially 1).

    Shapes: query, key, value ``[N, H, D]`` -> ``[N, H, D]``.
    """

    all_pairs = True  # S over every pair from the layer's queries and keys; the graph term may be added

    def __init__(self, out_channels: int, num_heads: int) -> None:
        super().__init__(out_channels, num_heads)
        self.log_temperature = nn.Parameter(torch.empty(num_heads))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.log_temperature)

    def exact_evaluation_flops(self, num_nodes: int) -> float:
        return float(num_nodes) * 4 * self.num_heads * self.out_channels * (self.out_channels + 1)

    def _feature(self, query: Tensor) -> Tensor:
        return F.elu(query / self.log_temperature.exp().to(query.dtype).view(1, -1, 1)) + 1

    def _sums(self, key: Tensor, value: Tensor) -> Tensor:
        r""":math:`[\sum_l \phi(k_l) v_l^\top \mid \sum_l \phi(k_l)]`, ``[H, D, D + 1]``."""
        feature = F.elu(key) + 1
        return torch.einsum("nhm,nhd->hmd", feature, torch.cat([value, torch.ones_like(value[..., :1])], dim=-1))

    def _combine(self, query: Tensor, sums: Tensor) -> Tensor:
        product = torch.einsum("nhm,hmd->nhd", self._feature(query), sums)
        return product[..., :-1] / product[..., -1:]

    def attention(self, query: Tensor, key: Tensor, value: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        if batch is None:
            return self._combine(query, self._sums(key, value))
        counts = torch.unique_consecutive(batch, return_counts=True)[1].tolist()  # each graph attends to itself
        return torch.cat([self._combine(q, self._sums(k, v)) for q, k, v in
                          zip(query.split(counts), key.split(counts), value.split(counts))])

    def summarize(self, query: Tensor, key: Tensor, value: Tensor) -> Optional[Tensor]:
        return self._sums(key, value).flatten().double()  # chunks' sums add up

    def attend(self, query: Tensor, summary: Optional[Tensor], chunks) -> Tensor:
        shape = (self.num_heads, self.out_channels, self.out_channels + 1)
        return self._combine(query, summary.view(shape).to(query.dtype))
