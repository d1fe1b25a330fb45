"""The diffusivity kernels of DIFFormer, as functions of per-head queries, keys and values.

Every function takes tensors of shape ``[N, H, D]`` and returns ``[N, H, D]``. They
run with autocast disabled in float32 (float64 inputs stay float64): the global sums
over all N nodes lose the data-dependent part of the denominator in bfloat16 and
overflow in float16 above 65,504 nodes.
"""
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch_geometric.utils import scatter, softmax, to_dense_batch

QKNorm = Literal["frobenius", "row"]

# Bytes a row block of the sigmoid kernel may hold per (row, node, head) entry: the
# scores, their sigmoid, and in backward the recomputed pair plus their gradient, in
# float32.
_SIGMOID_BYTES_PER_ENTRY = 16


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
    what it would get alone. The graphs are padded to the largest one for the products.
    """
    mask = None
    if batch is None:
        query, key, value = (t.unsqueeze(0) for t in (query, key, value))  # one graph: [1, N, H, D]
        sizes = query.new_full((1,), query.size(1))
    else:
        check_sorted(batch)
        (query, mask), (key, _), (value, _) = (to_dense_batch(t, batch) for t in (query, key, value))
        sizes = mask.sum(dim=1).to(query.dtype)
    if qk_norm == "frobenius":
        query = query / torch.linalg.vector_norm(query, dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        key = key / torch.linalg.vector_norm(key, dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    else:
        query = F.normalize(query, dim=-1)  # padding rows stay zero
        key = F.normalize(key, dim=-1)
    key_value = torch.einsum("gnhm,gnhd->ghmd", key, value)
    numerator = torch.einsum("gnhm,ghmd->gnhd", query, key_value) + value.sum(dim=1, keepdim=True)
    denominator = torch.einsum("gnhm,ghm->gnh", query, key.sum(dim=1)).unsqueeze(-1) + sizes.view(-1, 1, 1, 1)
    out = numerator / denominator
    return out[0] if mask is None else out[mask]


def check_sorted(batch: Tensor) -> None:
    """Graph ids must be sorted (each graph's nodes contiguous), as PyG's ``Batch`` makes them."""
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted (the nodes of each graph contiguous, as torch_geometric's Batch "
                         "builds it); sort the nodes by graph id first")


def sigmoid_rows_per_block(num_nodes: int, num_heads: int, block_bytes: int) -> int:
    """How many query rows one block of DIFFormer-a may hold within ``block_bytes``.

    Raises a ``ValueError`` when not even one row fits, before any work is done.
    """
    bytes_per_row = _SIGMOID_BYTES_PER_ENTRY * num_nodes * num_heads
    rows = block_bytes // bytes_per_row
    if rows < 1:
        raise ValueError(
            f"DIFFormer-a (kernel='sigmoid') needs {bytes_per_row / 2**20:.1f} MiB for a single row of its "
            f"{num_nodes} x {num_nodes} x {num_heads} attention, more than its block budget of "
            f"{block_bytes / 2**20:.1f} MiB (sigmoid_block_bytes). Use kernel='simple' (linear cost), train on "
            f"smaller batches (random node partition), or raise sigmoid_block_bytes if memory allows.")
    return min(rows, num_nodes)


def sigmoid_attention(query: Tensor, key: Tensor, value: Tensor, block_bytes: int = 2**30,
                      batch: Optional[Tensor] = None) -> Tensor:
    r"""DIFFormer-a: :math:`A_{nl} = \sigma(q_n^\top k_l)`, row-normalised, times V.

    The ``[N, N, H]`` attention is never materialised: query rows are processed in
    blocks whose attention fits in ``block_bytes``. With gradients enabled and more
    than one block, each block is recomputed in backward (activation checkpointing),
    so extra memory stays O(block x N) in training too. With ``batch`` (sorted graph ids)
    each graph attends only to itself, one graph after another.
    """
    if batch is not None:
        check_sorted(batch)
        sizes = torch.bincount(batch).tolist()
        parts = zip(*(t.split(sizes) for t in (query, key, value)))
        return torch.cat([sigmoid_attention(q, k, v, block_bytes) for q, k, v in parts if q.size(0)])
    num_nodes, num_heads, _ = query.shape
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


def _sigmoid_block(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Rows of DIFFormer-a for ``query`` [H, B, D] against all keys/values [H, N, D]."""
    scores = torch.sigmoid(query @ key.transpose(-1, -2))  # [H, B, N]
    # Normalising after the product divides B x D entries instead of B x N.
    return (scores @ value) / scores.sum(dim=-1, keepdim=True)


def edge_attention(value: Tensor, att_source: Tensor, att_target: Tensor, edge_index: Tensor,
                   negative_slope: float = 0.2) -> Tensor:
    r"""GAT as a special case: attention restricted to the observed edges.

    .. math::
        \alpha_{nl} = \mathrm{softmax}_{l \in \mathcal{N}(n)}
            \mathrm{LeakyReLU}(a_t^\top v_n + a_s^\top v_l)

    ``edge_index`` must contain the self loops; ``att_source``/``att_target`` are ``[H, D]``.
    """
    source, target = edge_index
    score_source = (value * att_source).sum(dim=-1)  # [N, H]
    score_target = (value * att_target).sum(dim=-1)
    scores = F.leaky_relu(score_source[source] + score_target[target], negative_slope)
    alpha = softmax(scores, target, num_nodes=value.size(0))  # [E, H]
    return scatter(value[source] * alpha.unsqueeze(-1), target, dim=0, dim_size=value.size(0), reduce="sum")
