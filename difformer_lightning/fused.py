r"""DIFFormer-s propagation of one layer with a hand-written backward.

The same function as :func:`~difformer_lightning.attention.linear_attention` (one graph,
``qk_norm='frobenius'``) plus the graph term and the mean over heads, but computed so that a
step costs little beyond its matrix products. Written by hand because autograd cannot see
what makes it cheap (measured on 100,000 nodes x 128 channels, 2 CPU cores, in
benchmarks/step.py):

* The Frobenius norms are scalars, so :math:`\tilde Q = Q / \|Q\|` and :math:`\tilde K` are never
  formed: the scale :math:`s = 1 / (\|Q\| \|K\|)` multiplies the small ``[D, D + 1]`` matrix
  :math:`M = s\,[K^\top V \mid K^\top \mathbf{1}]`, and one product :math:`P = Q M` gives the
  numerator and the denominator together.
* Autograd differentiates the division by the broadcast denominator, the norms and the head
  slices with several full-size temporaries each; here the gradients of Q, K and V are written
  by one matrix product each straight into their columns of one buffer (the layout the fused
  input projection produced), and the norms' gradient is a scalar times Q or K folded into
  that product (``addmm``'s ``beta``), because :math:`\langle \tilde Q, \partial \tilde Q\rangle
  = \langle \tilde K, \partial \tilde K \rangle = \langle M, \partial M \rangle` are equal scalars
  computed from ``[D, D + 1]`` matrices.
* The graph term is applied once to the mean of the heads' values (the product is linear).

Forward, for every head :math:`h` with :math:`\Sigma_V = V_h^\top \mathbf{1}`:

.. math::
    P_h = Q_h M_h, \qquad \mathrm{attn}_h = \frac{P_h[:, :D] + \mathbf{1}\Sigma_V^\top}{P_h[:, D] + N},
    \qquad \mathrm{out} = (1 - w)\,\frac{1}{H}\sum_h \mathrm{attn}_h + w\,\hat A\,\frac{1}{H}\sum_h V_h

(the mix with :math:`w` when ``graph_weight > 0``, a plain sum otherwise, no graph term when
``graph`` is ``None``). Results equal the autograd path to float32 rounding (tests compare
values and gradients in float64).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .attention import NORM_EPS, LinearAttentionStats
from .graph import NormalizedGraph, graph_term_weights


def fused_linear_diffusion(projected: Tensor, num_heads: int, graph: Optional[NormalizedGraph] = None,
                           graph_weight: float = -1.0, value: Optional[Tensor] = None) -> Tensor:
    """DIFFormer-s (Frobenius-normalised) diffusion of one graph, ``[N, D]``.

    ``projected`` is ``[N, 3 H D]`` (Q, K, V of every head side by side, as one linear layer
    makes them) or, with ``value`` ``[N, D]`` shared by all heads (``use_weight=False``),
    ``[N, 2 H D]``. ``graph`` adds the graph term (mixed by ``graph_weight`` when it is > 0).
    The global sums, their combination with the queries and the mix rule are those of
    :class:`~.attention.LinearAttentionStats` and :func:`~.graph.graph_term_weights`.
    """
    return _LinearDiffusion.apply(projected, value, num_heads, graph, graph_weight)


class _LinearDiffusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected: Tensor, value: Optional[Tensor], num_heads: int,
                graph: Optional[NormalizedGraph], graph_weight: float) -> Tensor:
        query, _, values = _split(projected, value, num_heads)
        num_nodes, width = projected.size(0), query[0].size(1)
        shape, heads_width = (1, num_nodes, num_heads, width), num_heads * width
        all_query, all_key = (projected[:, i * heads_width:(i + 1) * heads_width].view(shape) for i in range(2))
        all_value = (value.unsqueeze(1).expand(shape[1:]).unsqueeze(0) if value is not None
                     else projected[:, 2 * heads_width:].view(shape))
        stats = LinearAttentionStats.of(all_query, all_key, all_value, "frobenius")
        # [H, D, C] and [H, C], C padded to a multiple of 8 columns (a product with 129 columns runs
        # about 15% slower than with 136; benchmarks/step.py's ``mix_product_*``)
        mixes, biases = (t[0] for t in stats.operator("frobenius", columns=-(-(width + 1) // 8) * 8))
        norms = torch.stack([stats.query_square, stats.key_square]).sqrt().flatten()
        attention_weight, local_weight = _term_weights(graph_weight, num_heads, graph is not None)
        out, products = None, []
        for q, mix, bias in zip(query, mixes, biases):
            # [N, D + 1 (+ zero padding)]: numerators with sum V added, then denominators with N added
            product = torch.addmm(bias, q, mix)
            numerator, denominator = product[:, :width], product[:, width:width + 1]
            if out is None:
                out = torch.div(numerator, denominator)
                if attention_weight != 1.0:
                    out.mul_(attention_weight)
            else:
                out.addcdiv_(numerator, denominator, value=attention_weight)
            products.append(product)
        if graph is not None:
            mean_value = values[0] if num_heads == 1 or value is not None else torch.stack(values).mean(dim=0)
            graph.matmul(mean_value, out=out, alpha=local_weight)
        ctx.save_for_backward(projected, value, norms, *mixes, *products)
        ctx.num_heads, ctx.graph, ctx.graph_weight = num_heads, graph, graph_weight
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        projected, value, norms, *saved = ctx.saved_tensors
        heads, graph_weight = ctx.num_heads, ctx.graph_weight
        mixes, products = saved[:heads], saved[heads:]
        query, key, values = _split(projected, value, heads)
        width = query[0].size(1)
        scale = 1.0 / norms.clamp_min(NORM_EPS).prod()
        attention_weight, local_weight = _term_weights(graph_weight, heads, ctx.graph is not None)

        # Gradients of every head's product and mix (zero in the padding); the norms' scalar.
        grad_products, grad_mixes, norm_grad = [], [], grad.new_zeros(())
        for q, mix, product in zip(query, mixes, products):
            numerator, denominator = product[:, :width], product[:, width:width + 1]
            inverse = attention_weight / denominator  # [N, 1]
            grad_product = torch.empty_like(product)
            torch.mul(grad, inverse, out=grad_product[:, :width])
            # d attention / d denominator = -numerator / denominator^2
            torch.sum(grad * numerator, dim=1, keepdim=True, out=grad_product[:, width:width + 1])
            grad_product[:, width:width + 1].mul_(inverse).div_(denominator).neg_()
            grad_product[:, width + 1:] = 0.0
            grad_mix = q.t() @ grad_product
            norm_grad += (grad_mix * mix).sum()
            grad_products.append(grad_product)
            grad_mixes.append(grad_mix)

        grad_projected = torch.empty_like(projected)
        grad_query, grad_key, grad_values = _split(grad_projected, value, heads)
        # d||X|| / dX = X / ||X||; a clamped norm is a constant.
        norm_factor = torch.where(norms > NORM_EPS, -norm_grad / norms.clamp_min(NORM_EPS) ** 2, 0.0).tolist()
        # V's gradient: K dKV + 1 dSigma_V^T per head (summed when the heads share one value), then
        # the graph term's A^T G added in place (no temporary when one product serves every head).
        grad_value = torch.empty_like(value) if value is not None else None
        for h in range(heads):
            q, k, v = query[h], key[h], values[h]
            mix, grad_product, grad_mix = mixes[h], grad_products[h], grad_mixes[h]
            grad_rows = grad_mix[:, :width + 1] * scale  # gradient of [K^T V | K^T 1]
            torch.addmm(q, grad_product, mix.t(), beta=norm_factor[0], out=grad_query[h])
            torch.addmm(k, v, grad_rows[:, :width].t(), beta=norm_factor[1], out=grad_key[h])
            grad_key[h].add_(grad_rows[:, width])
            target = grad_values[h] if value is None else grad_value
            torch.addmm(target, k, grad_rows[:, :width], beta=0.0 if value is None or h == 0 else 1.0, out=target)
            target.add_(grad_product[:, :width].sum(dim=0))
        if ctx.graph is not None:
            if value is not None or heads == 1:
                ctx.graph.matmul(grad, transpose=True, out=grad_value if value is not None else grad_values[0],
                                 alpha=local_weight)
            else:
                local = ctx.graph.matmul(grad, transpose=True)
                for grad_head_value in grad_values:
                    grad_head_value.add_(local, alpha=local_weight / heads)
        return grad_projected, grad_value, None, None, None


def _term_weights(graph_weight: float, heads: int, with_graph: bool) -> Tuple[float, float]:
    """Weights of each head's attention (the mean over heads folded in) and of the graph term; without
    a graph the attention is the whole output, whatever ``graph_weight`` says."""
    attention_weight, local_weight = graph_term_weights(graph_weight) if with_graph else (1.0, 0.0)
    return attention_weight / heads, local_weight


def _split(projected: Tensor, value: Optional[Tensor], heads: int) -> Tuple[list, list, list]:
    """Per-head column blocks of Q, K and V (views, no copies)."""
    width = (projected.size(1) // (2 if value is not None else 3)) // heads
    blocks = projected.split(width, dim=1)
    query, key = list(blocks[:heads]), list(blocks[heads:2 * heads])
    values = [value] * heads if value is not None else list(blocks[2 * heads:3 * heads])
    return query, key, values
