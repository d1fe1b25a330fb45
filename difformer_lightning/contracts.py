"""What the parts of the project owe each other, written down as types in one place.

* :class:`DataContract`: everything the training side (``train.py``, the LightningModules, the callbacks,
  the checkpoint check) uses from a data module; :func:`check_data_module` names what a data module lacks.
  ``datamodules.GraphDataModule`` implements the defaults; every data module of the project derives from it.
* The batches a data module yields (documented on :class:`DataContract`): PyG ``Data`` objects.
* :class:`GraphSource`: a graph read one block of target rows at a time (the graph store, or any
  graph too large for one batch), as the streamed exact forward (:mod:`.streaming`) reads it.
* :class:`ExactEvaluationPlan` and :class:`NodeRows`: a data module that evaluates exactly tells the
  LightningModule where the graph is and how to chunk it (:meth:`DataContract.evaluation_plan`),
  and its evaluation batches are then :class:`NodeRows`: node ids with their labels and split masks,
  whose outputs the module reads from the exact pass instead of computing them from the batch.
"""
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Protocol, Tuple, TypedDict, Union, runtime_checkable

import torch
from torch import Tensor
from torch_geometric.data import Data


@runtime_checkable
class GraphSource(Protocol):
    """A graph read by blocks of consecutive target nodes."""

    @property
    def num_nodes(self) -> int:
        """N."""

    def features(self, start: int, stop: int) -> Tensor:
        """Features of nodes ``start .. stop - 1``: ``[stop - start, F]`` float32."""

    @property
    def self_loops(self) -> Optional[int]:
        """How many edges go from a node to itself, or ``None`` when unknown (the exact pass then looks for them
        in its degree pass; with ``0`` it takes the degrees from the row pointers alone)."""

    def in_rows(self, start: int, stop: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Every edge into nodes ``start .. stop - 1``, duplicates and self loops as stored, in CSR form:
        ``row_pointer`` ``[stop - start + 1]`` int64 (the edges of target ``start + i`` are
        ``row_pointer[i] - row_pointer[0] ..`` of the others; any base), the sources' global ids ``[E]`` (int32
        or int64) grouped by target in that order, and the edge weights ``[E]`` float32 (``None`` for an
        unweighted graph)."""


@dataclass(frozen=True)
class ExactEvaluationPlan:
    """How to evaluate every node exactly: the graph, the nodes per chunk (memory per process grows with
    it), and the folder for the scratch arrays (``None``: the system's temporary folder; with several
    machines a folder every machine mounts at the same path, ``shared=True``)."""

    source: GraphSource
    chunk_nodes: int
    scratch_dir: Optional[Path] = None
    shared: bool = False


class NodeRows(Data):
    """An evaluation batch of the exact mode: ``n_id`` ``[B]`` (node ids), ``y`` and the
    ``{train,val,test}_mask`` of those nodes; no features and no edges (the outputs come from the exact
    pass over the whole graph)."""


class DataDescription(TypedDict, total=False):
    """What a data module's ``describe()`` returns and a checkpoint keeps in its ``data_description`` slot; a
    checkpoint is loaded only on data whose description equals it in every field it recorded
    (:func:`difformer_lightning.checkpoint.check_compatible`: ``batch_size``, ``seed`` and ``fanout``, how batches
    are drawn, only when resuming a fit). ``dataset``, ``num_nodes``, ``num_features`` and ``num_classes`` are
    always there; data modules add what else identifies their data."""

    dataset: str
    num_nodes: int
    num_edges: int
    num_features: int
    num_classes: int
    num_snapshots: int  # temporal data: snapshots in all splits
    split: Union[List[int], int, str]  # temporal: snapshots per split; others: which split
    edge_weight_transform: str
    batch_size: Union[int, str]
    seed: int
    fanout: int


TASKS = ("multiclass", "multilabel", "regression")
# The node splits, in this order everywhere: batches carry ``{split}_mask``, stores ``{split}_idx``.
SPLITS = ("train", "val", "test")


@runtime_checkable
class DataContract(Protocol):
    """What a data module owes the training side. Every member is defined on the class (a property, an
    attribute or a method), so a module that lacks one is refused before any data is loaded
    (:func:`check_data_module`).

    Its training, validation, test and prediction dataloaders yield PyG ``Data`` batches with

    * ``x`` float ``[B, F]``; ``y``: class ids ``[B]`` (``multiclass``), ``{0, 1}`` ``[B, T]``
      (``multilabel``) or values ``[B]`` (``regression``);
    * ``train_mask``, ``val_mask``, ``test_mask`` bool ``[B]`` (classification; the nodes each split scores);
    * optional ``edge_index`` ``[2, E]`` (positions in the batch, messages row 0 -> row 1), ``edge_weight``
      ``[E]``, ``batch`` ``[B]`` (sorted graph ids: separate graphs), ``n_id`` ``[B]`` (the nodes' ids in the
      whole graph: prediction rows), ``seed_mask`` ``[B]`` (the nodes a sampled batch was drawn for: the
      only ones predicted), ``graph_in_edges`` (int: the batch nodes' in-edges in the whole graph);

    or, in exact evaluation (:meth:`evaluation_plan` returned a plan), :class:`NodeRows`.
    """

    @property
    def num_features(self) -> int:
        """F, the encoder's ``in_channels``."""

    @property
    def num_outputs(self) -> int:
        """The encoder's ``out_channels``: classes, tasks, or 1 for regression."""

    @property
    def task(self) -> str:
        """``'multiclass'``, ``'multilabel'`` or ``'regression'``."""

    @property
    def metric(self) -> str:
        """The metric the literature reports for this data (``NodeClassifier(metric='auto')`` uses it):
        ``'accuracy'``, ``'rocauc'``, ``'ogb:<name>'`` (OGB's Evaluator) or ``'mse'``."""

    @property
    def num_nodes(self) -> int:
        """The rows of a prediction (nodes of the graph or store)."""

    @property
    def max_batch_nodes(self) -> int:
        """The most nodes one forward pass sees (DIFFormer-a's memory check, before training)."""

    def describe(self) -> DataDescription:
        """What a checkpoint records about the data (:class:`DataDescription`), to refuse resuming on other data:
        at least ``dataset``, ``num_nodes``, ``num_features`` and ``num_classes``; how batches are drawn
        (``batch_size``, ``seed``, ``fanout``) where that applies."""

    def probe_batch(self, num_nodes: int, seed: int = 0):
        """A fixed batch of at most ``num_nodes`` nodes (``callbacks.Energy`` evaluates on it)."""

    @property
    def prediction_nodes(self) -> Optional[Tensor]:
        """The node ids whose rows ``predict`` writes, in that order (``[K]`` int64), or ``None`` for every node
        (``num_nodes`` rows, row ``i`` for node ``i``). Prediction batches must cover them (``n_id``); rows of
        other nodes in a batch are not written."""

    def evaluation_plan(self, encoder) -> Optional[ExactEvaluationPlan]:
        """Decides, for this encoder (a :class:`~difformer_lightning.DIFFormer`), whether validation, test
        and prediction run exactly; returns the plan, or ``None`` for evaluation on the data module's
        batches. Called by the LightningModule's ``setup``, before any evaluation dataloader is requested;
        it says which it chose and why."""


DATA_MEMBERS = tuple(name for name in DataContract.__dict__
                     if not name.startswith("_") and name not in ("register",))


def missing_members(data_class: type) -> List[str]:
    """The members of :class:`DataContract` that ``data_class`` does not define (or leaves abstract)."""
    return [name for name in DATA_MEMBERS
            if getattr(inspect.getattr_static(data_class, name, None), "__isabstractmethod__", False)
            or inspect.getattr_static(data_class, name, None) is None]


def check_data_module(datamodule) -> None:
    """Raises a ``TypeError`` naming every member of :class:`DataContract` that ``datamodule`` (an
    instance or a class) lacks."""
    data_class = datamodule if isinstance(datamodule, type) else type(datamodule)
    missing = missing_members(data_class)
    if missing:
        raise TypeError(
            f"{data_class.__module__}.{data_class.__qualname__} lacks {', '.join(missing)} of the data contract "
            f"(difformer_lightning.contracts.DataContract): define them on the class, or derive it from "
            f"datamodules.GraphDataModule, which has the defaults")


def check_batch(batch, num_features: int, num_outputs: int, task: str, num_nodes: Optional[int], where: str) -> None:
    """Checks one batch against the batch layout of :class:`DataContract` (a data module's first batches are
    checked before any step: ``EncoderModule``), so that a data module of the user's own that yields wrong
    batches is told what is wrong instead of failing deep in the encoder or training on nonsense.

    Raises a ``TypeError`` when ``batch`` is not a PyG ``Data``, else a ``ValueError`` naming every field that
    is missing or has the wrong dtype or shape, and ids out of range: ``edge_index`` entries at or above the
    batch's node count, ``n_id`` at or above ``num_nodes``, class ids at or above ``num_outputs``.
    :class:`NodeRows` (exact evaluation) carry no features and are not checked here."""
    if not isinstance(batch, Data):
        raise TypeError(f"{where} is a {type(batch).__name__}, not a torch_geometric.data.Data: the data module's "
                        f"dataloaders must yield Data batches (difformer_lightning.contracts.DataContract)")
    if isinstance(batch, NodeRows):
        return
    problems: List[str] = []

    def shape(tensor: Tensor) -> str:
        return f"{str(tensor.dtype).replace('torch.', '')} {list(tensor.shape)}"

    x = batch.get("x")
    if not isinstance(x, Tensor):
        problems.append(f"x is missing (float [B, {num_features}])")
        size = batch.num_nodes
    else:
        size = x.size(0) if x.dim() >= 1 else 0
        if not x.is_floating_point() or x.dim() != 2 or x.size(1) != num_features:
            problems.append(f"x is {shape(x)}, not float [B, {num_features}] (num_features: {num_features})")
    y = batch.get("y")
    wanted = {"multiclass": "integer class ids [B]", "multilabel": f"{{0, 1}} [B, {num_outputs}]",
              "regression": "float [B]"}[task]
    if not isinstance(y, Tensor):
        problems.append(f"y is missing ({wanted})")
    elif task == "multiclass" and (y.is_floating_point() or y.shape != (size,)):
        problems.append(f"y is {shape(y)}, not {wanted}")
    elif task == "multiclass" and y.numel() and int(y.max()) >= num_outputs:
        problems.append(f"y holds class {int(y.max())}, but num_outputs is {num_outputs} (classes 0 .. "
                        f"{num_outputs - 1}; -1 marks an unlabelled node)")
    elif task == "multilabel" and y.shape != (size, num_outputs):
        problems.append(f"y is {shape(y)}, not {wanted}")
    elif task == "regression" and (not y.is_floating_point() or y.shape != (size,)):
        problems.append(f"y is {shape(y)}, not {wanted}")
    if task != "regression":
        for split in SPLITS:
            mask = batch.get(f"{split}_mask")
            if not isinstance(mask, Tensor):
                problems.append(f"{split}_mask is missing (bool [B]: the nodes the {split} split scores)")
            elif mask.dtype != torch.bool or mask.shape != (size,):
                problems.append(f"{split}_mask is {shape(mask)}, not bool [{size}]")
    edge_index = batch.get("edge_index")
    if edge_index is not None:
        if not isinstance(edge_index, Tensor) or edge_index.is_floating_point() or edge_index.dim() != 2 \
                or edge_index.size(0) != 2:
            problems.append(f"edge_index is {shape(edge_index) if isinstance(edge_index, Tensor) else edge_index!r}, "
                            f"not integer [2, E]")
        elif edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= size):
            problems.append(f"edge_index holds node {int(edge_index.max())} (or a negative one) in a batch of "
                            f"{size} nodes: its entries are positions in the batch, 0 .. {size - 1}")
        weight = batch.get("edge_weight")
        if isinstance(edge_index, Tensor) and isinstance(weight, Tensor) and edge_index.dim() == 2 \
                and weight.shape != (edge_index.size(-1),):
            problems.append(f"edge_weight is {shape(weight)}, not [E] = [{edge_index.size(-1)}]")
    graph = batch.get("batch")
    if isinstance(graph, Tensor) and (graph.shape != (size,) or (graph.numel() > 1 and bool((graph[1:] < graph[:-1]).any()))):
        problems.append(f"batch is {shape(graph)}, not sorted graph ids [{size}]")
    n_id = batch.get("n_id")
    if isinstance(n_id, Tensor):
        if n_id.shape != (size,):
            problems.append(f"n_id is {shape(n_id)}, not [{size}]")
        elif num_nodes is not None and n_id.numel() and (int(n_id.min()) < 0 or int(n_id.max()) >= num_nodes):
            problems.append(f"n_id holds node {int(n_id.max())} (or a negative one), but num_nodes is {num_nodes} "
                            f"(ids 0 .. {num_nodes - 1})")
    if problems:
        raise ValueError(f"{where} breaks the data contract (difformer_lightning.contracts.DataContract): "
                         + "; ".join(problems) + ". Fix the batches the data module's dataloaders yield.")
