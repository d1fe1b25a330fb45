"""What the parts of the project owe each other, written down as types in one place.

* :class:`GraphSource`: a graph read one block of target rows at a time (the graph store, or any
  graph too large for one batch), as the streamed exact forward (:mod:`.streaming`) reads it.
* :class:`ExactEvaluationPlan` and :class:`NodeRows`: a data module that evaluates exactly tells the
  LightningModule where the graph is and how to chunk it (:meth:`ExactEvaluationData.evaluation_plan`),
  and its evaluation batches are then :class:`NodeRows`: node ids with their labels and split masks,
  whose outputs the module reads from the exact pass instead of computing them from the batch.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Tuple, runtime_checkable

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

    def in_edges(self, start: int, stop: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Every edge into nodes ``start .. stop - 1``, duplicates and self loops as stored: the sources'
        global ids ``[E]`` int64, the targets' positions ``target - start`` ``[E]`` int64, and the edge
        weights ``[E]`` float32 (``None`` for an unweighted graph)."""


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


@runtime_checkable
class ExactEvaluationData(Protocol):
    """A data module that can evaluate every node exactly (``datamodules.RandomPartitionDataModule``)."""

    def evaluation_plan(self, encoder) -> Optional[ExactEvaluationPlan]:
        """Decides, for this encoder (a :class:`~difformer_lightning.DIFFormer`), whether validation, test
        and prediction run exactly; returns the plan, or ``None`` for batched evaluation. Called once per
        stage by the LightningModule's ``setup``, before any evaluation dataloader is requested; it says
        which it chose and why."""
