"""Full-batch node-level data, and the contract for plugging in a new dataset."""
import gzip
import os
import pickle
import zipfile
import zlib
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Dict, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch_geometric.data import Data

from difformer_lightning.contracts import SPLITS

from .validation import FEATURE_LIMIT, check_finite_features, check_labels, check_split_sizes, feature_limit

if TYPE_CHECKING:
    from difformer_lightning.contracts import ExactEvaluationPlan

DATA_ENV = "DIFFORMER_DATA"


def data_root(root: Optional[str]) -> Path:
    """The folder datasets live in: ``root`` if given, else ``$DIFFORMER_DATA``, else ``./data``."""
    return Path(root or os.environ.get(DATA_ENV) or "data").expanduser()


def loader_generator(seed: int = 0) -> torch.Generator:
    """The generator every DataLoader of this project is given: a DataLoader draws a seed from it each time an
    iterator is created (its worker base seed), otherwise from the global random state. That global state is
    the dropout's, which a checkpoint restores; a resumed run creates one iterator more than the uninterrupted
    one (Lightning's sanity check), which would shift every later dropout mask and make the resume inexact."""
    return torch.Generator().manual_seed(seed)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor downloadable."""


# What reading a raw file cut short or damaged raises inside PyG's dataset classes (pickle, numpy's zip, gzip,
# zlib): caught around them and named as a damaged file (the one place that list lives).
DAMAGED_FILE_ERRORS = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, gzip.BadGzipFile)


def damaged_raw_files(what: str, folder: Path, error: BaseException) -> ValueError:
    """The error for a dataset whose raw files under ``folder`` could not be read (``error``: one of
    :data:`DAMAGED_FILE_ERRORS`): names the dataset, the folder, what failed and what to do."""
    return ValueError(f"{what}: a raw file under {folder} is cut short or damaged ({type(error).__name__}: "
                      f"{error}); delete {folder} so it is downloaded again (PyG does that where the network "
                      f"allows), or copy the raw files there again")


class GraphDataModule(pl.LightningDataModule):
    """The base of every data module of this project: the data contract
    (:class:`difformer_lightning.contracts.DataContract`) with its defaults.

    Subclasses define ``num_features``, ``num_outputs``, ``task``, ``num_nodes``, ``max_batch_nodes``,
    ``describe()`` and ``probe_batch()``; ``evaluation_plan()`` defaults to evaluation on the batches, and
    the LightningModule saves ``describe()`` in the checkpoint's ``data_description`` slot (what a checkpoint is
    checked against, field by field). ``task_family``
    (``'classification'`` or ``'regression'``, a class attribute) lets ``train.py`` pick the model before
    any data is loaded. A DDP rank may get no evaluation batch: it still joins every collective.
    """

    task_family: ClassVar[str] = "classification"

    def __init__(self) -> None:
        super().__init__()
        # Lightning's own switch (a public attribute of every data module): otherwise a rank whose share of
        # the evaluation batches is empty stops the run.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    num_features: int
    num_outputs: int
    task: str
    num_nodes: int
    max_batch_nodes: int

    @abstractmethod
    def describe(self) -> Dict[str, object]:
        """See :meth:`difformer_lightning.contracts.DataContract.describe`."""

    @abstractmethod
    def probe_batch(self, num_nodes: int, seed: int = 0) -> Data:
        """See :meth:`difformer_lightning.contracts.DataContract.probe_batch`."""

    @property
    def metric(self) -> str:
        """ROC-AUC over tasks for multi-label data, accuracy otherwise (subclasses say more)."""
        return "rocauc" if self.task == "multilabel" else "accuracy"

    @property
    def prediction_nodes(self) -> Optional[Tensor]:
        """Every node's row is predicted (``None``), unless a subclass offers a choice."""
        return None

    def evaluation_plan(self, encoder) -> Optional["ExactEvaluationPlan"]:
        """Evaluation on the data module's own batches (no exact pass), unless a subclass says otherwise."""
        return None



class ClassificationTargets:
    """What ``train.py`` links from a classification data module into the model: the encoder's
    output size (``num_outputs``) and the ``task``. Needs ``num_classes`` and ``multilabel``."""

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"


class NodeDataModule(ClassificationTargets, GraphDataModule):
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
        data = self.data  # loads and validates before any training work
        if self.trainer is not None and feature_limit(self.trainer.precision) < FEATURE_LIMIT:
            check_finite_features(data.x, 0, "data.x", limit=feature_limit(self.trainer.precision))

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records about this data, to refuse resuming on other data."""
        data = self.data
        return {"dataset": type(self).__name__, "num_nodes": data.num_nodes, "num_edges": data.num_edges,
                "num_features": data.num_features, "num_classes": self.num_classes}

    def probe_batch(self, num_nodes: int, seed: int = 0) -> Data:
        """The whole graph, or the subgraph induced by ``num_nodes`` fixed random nodes if smaller."""
        data = self.data
        if num_nodes >= data.num_nodes:
            return data
        nodes = torch.randperm(data.num_nodes, generator=torch.Generator().manual_seed(seed))[:num_nodes]
        return data.subgraph(torch.sort(nodes).values)

    def _loader(self) -> DataLoader:
        # One batch per epoch: the whole graph. batch_size=None hands the Data through as is.
        return DataLoader([self.data], batch_size=None, collate_fn=_as_is, generator=loader_generator())

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
    """Raises a ``ValueError`` naming the first problem with ``data``; see :class:`NodeDataModule`. The
    feature, split and label rules are those of graph stores too (:mod:`datamodules.validation`)."""
    x = data.get("x")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"data.x must be a float tensor [num_nodes, num_features], got "
                         f"{type(x).__name__ if not isinstance(x, torch.Tensor) else f'{x.dtype} {tuple(x.shape)}'}")
    num_nodes = x.size(0)
    check_finite_features(x, 0, "data.x")
    y = data.get("y")
    if not isinstance(y, torch.Tensor) or y.size(0) != num_nodes:
        raise ValueError(f"data.y must have one entry per node: x has {num_nodes} rows, y has "
                         f"{None if y is None else y.size(0)}")
    if multilabel and (y.dim() != 2 or (num_classes is not None and y.size(1) != num_classes)):
        raise ValueError(f"multilabel data.y must be [num_nodes, {num_classes or 'num_tasks'}], got {tuple(y.shape)}")
    if not multilabel and (y.dim() != 1 or y.is_floating_point()):
        raise ValueError(f"data.y must be integer class ids of shape [num_nodes], got {y.dtype} {tuple(y.shape)} "
                         f"(for several binary tasks per node use multilabel=True)")
    masks = {}
    for split in SPLITS:
        mask = data.get(f"{split}_mask")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (num_nodes,):
            raise ValueError(f"data.{split}_mask must be a bool tensor of shape [{num_nodes}], got "
                             f"{None if mask is None else f'{mask.dtype} {tuple(mask.shape)}'}")
        masks[split] = mask
    check_split_sizes({split: int(mask.sum()) for split, mask in masks.items()}, "data")
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        both = (masks[first] & masks[second]).nonzero().flatten()
        if both.numel():
            raise ValueError(f"data: {both.numel()} nodes are in both the {first} and the {second} split (first: node "
                             f"{int(both[0])}); every node belongs to at most one split")
    for split, mask in masks.items():
        nodes = mask.nonzero().flatten()
        check_labels(y[nodes], nodes, split, num_classes, multilabel, "data.y")
    _validate_edges(data, num_nodes)


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
