"""The checks every dataset passes before training, one definition for in-memory graphs
(``NodeDataModule``) and graph stores: finite features, non-empty splits, labels of split nodes in range.
Each error names the place (``where``: ``data.x``, a store file), the node, the split and the fix.
"""
from typing import Dict, Optional, Type

import torch
from torch import Tensor


# The largest feature magnitude a float32 (or bfloat16) run takes: the input LayerNorm squares its
# inputs in float32 (max 3.4e38), so values above about 1e19 make it NaN before any update; 1e15 leaves
# room for the input layer's sums. float16 (16-mixed) runs overflow at 65,504.
FEATURE_LIMIT = 1e15
FLOAT16_FEATURE_LIMIT = 6.0e4


def feature_limit(precision) -> float:
    """The feature magnitude limit of a Trainer ``precision`` (``'16-mixed'``, ``'bf16-mixed'``, ``'32'``...)."""
    text = str(precision)
    return FLOAT16_FEATURE_LIMIT if text.startswith("16") and not text.startswith("bf16") else FEATURE_LIMIT


def check_finite_features(x: Tensor, first_node: int, where: str, error: Type[Exception] = ValueError,
                          limit: float = FEATURE_LIMIT) -> None:
    """Raises ``error`` when a feature of the rows ``x`` (nodes ``first_node ..``) is NaN, infinite, or larger
    in magnitude than ``limit`` (:func:`feature_limit` of the run's precision), naming the first such node
    and feature: every node enters DIFFormer's global sums, so one bad value anywhere makes every output NaN,
    and the input's fault is said before training rather than blamed on the optimiser."""
    bad = (~torch.isfinite(x)).nonzero()
    if bad.numel():
        node, feature = int(bad[0, 0]), int(bad[0, 1])
        rows = int(torch.unique(bad[:, 0]).numel())
        raise error(f"{where}: feature {feature} of node {first_node + node} is {float(x[node, feature])} (NaN or "
                    f"infinite; {rows} such rows among nodes {first_node}..{first_node + x.size(0) - 1}); every node "
                    f"enters the global attention, so impute or drop those features before training")
    large = (x.abs() > limit).nonzero()
    if large.numel():
        node, feature = int(large[0, 0]), int(large[0, 1])
        raise error(f"{where}: feature {feature} of node {first_node + node} is {float(x[node, feature]):.4g}, beyond "
                    f"{limit:.4g}, the largest this run's precision carries through the model (LayerNorm and the "
                    f"global sums); standardise the features (e.g. z-scores or a log) before training")


def check_split_sizes(sizes: Dict[str, int], where: str, error: Type[Exception] = ValueError) -> None:
    """Raises ``error`` when a split selects no node (training, model selection and the reported test need
    at least one each)."""
    empty = [split for split, size in sizes.items() if size == 0]
    if empty:
        plural = len(empty) > 1
        raise error(f"{where}: the {' and '.join(empty)} split{'s' if plural else ''} select{'' if plural else 's'} no "
                    f"node; every split needs at least one")


def check_labels(y: Tensor, nodes: Tensor, split: str, num_classes: Optional[int], multilabel: bool, where: str,
                 error: Type[Exception] = ValueError) -> None:
    """Raises ``error`` when a label of the ``split`` nodes ``nodes`` (their labels ``y``) is not a class id in
    ``[0, num_classes)`` (or not 0/1 for multi-label data), naming the first such node and its label.
    Unlabelled nodes (``-1``, a NaN in an OGB label file) belong in no split."""
    if multilabel:
        bad = ~((y == 0) | (y == 1)).all(dim=1) if y.dim() == 2 else torch.ones(y.size(0), dtype=torch.bool)
        expected = "only 0 and 1 per task"
    else:
        bad = y < 0
        if num_classes is not None:
            bad |= y >= num_classes
        expected = f"a class id in [0, {num_classes if num_classes is not None else 'num_classes'})"
    if bad.any():
        first = int(bad.nonzero()[0])
        label = y[first].tolist()
        raise error(f"{where}: {int(bad.sum())} {split} nodes have a label that is not {expected} (first: node "
                    f"{int(nodes[first])} has label {label}); give unlabelled nodes no split")
