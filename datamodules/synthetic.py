"""A contextual stochastic block model generated in process: the default dataset, no download."""
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import remove_self_loops, to_undirected

from .base import NodeDataModule
from .splits import class_balanced_split
from .store import StoreWriter, write_csr, write_nodes


def contextual_sbm(num_nodes: int, num_classes: int, num_features: int, avg_degree: float, homophily: float,
                   feature_signal: float, seed: int) -> Data:
    """Nodes with uniform random classes, features ``signal * mean[class] + N(0, I)`` with
    class means drawn from ``N(0, I)``, and ``num_nodes * avg_degree / 2`` undirected edges
    whose second end is drawn from the first end's class with probability ``homophily``
    and uniformly from all nodes otherwise. Deterministic in ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_nodes,), generator=generator)
    means = torch.randn(num_classes, num_features, generator=generator)
    x = feature_signal * means[y] + torch.randn(num_nodes, num_features, generator=generator)
    pairs = ClassSampler(y, num_classes).pairs(int(num_nodes * avg_degree / 2), homophily, generator)
    edge_index, _ = remove_self_loops(torch.stack(pairs))
    return Data(x=x, y=y, edge_index=to_undirected(edge_index, num_nodes=num_nodes))


class ClassSampler:
    """Draws node pairs whose second end shares the first end's class with probability ``homophily``.

    Nodes are drawn uniformly, or, given ``weight``, with probability proportional to it
    (a heavy-tailed weight gives a power-law degree distribution), by inverse CDF over the
    nodes sorted by class, so a draw restricted to one class is a search in its segment.
    """

    def __init__(self, y: Tensor, num_classes: int, weight: Optional[Tensor] = None) -> None:
        self.y = y
        self.by_class = torch.argsort(y, stable=True)
        self.counts = torch.bincount(y, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.cumulative = None
        if weight is not None:
            self.cumulative = torch.cat([torch.zeros(1, dtype=torch.float64),
                                         torch.cumsum(weight[self.by_class].double(), 0)])

    def _draw(self, start: Tensor, count: Tensor, generator: torch.Generator) -> Tensor:
        """One node from each segment ``by_class[start:start + count]``."""
        u = torch.rand(start.numel(), generator=generator, dtype=torch.float64)
        if self.cumulative is None:
            position = start + (u * count).long()
        else:
            low, high = self.cumulative[start], self.cumulative[start + count]
            position = torch.searchsorted(self.cumulative, low + u * (high - low), right=True) - 1
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


def pareto_weights(num_nodes: int, exponent: float, generator: torch.Generator) -> Tensor:
    """Node propensities with tail P(w > t) = t^-(exponent - 1): drawing edge ends in proportion
    to them gives degrees with a power-law tail of that exponent."""
    if exponent <= 2.0:
        raise ValueError(f"degree_exponent must be above 2 (finite mean degree), got {exponent}")
    u = torch.rand(num_nodes, generator=generator, dtype=torch.float64)
    return (1.0 - u).pow(-1.0 / (exponent - 1.0))


def write_synthetic_store(path: Union[str, Path], num_nodes: int, num_classes: int = 10, num_features: int = 64,
                          avg_degree: float = 10.0, homophily: float = 0.6, feature_signal: float = 0.2,
                          degree_exponent: Optional[float] = None, split: Tuple[float, float, float] = (0.5, 0.25, 0.25),
                          seed: int = 0,
                          feature_dtype=np.float16, chunk: int = 1 << 22, overwrite: bool = False) -> Path:
    """The contextual SBM of :func:`contextual_sbm`, written straight into a graph store.

    Nothing of size E is ever in memory: edges are drawn in chunks from generators seeded
    per chunk, so the CSR writer's two passes regenerate the same chunks instead of holding
    them. Peak memory is O(N) (labels, write cursors) plus one chunk. Every undirected pair
    is stored in both directions; self loops are dropped, and repeated pairs (rare: about
    avg_degree / N per pair) are kept as they are drawn. ``degree_exponent`` (e.g. 2.5) draws
    edge ends in proportion to Pareto propensities for a power-law degree tail; ``None`` keeps
    degrees Poisson-like. A random ``split`` of the nodes (train, val, test fractions) is stored.
    """
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_nodes,), generator=generator)
    means = torch.randn(num_classes, num_features, generator=generator)
    weight = pareto_weights(num_nodes, degree_exponent, generator) if degree_exponent is not None else None
    sampler = ClassSampler(y, num_classes, weight)
    num_pairs = int(num_nodes * avg_degree / 2)

    def edge_chunks():
        for index, start in enumerate(range(0, num_pairs, chunk)):
            chunk_generator = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (index + 1))
            source, target = sampler.pairs(min(chunk, num_pairs - start), homophily, chunk_generator)
            keep = source != target
            source, target = source[keep].numpy(), target[keep].numpy()
            yield np.concatenate([source, target]), np.concatenate([target, source])

    def feature_chunks():
        rows = max(1, chunk // num_features)
        for start in range(0, num_nodes, rows):
            labels = y[start:start + rows]
            noise = torch.randn(labels.numel(), num_features, generator=generator)
            yield (feature_signal * means[labels] + noise).numpy()

    order = torch.randperm(num_nodes, generator=generator).numpy()
    bounds = np.cumsum([int(round(f * num_nodes)) for f in split])
    splits = {"train": np.sort(order[:bounds[0]]), "val": np.sort(order[bounds[0]:bounds[1]]),
              "test": np.sort(order[bounds[1]:bounds[2]])}
    with StoreWriter(path, overwrite=overwrite) as writer:
        write_csr(writer, num_nodes, edge_chunks)
        write_nodes(writer, feature_chunks(), num_nodes, num_features, feature_dtype, y.numpy().astype(np.int32),
                    splits)
        return writer.commit(num_classes, generator="contextual_sbm", avg_degree=avg_degree, homophily=homophily,
                             feature_signal=feature_signal, degree_exponent=degree_exponent, seed=seed)


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
