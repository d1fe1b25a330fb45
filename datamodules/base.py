"""Full-batch node-level data, and the contract for plugging in a new dataset."""
import os
from pathlib import Path
from typing import Dict, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torch_geometric.data import Data

DATA_ENV = "DIFFORMER_DATA"


def data_root(root: Optional[str]) -> Path:
    """The folder datasets live in: ``root`` if given, else ``$DIFFORMER_DATA``, else ``./data``."""
    return Path(root or os.environ.get(DATA_ENV) or "data").expanduser()


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable."""


class ClassificationTargets:
    """What ``train.py`` links from a classification data module into the model: the encoder's
    output size (``num_outputs``) and the ``task``. Needs ``num_classes`` and ``multilabel``."""

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"


class NodeDataModule(ClassificationTargets, pl.LightningDataModule):
    """One graph, trained full-batch: every step sees all nodes, the loss uses ``train_mask``.

    Plugging a dataset: pass a PyG :class:`~torch_geometric.data.Data` as ``data``, or
    subclass and override :meth:`load` (and :meth:`prepare_data` to download). The
    ``Data`` must hold

    * ``x``: float features ``[N, F]``;
    * ``y``: class ids ``[N]`` (``-1`` or any value for nodes in no split), or
      ``{0, 1}`` targets ``[N, T]`` when ``multilabel``;
    * ``train_mask``, ``val_mask``, ``test_mask``: boolean ``[N]``;
    * optionally ``edge_index`` ``[2, E]`` (messages ``edge_index[0] -> edge_index[1]``)
      and ``edge_weight`` ``[E]``.

    Everything is checked (:func:`validate_node_data`) in :meth:`setup`, before training,
    and a problem raises a ``ValueError`` that names it.
    """

    def __init__(self, data: Optional[Data] = None, num_classes: Optional[int] = None, multilabel: bool = False,
                 root: Optional[str] = None) -> None:
        super().__init__()
        self._data = data
        self._num_classes = num_classes
        self.multilabel = multilabel
        self.root = data_root(root)
        self._validated: Optional[Data] = None

    def load(self) -> Data:
        """Returns the dataset as a ``Data``; subclasses override this."""
        if self._data is None:
            raise ValueError(f"{type(self).__name__} was given no data: pass data=Data(...) or override load()")
        return self._data

    @property
    def data(self) -> Data:
        """The validated dataset, loaded on first use."""
        if self._validated is None:
            data = self.load()
            validate_node_data(data, self._num_classes, self.multilabel)
            self._validated = data
        return self._validated

    @property
    def num_features(self) -> int:
        return self.data.num_features

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            self._num_classes = infer_num_classes(self.data, self.multilabel)
        return self._num_classes

    @property
    def num_nodes(self) -> int:
        return self.data.num_nodes

    @property
    def max_batch_nodes(self) -> int:
        """The most nodes one forward pass sees (here: the whole graph)."""
        return self.data.num_nodes

    def setup(self, stage: str) -> None:
        self.data  # noqa: B018  loads and validates before any training work

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records about this data, to refuse resuming on other data."""
        data = self.data
        return {"dataset": type(self).__name__, "num_nodes": data.num_nodes, "num_edges": data.num_edges,
                "num_features": data.num_features, "num_classes": self.num_classes}

    def state_dict(self) -> Dict[str, object]:
        # "data" is what NodeClassifier compares when it loads a checkpoint (checkpoint.check_compatible)
        return {"data": self.describe()}

    def probe_batch(self, num_nodes: int, seed: int = 0) -> Data:
        """The whole graph, or the subgraph induced by ``num_nodes`` fixed random nodes if smaller."""
        data = self.data
        if num_nodes >= data.num_nodes:
            return data
        nodes = torch.randperm(data.num_nodes, generator=torch.Generator().manual_seed(seed))[:num_nodes]
        return data.subgraph(torch.sort(nodes).values)

    def _loader(self) -> DataLoader:
        # One batch per epoch: the whole graph. batch_size=None hands the Data through as is.
        return DataLoader([self.data], batch_size=None, collate_fn=_as_is)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


def _as_is(item):
    return item


def infer_num_classes(data: Data, multilabel: bool) -> int:
    if multilabel:
        return data.y.size(1)
    labelled = data.train_mask | data.val_mask | data.test_mask
    return int(data.y[labelled].max()) + 1


def validate_node_data(data: Data, num_classes: Optional[int] = None, multilabel: bool = False) -> None:
    """Raises a ``ValueError`` naming the first problem with ``data``; see :class:`NodeDataModule`."""
    x = data.get("x")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"data.x must be a float tensor [num_nodes, num_features], got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else f'{x.dtype} {tuple(x.shape)}'}")
    num_nodes = x.size(0)
    bad_rows = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
    if bad_rows.numel():
        raise ValueError(f"data.x has NaN or inf in {bad_rows.numel()} of {num_nodes} rows (first: node "
                         f"{int(bad_rows[0])}); impute or drop those features before training")
    y = data.get("y")
    if not isinstance(y, torch.Tensor) or y.size(0) != num_nodes:
        raise ValueError(f"data.y must have one entry per node: x has {num_nodes} rows, y has "
                         f"{None if y is None else y.size(0)}")
    masks = {}
    for split in ("train", "val", "test"):
        mask = data.get(f"{split}_mask")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (num_nodes,):
            raise ValueError(f"data.{split}_mask must be a bool tensor of shape [{num_nodes}], got "
                             f"{None if mask is None else f'{mask.dtype} {tuple(mask.shape)}'}")
        if not mask.any():
            raise ValueError(f"data.{split}_mask selects no node; every split needs at least one")
        masks[split] = mask
    _validate_labels(y, masks["train"] | masks["val"] | masks["test"], num_classes, multilabel)
    _validate_edges(data, num_nodes)


def _validate_labels(y: torch.Tensor, labelled: torch.Tensor, num_classes: Optional[int], multilabel: bool) -> None:
    if multilabel:
        if y.dim() != 2 or (num_classes is not None and y.size(1) != num_classes):
            raise ValueError(f"multilabel data.y must be [num_nodes, {num_classes or 'num_tasks'}], "
                             f"got {tuple(y.shape)}")
        values = y[labelled]
        if not ((values == 0) | (values == 1)).all():
            raise ValueError("multilabel data.y must hold only 0 and 1 for nodes in a split")
        return
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"data.y must be integer class ids of shape [num_nodes], got {y.dtype} {tuple(y.shape)} "
                         f"(for several binary tasks per node use multilabel=True)")
    values = y[labelled]
    out_of_range = values < 0
    if num_classes is not None:
        out_of_range |= values >= num_classes
    if out_of_range.any():
        bad = labelled.nonzero().flatten()[out_of_range]
        raise ValueError(f"{bad.numel()} labelled nodes have a class id outside [0, {num_classes or 'num_classes'}) "
                         f"(first: node {int(bad[0])} has label {int(y[bad[0]])}); give unlabelled nodes no split")


def _validate_edges(data: Data, num_nodes: int) -> None:
    edge_index = data.get("edge_index")
    if edge_index is None:
        return
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.is_floating_point():
        raise ValueError(f"data.edge_index must be an integer tensor [2, num_edges], got "
                         f"{edge_index.dtype} {tuple(edge_index.shape)}")
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"data.edge_index holds node ids in [{int(edge_index.min())}, {int(edge_index.max())}] but "
                         f"there are {num_nodes} nodes (ids must be in [0, {num_nodes}))")
    edge_weight = data.get("edge_weight")
    if edge_weight is not None:
        if edge_weight.shape != (edge_index.size(1),):
            raise ValueError(f"data.edge_weight must have one entry per edge ({edge_index.size(1)}), got "
                             f"{tuple(edge_weight.shape)}")
        if not torch.isfinite(edge_weight).all():
            raise ValueError("data.edge_weight holds NaN or inf")
