"""A contextual stochastic block model generated in process: the default dataset, no download."""
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from .base import NodeDataModule
from .splits import class_balanced_split
from .csr import write_csr
from .store import StoreWriter, write_nodes


def contextual_sbm(num_nodes: int, num_classes: int, num_features: int, avg_degree: float, homophily: float,
                   feature_signal: float, seed: int, degree_exponent: Optional[float] = None,
                   chunk: int = 1 << 22) -> Data:
    """The contextual SBM of :class:`ContextualSBM` in memory: ``Data(x, y, edge_index)``, the same graph
    (features, labels, every edge in the same order) as :func:`write_synthetic_store` writes for the same
    arguments."""
    model = ContextualSBM(num_nodes, num_classes, num_features, avg_degree, homophily, feature_signal,
                          degree_exponent, seed, chunk)
    source, target = (torch.from_numpy(np.concatenate(part)) for part in zip(*model.edge_chunks()))
    return Data(x=torch.cat(list(model.feature_chunks())), y=model.y.long(), edge_index=torch.stack([source, target]))


class ContextualSBM:
    """A contextual stochastic block model, drawn in chunks: one definition for the in-memory graph
    (:func:`contextual_sbm`) and the graph store (:func:`write_synthetic_store`).

    Nodes get uniform random classes, features ``signal * mean[class] + N(0, I)`` with class means drawn
    from ``N(0, I)``, and ``num_nodes * avg_degree / 2`` undirected pairs whose second end is drawn from the
    first end's class with probability ``homophily`` and uniformly from all nodes otherwise (with
    ``degree_exponent``, e.g. 2.5, ends are drawn in proportion to Pareto propensities: a power-law degree
    tail). Every pair is kept in both directions; self loops are dropped and repeated pairs (about
    ``avg_degree / N`` per pair) kept as drawn. Deterministic in ``seed`` (and ``chunk``): edges come from
    one generator per chunk of pairs, so the store's two passes over them regenerate instead of holding
    them; labels, class means, a random order of the nodes (``permutation``, which the store cuts its random
    split from) and then the features (in chunks, in order) from one generator.
    """

    def __init__(self, num_nodes: int, num_classes: int, num_features: int, avg_degree: float, homophily: float,
                 feature_signal: float, degree_exponent: Optional[float] = None, seed: int = 0,
                 chunk: int = 1 << 22) -> None:
        self.num_nodes, self.num_classes, self.num_features = num_nodes, num_classes, num_features
        self.homophily, self.feature_signal, self.seed, self.chunk = homophily, feature_signal, seed, chunk
        self.generator = torch.Generator().manual_seed(seed)
        # Per-node arrays in the narrowest dtype that holds them (the same values as int64): at ogbn-papers100M's
        # 111M nodes each int64 array would take 0.9 GB.
        index = torch.int32 if num_nodes < 2**31 else torch.int64
        self.y = torch.randint(num_classes, (num_nodes,), generator=self.generator, dtype=torch.int32)
        self.means = torch.randn(num_classes, num_features, generator=self.generator)
        # the propensities are drawn inside the sampler, after its class order: at papers100M's 111M nodes their
        # 0.9 GB never meets argsort's 0.9 GB int64 order (the build's largest process: 4.1 GB before, 3.0 GB after)
        self.sampler = ClassSampler(self.y, num_classes,
                                    (lambda: pareto_weights(num_nodes, degree_exponent, self.generator))
                                    if degree_exponent is not None else None)
        self.num_pairs = int(num_nodes * avg_degree / 2)
        # a random order of the nodes, drawn before the features (the store cuts its split from it)
        self.permutation = torch.randperm(num_nodes, generator=self.generator, dtype=index)

    def edge_chunks(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """``(source, target)`` int64 chunks, every pair in both directions; the same on every call."""
        for index, start in enumerate(range(0, self.num_pairs, self.chunk)):
            chunk_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (index + 1))
            source, target = self.sampler.pairs(min(self.chunk, self.num_pairs - start), self.homophily,
                                                chunk_generator)
            keep = source != target
            source, target = source[keep].numpy().astype(np.int64), target[keep].numpy().astype(np.int64)
            yield np.concatenate([source, target]), np.concatenate([target, source])

    def feature_chunks(self) -> Iterator[Tensor]:
        """Feature rows in order, from the shared generator: call once, before drawing anything else."""
        rows = max(1, self.chunk // self.num_features)
        for start in range(0, self.num_nodes, rows):
            labels = self.y[start:start + rows]
            noise = torch.randn(labels.numel(), self.num_features, generator=self.generator)
            yield self.feature_signal * self.means[labels] + noise


class ClassSampler:
    """Draws node pairs whose second end shares the first end's class with probability ``homophily``.

    Nodes are drawn uniformly, or, given ``weight``, with probability proportional to it
    (a heavy-tailed weight gives a power-law degree distribution), by inverse CDF over the
    nodes sorted by class, so a draw restricted to one class is a search in its segment.
    """

    def __init__(self, y: Tensor, num_classes: int,
                 weight: Union[Tensor, Callable[[], Tensor], None] = None) -> None:
        """``weight``: ``(N,)`` propensities, or a function that draws them (called once the class order is
        built, so its array and argsort's int64 order are never held at once)."""
        self.y = y
        self.counts = torch.bincount(y, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.by_class = _class_order(y, self.offsets)
        self.cumulative = None
        if weight is not None:  # float64: a float32 running sum over 10^8 weights would lose the small ones
            if callable(weight):
                weight = weight()
            # the running sum is built in place in one (N + 1,) array: no sorted copy beside it
            self.cumulative = torch.empty(y.numel() + 1, dtype=torch.float64)
            self.cumulative[0] = 0.0
            torch.index_select(weight.double(), 0, self.by_class, out=self.cumulative[1:])
            del weight
            self.cumulative[1:].cumsum_(0)

    def _draw(self, start: Tensor, count: Tensor, generator: torch.Generator) -> Tensor:
        """One node from each segment ``by_class[start:start + count]``."""
        u = torch.rand(start.numel(), generator=generator, dtype=torch.float64)
        if self.cumulative is None:
            position = start + (u * count).long()
        else:
            low, high = self.cumulative[start], self.cumulative[start + count]
            # searched in sorted order: neighbouring searches share their path through the N + 1 sums, 4.8x
            # faster at papers100M's 111M nodes (benchmarks/degree_draws.py: 1,351 -> 279 ns a draw); the same
            # positions
            values, order = torch.sort(low + u * (high - low))
            position = torch.empty_like(order)
            position[order] = torch.searchsorted(self.cumulative, values, right=True) - 1
            position = torch.minimum(torch.maximum(position, start), start + count - 1)
        return self.by_class[position]

    def pairs(self, num_pairs: int, homophily: float, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        everywhere = (torch.zeros(num_pairs, dtype=torch.long), torch.full((num_pairs,), self.y.numel()))
        source = self._draw(*everywhere, generator)
        source_class = self.y[source]
        same_class = self._draw(self.offsets[source_class], self.counts[source_class], generator)
        anywhere = self._draw(*everywhere, generator)
        target = torch.where(torch.rand(num_pairs, generator=generator) < homophily, same_class, anywhere)
        return source, target


def _class_order(y: Tensor, offsets: Tensor, chunk: int = 1 << 22) -> Tensor:
    """``argsort(y, stable=True)`` in int32 (int64 from 2^31 nodes), by a counting sort over chunks of ``chunk``
    nodes: a whole-array stable argsort holds an int64 order and its sort buffers, about 2.7 GB at
    papers100M's 111M nodes; this holds the result and one chunk's temporaries. ``offsets``: where each class's
    nodes start in the order (the exclusive running sum of the class counts)."""
    num_nodes = y.numel()
    order = torch.empty(num_nodes, dtype=torch.int32 if num_nodes < 2**31 else torch.int64)
    cursor = offsets.clone()
    for start in range(0, num_nodes, chunk):
        part = y[start:start + chunk].long()
        local = torch.argsort(part, stable=True)
        classes = part[local]
        part_counts = torch.bincount(classes, minlength=offsets.numel())
        first = torch.cumsum(part_counts, 0) - part_counts  # where each class starts in the sorted chunk
        rank = torch.arange(classes.numel()) - first[classes]
        order[cursor[classes] + rank] = (local + start).to(order.dtype)
        cursor += part_counts
    return order


def pareto_weights(num_nodes: int, exponent: float, generator: torch.Generator) -> Tensor:
    """Node propensities with tail P(w > t) = t^-(exponent - 1): drawing edge ends in proportion
    to them gives degrees with a power-law tail of that exponent."""
    if exponent <= 2.0:
        raise ValueError(f"degree_exponent must be above 2 (finite mean degree), got {exponent}")
    u = torch.rand(num_nodes, generator=generator, dtype=torch.float64)
    # in place: (1 - u) ** (-1 / (exponent - 1)) with one (N,) float64 array, not three (2.7 GB at 111M nodes)
    return u.neg_().add_(1.0).pow_(-1.0 / (exponent - 1.0))


def write_synthetic_store(path: Union[str, Path], num_nodes: int, num_classes: int = 10, num_features: int = 64,
                          avg_degree: float = 10.0, homophily: float = 0.6, feature_signal: float = 0.2,
                          degree_exponent: Optional[float] = None, split: Tuple[float, float, float] = (0.5, 0.25, 0.25),
                          seed: int = 0,
                          feature_dtype=np.float16, chunk: int = 1 << 22, overwrite: bool = False) -> Path:
    """The contextual SBM of :class:`ContextualSBM`, written straight into a graph store, with a random
    ``split`` of the nodes (train, val, test fractions).

    Nothing of size E is ever in memory: the CSR writer's two passes regenerate the same edge chunks
    instead of holding them. Peak memory is O(N) (labels, write cursors) plus one chunk.
    """
    model = ContextualSBM(num_nodes, num_classes, num_features, avg_degree, homophily, feature_signal,
                          degree_exponent, seed, chunk)
    features = (chunk.numpy() for chunk in model.feature_chunks())
    with StoreWriter(path, overwrite=overwrite) as writer:
        write_csr(writer, num_nodes, model.edge_chunks, 2 * model.num_pairs)  # about: self loops are dropped
        write_nodes(writer, features, num_nodes, num_features, feature_dtype, model.y.numpy().astype(np.int32),
                    _random_split(model.permutation, split))
        return writer.commit(num_classes, generator="contextual_sbm", avg_degree=avg_degree, homophily=homophily,
                             feature_signal=feature_signal, degree_exponent=degree_exponent, seed=seed)


def _random_split(order: Tensor, split: Tuple[float, float, float]) -> dict:
    """Node ids of a train / val / test split with the given fractions, cut from the random ``order``."""
    num_nodes, order = order.numel(), order.numpy()
    bounds = np.cumsum([int(round(f * num_nodes)) for f in split])
    return {"train": np.sort(order[:bounds[0]]), "val": np.sort(order[bounds[0]:bounds[1]]),
            "test": np.sort(order[bounds[1]:bounds[2]])}


class SyntheticCSBMDataModule(NodeDataModule):
    """The default dataset: a contextual SBM (see :func:`contextual_sbm`), full batch, with
    the reference's label-rate split (``train_per_class`` per class, ``num_val``, ``num_test``).
    """

    def __init__(self, num_nodes: int = 3000, num_classes: int = 5, num_features: int = 64, avg_degree: float = 8.0,
                 homophily: float = 0.6, feature_signal: float = 0.2, train_per_class: int = 20, num_val: int = 500,
                 num_test: int = 1000, seed: int = 0, root: Optional[str] = None) -> None:
        if num_classes < 2 or num_nodes < num_classes * train_per_class + num_val + num_test:
            raise ValueError(f"num_nodes={num_nodes} is too small for {num_classes} classes x {train_per_class} "
                             f"training nodes + {num_val} validation + {num_test} test")
        if not 0.0 <= homophily <= 1.0:
            raise ValueError(f"homophily must be in [0, 1], got {homophily}")
        super().__init__(num_classes=num_classes, root=root)
        self.generator_args = dict(num_nodes=num_nodes, num_classes=num_classes, num_features=num_features,
                                   avg_degree=avg_degree, homophily=homophily, feature_signal=feature_signal,
                                   seed=seed)
        self.split_args = dict(per_class=train_per_class, num_val=num_val, num_test=num_test, seed=seed)

    @property
    def num_features(self) -> int:
        return self.generator_args["num_features"]

    def load(self) -> Data:
        data = contextual_sbm(**self.generator_args)
        data.update(class_balanced_split(data.y, **self.split_args))
        return data
