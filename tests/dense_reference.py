"""An independent dense float64 DIFFormer, written from DIFFORMER.md sections 1 and 2.

It builds every N x N matrix explicitly (no linear-attention trick, no sparse ops, no row
blocks), so agreement with the library checks the algebra, the normalisations and the
graph handling. It reads the weights of a library model but none of its code.
"""
import torch
import torch.nn.functional as F


def dense_propagation(edge_index, edge_weight, num_nodes):
    """D^-1/2 (A + I) D^-1/2 with A[target, source] = weight, a self loop added where missing,
    the degree counting edges (not weights) at their target."""
    present = torch.zeros(num_nodes, num_nodes, dtype=torch.float64)
    weights = torch.zeros(num_nodes, num_nodes, dtype=torch.float64)
    source, target = edge_index
    values = torch.ones(source.numel(), dtype=torch.float64) if edge_weight is None else edge_weight.double()
    for s, t, w in zip(source.tolist(), target.tolist(), values.tolist()):
        present[t, s] = 1.0
        weights[t, s] = w
    for i in range(num_nodes):
        if present[i, i] == 0:
            present[i, i] = 1.0
            weights[i, i] = 1.0
    inv_sqrt = present.sum(dim=1).pow(-0.5)
    return inv_sqrt[:, None] * weights * inv_sqrt[None, :], present


def _heads(linear, h, num_heads):
    out = h @ linear.weight.double().T + linear.bias.double()
    return out.view(h.size(0), num_heads, -1)


def dense_layer(conv, h, propagation, present):
    num_nodes, heads = h.size(0), conv.num_heads
    value = _heads(conv.value, h, heads) if conv.use_weight else h.unsqueeze(1).repeat(1, heads, 1)
    outputs, kernel = [], conv.kernel.qualified_name()
    for head in range(heads):
        v = value[:, head]
        if kernel == "none":
            diffusivity = torch.eye(num_nodes, dtype=torch.float64)
        elif kernel == "gcn":
            diffusivity = propagation
        elif kernel == "gat":
            a_s = conv.kernel.att_source.double()[head]
            a_t = conv.kernel.att_target.double()[head]
            scores = F.leaky_relu((v @ a_t)[:, None] + (v @ a_s)[None, :], 0.2)
            diffusivity = torch.softmax(scores.masked_fill(present == 0, float("-inf")), dim=1)
        else:
            q = _heads(conv.query, h, heads)
            k = _heads(conv.key, h, heads)
            if kernel == "simple":
                if conv.kernel.qk_norm == "frobenius":
                    q, k = q / q.norm(), k / k.norm()
                else:
                    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
                similarity = 1.0 + q[:, head] @ k[:, head].T
            else:
                similarity = torch.sigmoid(q[:, head] @ k[:, head].T)
            diffusivity = similarity / similarity.sum(dim=1, keepdim=True)
        out = diffusivity @ v
        if conv.use_graph:
            local = propagation @ v
            w = conv.graph_weight
            out = (1 - w) * out + w * local if w > 0 else out + local
        outputs.append(out)
    return torch.stack(outputs).mean(dim=0)


def _layer_norm(norm, h):
    if isinstance(norm, torch.nn.LayerNorm):
        return F.layer_norm(h, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
    return h


def dense_difformer(model, x, edge_index=None, edge_weight=None):
    """Eval-mode forward of a library ``DIFFormer`` recomputed densely in float64."""
    x = x.double()
    num_nodes = x.size(0)
    propagation = present = None
    if edge_index is not None:
        propagation, present = dense_propagation(edge_index, edge_weight, num_nodes)
    h = torch.relu(_layer_norm(model.norm_in, x @ model.lin_in.weight.double().T + model.lin_in.bias.double()))
    for conv, norm in zip(model.convs, model.norms):
        update = dense_layer(conv, h, propagation, present)
        h = model.alpha * update + (1 - model.alpha) * h if model.use_residual else update
        h = _layer_norm(norm, h)
    return h @ model.lin_out.weight.double().T + model.lin_out.bias.double()
