"""A contextual stochastic block model generated in process: the default dataset, no download."""
from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import remove_self_loops, to_undirected

from .base import NodeDataModule
from .splits import class_balanced_split


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
    return Data(x=x, y=y, edge_index=_homophilous_edges(y, num_classes, avg_degree, homophily, generator))


def _homophilous_edges(y: Tensor, num_classes: int, avg_degree: float, homophily: float,
                       generator: torch.Generator) -> Tensor:
    num_nodes = y.size(0)
    num_pairs = int(num_nodes * avg_degree / 2)
    source = torch.randint(num_nodes, (num_pairs,), generator=generator)
    # A random member of the source's class: index into the nodes sorted by class.
    by_class = torch.argsort(y)
    counts = torch.bincount(y, minlength=num_classes)
    offsets = torch.cumsum(counts, 0) - counts
    source_class = y[source]
    within = (torch.rand(num_pairs, generator=generator) * counts[source_class]).long()
    same_class = by_class[offsets[source_class] + within]
    anywhere = torch.randint(num_nodes, (num_pairs,), generator=generator)
    target = torch.where(torch.rand(num_pairs, generator=generator) < homophily, same_class, anywhere)
    edge_index, _ = remove_self_loops(torch.stack([source, target]))
    return to_undirected(edge_index, num_nodes=num_nodes)


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
