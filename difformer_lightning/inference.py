"""Exact full-graph inference for graphs that do not fit in memory, one layer at a time.

DIFFormer-s attends over all nodes through a handful of global sums, so an exact forward pass
over every node of a graph store needs, per layer, one streaming pass to accumulate
``sum K V^T``, ``sum K``, ``sum V`` and the Frobenius norms, and a second pass that combines them
with each chunk of queries and adds the graph term gathered from the store's CSR. Layer
outputs live in two memory-mapped scratch arrays that are reused by every layer, so memory
and disk stay the same whatever the depth: O(N) for the degrees plus one chunk.
"""
import tempfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import DIFFormer

_LAYERWISE_KERNELS = ("simple", "gcn", "none")


@torch.no_grad()
def layerwise_inference(model: DIFFormer, store, chunk_nodes: int = 65_536,
                        workdir: Optional[Union[str, Path]] = None, out: Optional[Union[str, Path]] = None) -> Tensor:
    """Logits ``[N, out_channels]`` of ``model`` (in eval mode) over every node of ``store``.

    Equal to ``model(x, edge_index)`` on the whole graph (the graph term uses the store's
    edges, a self loop added where missing, as :class:`NormalizedGraph`). Supported kernels:
    ``'simple'`` (either ``qk_norm``), ``'gcn'`` and ``'none'``; DIFFormer-a's attention is
    quadratic and GAT needs per-edge softmax, so those raise. Scratch arrays go to
    ``workdir`` (a temporary folder by default). The logits are returned in memory, or, with
    ``out``, written to that ``.npy`` file and returned memory-mapped (for 111M nodes x 172
    classes they take 76 GB).
    """
    kernel = model.convs[0].kernel
    if kernel not in _LAYERWISE_KERNELS:
        raise ValueError(f"layerwise inference supports kernels {_LAYERWISE_KERNELS}, not {kernel!r}; use "
                         f"partitioned inference (the data module's eval batches) instead")
    model.eval()
    num_nodes, hidden = store.num_nodes, model.lin_in.out_features
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        buffers = [np.lib.format.open_memmap(Path(scratch) / f"h{i}.npy", "w+", np.float32, (num_nodes, hidden))
                   for i in range(2)]
        heads, width = model.convs[0].num_heads, model.convs[0].out_channels
        values = np.lib.format.open_memmap(Path(scratch) / "v.npy", "w+", np.float32, (num_nodes, heads, width))
        inv_sqrt_degree = _inverse_sqrt_degree(store, chunk_nodes) if model.needs_graph else None
        for start, stop in _chunks(num_nodes, chunk_nodes):
            x = store.x[start:stop].float()
            buffers[0][start:stop] = F.relu(model.norm_in(model.lin_in(x))).numpy()
        for layer, (conv, norm) in enumerate(zip(model.convs, model.norms)):
            source, target = buffers[layer % 2], buffers[(layer + 1) % 2]
            sums = _global_sums(conv, source, values, chunk_nodes)
            for start, stop in _chunks(num_nodes, chunk_nodes):
                h = torch.from_numpy(source[start:stop])
                value = torch.from_numpy(values[start:stop]).double()
                diffused = _combine(conv, h, value, sums, num_nodes)
                if conv.needs_graph:
                    local = _graph_rows(store, values, inv_sqrt_degree, start, stop)
                    diffused = local if conv.kernel == "gcn" else _mix(conv, diffused, local)
                update = diffused.mean(dim=1).float()
                h = model.alpha * update + (1.0 - model.alpha) * h if model.use_residual else update
                target[start:stop] = norm(h).numpy()
        final = buffers[len(model.convs) % 2]
        classes = model.lin_out.out_features
        logits = (np.lib.format.open_memmap(out, "w+", np.float32, (num_nodes, classes)) if out is not None
                  else np.empty((num_nodes, classes), np.float32))
        for start, stop in _chunks(num_nodes, chunk_nodes):
            logits[start:stop] = model.lin_out(torch.from_numpy(final[start:stop])).numpy()
        return torch.from_numpy(logits)


def _chunks(num_nodes: int, size: int):
    for start in range(0, num_nodes, size):
        yield start, min(start + size, num_nodes)


def _projections(conv, h: Tensor):
    shape = (h.size(0), conv.num_heads, conv.out_channels)
    value = conv.value(h).view(shape) if conv.use_weight else h.unsqueeze(1).expand(shape)
    if conv.kernel != "simple":
        return None, None, value
    query, key = conv.query(h).view(shape).double(), conv.key(h).view(shape).double()
    if conv.qk_norm == "row":
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    return query, key, value


def _global_sums(conv, source: np.ndarray, values: np.ndarray, chunk_nodes: int) -> dict:
    """First pass: writes V for every node and accumulates the attention's global sums (float64)."""
    heads, width = conv.num_heads, conv.out_channels
    sums = {"kv": torch.zeros(heads, width, width, dtype=torch.float64),
            "k": torch.zeros(heads, width, dtype=torch.float64), "v": torch.zeros(heads, width, dtype=torch.float64),
            "q_sq": 0.0, "k_sq": 0.0}
    for start, stop in _chunks(source.shape[0], chunk_nodes):
        query, key, value = _projections(conv, torch.from_numpy(source[start:stop]))
        values[start:stop] = value.numpy()
        if key is not None:
            sums["kv"] += torch.einsum("nhm,nhd->hmd", key, value.double())
            sums["k"] += key.sum(dim=0)
            sums["v"] += value.double().sum(dim=0)
            sums["q_sq"] += float(query.square().sum())
            sums["k_sq"] += float(key.square().sum())
    return sums


def _combine(conv, h: Tensor, value: Tensor, sums: dict, num_nodes: int) -> Tensor:
    """Second pass, one chunk: the all-pairs term from the global sums (or V itself for 'none')."""
    if conv.kernel != "simple":
        return value
    query, _, _ = _projections(conv, h)
    key_scale = 1.0
    if conv.qk_norm == "frobenius":
        query = query / max(sums["q_sq"] ** 0.5, 1e-12)
        key_scale = 1.0 / max(sums["k_sq"] ** 0.5, 1e-12)
    numerator = torch.einsum("nhm,hmd->nhd", query, sums["kv"] * key_scale) + sums["v"]
    denominator = torch.einsum("nhm,hm->nh", query, sums["k"] * key_scale).unsqueeze(-1) + num_nodes
    return numerator / denominator


def _mix(conv, attention: Tensor, local: Tensor) -> Tensor:
    if conv.graph_weight > 0:
        return (1.0 - conv.graph_weight) * attention + conv.graph_weight * local
    return attention + local


def _self_loop_rows(store, start: int, stop: int):
    """For rows start..stop: their sources, targets, and which rows already have a self loop."""
    begin, end = int(store.rowptr[start]), int(store.rowptr[stop])
    counts = store.rowptr[start + 1:stop + 1] - store.rowptr[start:stop]
    source = store.col[begin:end].long()
    target = torch.repeat_interleave(torch.arange(start, stop), counts)
    has_loop = torch.zeros(stop - start, dtype=torch.bool)
    has_loop[target[source == target] - start] = True
    return source, target, has_loop


def _inverse_sqrt_degree(store, chunk_nodes: int) -> Tensor:
    """deg^-1/2 with one self loop per node, counted at the target (as NormalizedGraph)."""
    degree = (store.rowptr[1:] - store.rowptr[:-1]).double()
    for start, stop in _chunks(store.num_nodes, chunk_nodes):
        _, _, has_loop = _self_loop_rows(store, start, stop)
        degree[start:stop] += (~has_loop).double()
    return degree.pow(-0.5)


def _graph_rows(store, values: np.ndarray, inv_sqrt_degree: Tensor, start: int, stop: int) -> Tensor:
    """Rows start..stop of D^-1/2 (A + I) D^-1/2 V, with V gathered from the scratch array."""
    source, target, has_loop = _self_loop_rows(store, start, stop)
    missing = torch.arange(start, stop)[~has_loop]
    source, target = torch.cat([source, missing]), torch.cat([target, missing])
    weight = inv_sqrt_degree[source] * inv_sqrt_degree[target]
    gathered = torch.from_numpy(values[source.numpy()]).double()
    out = torch.zeros(stop - start, *values.shape[1:], dtype=torch.float64)
    return out.index_add_(0, target - start, gathered * weight[:, None, None])
