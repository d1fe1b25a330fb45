"""Random node partition over a graph store: memory per batch, not per graph.

Every epoch a permutation of the nodes derived from ``(seed, epoch)`` is cut into batches; each
batch carries its nodes' features, labels, split masks and the subgraph they induce. A batch is
built from the store's CSR by gathering only its own nodes' neighbour lists, so one epoch costs
O(E) in total, where the reference scheme scans the whole edge list for every batch.
"""
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Literal, Optional, Tuple

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch_geometric.typing
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch_geometric.data import Data

from difformer_lightning.contracts import ExactEvaluationPlan, NodeRows

from .base import ClassificationTargets
from .store import SPLIT_CODES, GraphStore, StoreError


# pyg-lib's subgraph kernel when installed; DIFFORMER_NO_PYG_LIB=1 turns it off.
USE_PYG_LIB = torch_geometric.typing.WITH_PYG_LIB and not os.environ.get("DIFFORMER_NO_PYG_LIB")


def induced_subgraph(rowptr: Tensor, col: Tensor, nodes: Tensor,
                     member: Optional["NodeBitmap"] = None) -> Tuple[Tensor, Tensor]:
    """Edges among ``nodes`` as positions in ``nodes``: ``[2, E_b]``, messages row 0 -> row 1, and the
    position of each in ``col`` ``[E_b]`` (to pick its weight).

    ``nodes`` must be sorted and unique. Reads only the CSR rows of ``nodes``: cost
    O(sum of their in-degrees) for the gather and the membership test (a bitmap of N bits),
    plus a log(batch) search for the few neighbours that fall inside the batch. Nothing of
    size N is allocated per call (pass ``member``, an N-bit bitmap reused across calls, as
    :class:`BatchBuilder` does), so it works on a memory-mapped CSR of any size.

    pyg-lib's ``sampler.subgraph`` does the same in C++ and is used when installed, but it
    requires ``rowptr`` and ``col`` of one dtype: stores keep ``col`` in int32 to halve their
    largest array, so on those the pure-torch path below runs (edge order may differ between
    the two paths; the edge sets are equal).
    """
    if USE_PYG_LIB and rowptr.dtype == col.dtype:
        import pyg_lib

        sub_rowptr, sub_col, edge_id = pyg_lib.sampler.subgraph(rowptr, col, nodes.to(rowptr.dtype), True)
        target = torch.repeat_interleave(torch.arange(nodes.numel()), sub_rowptr[1:] - sub_rowptr[:-1])
        return torch.stack([sub_col.long(), target]), edge_id.long()
    member = member if member is not None else NodeBitmap(rowptr.numel() - 1)
    starts = rowptr[nodes]
    counts = rowptr[nodes + 1] - starts
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if ends.numel() else 0
    # position in col of every neighbour entry: its row's start plus its rank within the row
    positions = torch.arange(total) + (starts - (ends - counts)).repeat_interleave(counts, output_size=total)
    source = col[positions]
    with member.marked(nodes):
        inside = member.contains(source).nonzero().flatten()
    target = torch.searchsorted(ends, inside, right=True)
    return torch.stack([torch.searchsorted(nodes, source[inside].long()), target]), positions[inside]


class NodeBitmap:
    """One bit per node, for O(1) batch-membership tests with N/8 bytes of memory
    (14 MB for ogbn-papers100M), allocated once per process and cleared after each use."""

    def __init__(self, num_nodes: int) -> None:
        self.bits = torch.zeros((num_nodes >> 3) + 1, dtype=torch.uint8)

    @contextmanager
    def marked(self, nodes: Tensor):
        nodes = nodes.long()
        # nodes are unique, so bits landing in the same byte are distinct and adding them is OR
        self.bits.index_add_(0, nodes >> 3, torch.ones(1, dtype=torch.uint8).expand(nodes.numel())
                             .bitwise_left_shift((nodes & 7).to(torch.uint8)))
        try:
            yield self
        finally:
            self.bits[nodes >> 3] = 0

    def contains(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        return (self.bits[ids >> 3].bitwise_right_shift((ids & 7).to(torch.uint8)) & 1).bool()


def sample_neighbors(rowptr: Tensor, col: Tensor, nodes: Tensor, fanout: int, generator: torch.Generator) -> Tensor:
    """``fanout`` in-neighbours of every node in ``nodes``, drawn uniformly with replacement
    (nodes without neighbours contribute none); O(len(nodes) x fanout) from the CSR."""
    starts = rowptr[nodes]
    degree = rowptr[nodes + 1] - starts
    has_neighbors = degree > 0
    starts, degree = starts[has_neighbors].repeat_interleave(fanout), degree[has_neighbors].repeat_interleave(fanout)
    offsets = (torch.rand(degree.numel(), generator=generator, dtype=torch.float64) * degree).long()
    return col[starts + offsets].long()


class BatchBuilder(Dataset):
    """Turns a batch request from :class:`PartitionSampler` into a batch ``Data``.

    With ``fanout == 0`` the batch is the requested nodes and the subgraph they induce (random
    node partition), with the edges' weights when the store has them. With ``fanout > 0`` the
    requested nodes are *seeds*: ``fanout`` sampled in-neighbours of each seed join the batch so that
    seeds keep part of their neighbourhood, and only seeds count in the split masks (loss and metrics).
    With ``rows_only`` a batch is a :class:`~difformer_lightning.contracts.NodeRows` (ids, labels and
    masks, for the exact evaluation). The store is opened lazily in each process: only its path crosses
    process boundaries (DataLoader workers, DDP ranks), so every process maps the same files instead of
    receiving a pickled copy.
    """

    def __init__(self, path: Path, fanout: int = 0, rows_only: bool = False) -> None:
        self.path = Path(path)
        self.fanout, self.rows_only = fanout, rows_only
        self._store: Optional[GraphStore] = None
        self._member: Optional[NodeBitmap] = None

    @property
    def store(self) -> GraphStore:
        if self._store is None:
            self._store = GraphStore.open(self.path, validate=False)  # validated once, in setup()
            self._member = NodeBitmap(self._store.num_nodes)
        return self._store

    def __getitem__(self, request: Tuple[Tensor, int]) -> Data:
        seeds, batch_seed = request
        store = self.store
        # Order inside a batch is free: sorted ids read the memory-mapped rows in file order.
        nodes = torch.sort(seeds.long()).values
        counted = torch.ones(nodes.numel(), dtype=torch.bool)
        if self.fanout > 0 and not self.rows_only:
            generator = torch.Generator().manual_seed(batch_seed)
            seeds = nodes
            nodes = torch.unique(torch.cat([seeds, sample_neighbors(store.rowptr, store.col, seeds, self.fanout,
                                                                    generator)]))
            slot = torch.searchsorted(seeds, nodes).clamp_(max=seeds.numel() - 1)
            counted = seeds[slot] == nodes
        code = store.split[nodes]
        y = store.y[nodes]
        fields = dict(y=y.float() if store.multilabel else y.long(), n_id=nodes,
                      **{f"{name}_mask": (code == value) & counted for name, value in SPLIT_CODES.items()})
        if self.fanout > 0 and not self.rows_only:
            fields["seed_mask"] = counted  # the nodes the batch was drawn for (predictions keep only these)
        if self.rows_only:
            return NodeRows(**fields)
        edge_index, edge_ids = induced_subgraph(store.rowptr, store.col, nodes, self._member)
        if store.edge_weight is not None:
            fields["edge_weight"] = store.edge_weight[edge_ids].float()
        # In-edges of the batch's nodes in the whole graph: callbacks.PartitionStats divides the
        # batch's edges by it to report how much of the graph a batch keeps.
        graph_in_edges = int((store.rowptr[nodes + 1] - store.rowptr[nodes]).sum())
        return Data(x=store.x[nodes].float(), edge_index=edge_index, graph_in_edges=graph_in_edges, **fields)

    def __len__(self) -> int:
        return self.store.num_nodes

    def __getstate__(self) -> dict:
        return {"path": self.path, "fanout": self.fanout, "rows_only": self.rows_only, "_store": None,
                "_member": None}


class PartitionSampler(DistributedSampler):
    """Yields one request ``(node ids, batch seed)`` per batch: a partition of all nodes (or of
    ``nodes``), new every epoch; the batch seed drives any sampling inside the batch.

    The permutation comes from a generator seeded with ``(seed, epoch)``, never from the
    global RNG, so every rank derives the same one. For training (``shuffle``) the nodes are
    cut into ``k * world`` batches of near-equal size (at most ``batch_size``) and rank ``r``
    takes batches ``r, r + world, ...``: every rank gets exactly ``k`` batches and every node
    is used once per epoch, so no rank waits at a last batch the others do not have. For
    evaluation (``shuffle=False``) the consecutive ids are cut into ``ceil(N / batch_size)``
    batches whatever the number of ranks (ranks may differ by one batch, harmless without
    gradients), so metrics summed over ranks equal a single-process evaluation.
    :meth:`resume` starts the next pass over an epoch part-way, for an exact mid-epoch resume.
    It subclasses ``DistributedSampler`` so Lightning leaves it in place and calls
    :meth:`set_epoch`.
    """

    def __init__(self, num_nodes: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None, nodes: Optional[Tensor] = None) -> None:
        self.nodes = nodes
        num_nodes = nodes.numel() if nodes is not None else num_nodes
        if batch_size <= 0 or batch_size > num_nodes:
            raise ValueError(f"batch_size must be in [1, {num_nodes}] (the number of nodes), got {batch_size}")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.num_nodes, self.batch_size, self.seed, self.shuffle = num_nodes, batch_size, seed, shuffle
        self.epoch, self.drop_last = 0, False
        self._skip: Optional[Tuple[int, int]] = None
        self.total_batches = -(-num_nodes // batch_size)  # ceil
        if shuffle:
            self.total_batches = -(-self.total_batches // self.num_replicas) * self.num_replicas
            if self.total_batches > num_nodes:
                raise ValueError(f"{num_nodes} nodes cannot fill {self.total_batches // self.num_replicas} batches "
                                 f"on each of {self.num_replicas} ranks")

    def _epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def permutation(self) -> Tensor:
        order = (torch.randperm(self.num_nodes, generator=torch.Generator().manual_seed(self._epoch_seed()))
                 if self.shuffle else torch.arange(self.num_nodes))
        return self.nodes[order] if self.nodes is not None else order

    def _indices(self) -> range:
        return range(self.rank, self.total_batches, self.num_replicas)

    def __iter__(self) -> Iterator[Tuple[Tensor, int]]:
        indices = self._indices()
        if self._skip is not None and self._skip[0] == self.epoch:
            indices = indices[self._skip[1]:]
        self._skip = None
        batches = torch.tensor_split(self.permutation(), self.total_batches)
        for index in indices:
            yield batches[index], self._epoch_seed() * 65_537 + index

    def __len__(self) -> int:
        return len(self._indices())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, position: int) -> None:
        """Moves to ``epoch``; its next pass skips this rank's first ``position`` batches.

        The epoch is set here, not left to Lightning's ``set_epoch``: Lightning creates the
        first iterator of a resumed fit (and its DataLoader workers start drawing requests)
        before it sets the epoch.
        """
        self.epoch, self._skip = epoch, (epoch, position)


class RandomPartitionDataModule(ClassificationTargets, pl.LightningDataModule):
    """Mini-batch training over a graph store (see :mod:`datamodules.store`).

    ``fanout=0`` (default) is the reference's random node partition: every epoch a fresh
    random partition of all nodes into batches of ``batch_size``, each with its induced
    subgraph. A batch keeps only about ``degree x batch_size / N`` in-batch neighbours per node
    (0.1 on ogbn-papers100M), so on large sparse graphs the graph term sees almost no edges.
    ``fanout > 0`` keeps locality without pyg-lib or METIS: each training batch is
    ``batch_size`` random *training* seeds plus ``fanout`` sampled in-neighbours of each seed,
    and only seeds count in the loss and metrics. Batches are built in ``num_workers`` DataLoader
    processes while the model trains, and copied into pinned memory when a GPU is used.

    Validation, test and prediction (``evaluation``):

    * ``'exact'`` (the default, ``None``, wherever the kernel allows it): every node's output is
      computed exactly over the whole graph, layer by layer over the store
      (:func:`difformer_lightning.streaming.exact_states`), in chunks of ``eval_batch_size`` nodes on the
      run's device and precision, shared among the DDP ranks; its layer states live in scratch arrays
      under ``scratch_dir`` (the system's temporary folder by default; with several machines a folder
      every machine mounts at the same path is required). DIFFormer-a's exact pass costs O(N^2): it runs
      only when asked for (``evaluation='exact'``) and when its estimated cost is at most
      ``exact_budget_flops``; otherwise the run says so at start and evaluates by partition.
    * ``'partition'``: a fixed partition of consecutive node ids into batches of ``eval_batch_size``
      (each node attends only to its batch: fast, but not the model's full-graph output).
    """

    def __init__(self, store: str, batch_size: int = 10_000, eval_batch_size: Optional[int] = None, seed: int = 0,
                 num_workers: int = 2, fanout: int = 0, evaluation: Optional[Literal["exact", "partition"]] = None,
                 scratch_dir: Optional[str] = None, exact_budget_flops: float = 1e12) -> None:
        super().__init__()
        if fanout < 0:
            raise ValueError(f"fanout must be >= 0 (0: random partition), got {fanout}")
        if evaluation not in (None, "exact", "partition"):
            raise ValueError(f"unknown evaluation {evaluation!r}: choose 'exact' or 'partition' (or leave it unset: "
                             f"exact wherever the kernel allows it)")
        self.path = Path(store)
        self.batch_size, self.seed, self.num_workers, self.fanout = batch_size, seed, num_workers, fanout
        self.eval_batch_size = eval_batch_size or batch_size
        self.evaluation, self.exact_budget_flops = evaluation, exact_budget_flops
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        self._store: Optional[GraphStore] = None
        self._train_sampler: Optional[PartitionSampler] = None
        self._resume_at: Optional[Tuple[int, int]] = None
        self._plan: Optional[ExactEvaluationPlan] = None

    def evaluation_plan(self, encoder) -> Optional[ExactEvaluationPlan]:
        """Exact evaluation for ``encoder`` (a ``DIFFormer``) unless ``evaluation='partition'`` or the kernel
        is DIFFormer-a's without a request and a budget that allows it; says which, and why, on rank 0.
        Raises a ``ValueError`` when several machines would share no scratch folder."""
        num_nodes, kernel = self.store.num_nodes, encoder.kernel
        exact = self.evaluation != "partition"
        reason = "evaluation='partition'" if not exact else "every node's full-graph output"
        if exact and kernel == "sigmoid":
            flops = encoder.exact_evaluation_flops(num_nodes)
            if self.evaluation is None:
                exact = False
                reason = (f"DIFFormer-a's exact pass costs O(N^2), about {flops:.2e} FLOPs here: pass "
                          f"evaluation='exact' (and exact_budget_flops >= that) to evaluate every node exactly")
            elif flops > self.exact_budget_flops:
                exact = False
                reason = (f"DIFFormer-a's exact pass would cost about {flops:.2e} FLOPs, above exact_budget_flops="
                          f"{self.exact_budget_flops:.2e}; raise the budget to evaluate exactly")
        machines = self.trainer.num_nodes if self.trainer is not None else 1
        if exact and machines > 1 and self.scratch_dir is None:
            raise ValueError(f"exact evaluation on {machines} machines needs a scratch folder that every machine mounts "
                             f"at the same path: set data.scratch_dir (or evaluation='partition')")
        mode = "exact" if exact else "partition batches of " + str(self.eval_batch_size)
        rank_zero_info(f"{type(self).__name__}: validation, test and prediction by {mode} ({reason}).")
        self._plan = (ExactEvaluationPlan(self.store, self.eval_batch_size, self.scratch_dir, shared=machines > 1)
                      if exact else None)
        return self._plan

    @property
    def store(self) -> GraphStore:
        """The validated store, mapped on first use (errors name the file and the problem)."""
        if self._store is None:
            self._store = GraphStore.open(self.path)
            for name, size in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch_size)):
                if size <= 0 or size > self._store.num_nodes:
                    raise ValueError(f"{name} must be in [1, {self._store.num_nodes}] (the number of nodes), got {size}")
            for split in ("train", "val"):
                if getattr(self._store, f"{split}_idx").numel() == 0:
                    raise StoreError(f"{self.path}: the {split} split names no node")
        return self._store

    @property
    def num_nodes(self) -> int:
        return self.store.num_nodes

    @property
    def num_features(self) -> int:
        return self.store.num_features

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    @property
    def multilabel(self) -> bool:
        return self.store.multilabel

    @property
    def max_batch_nodes(self) -> int:
        return min(self.store.num_nodes, max(self.batch_size, self.eval_batch_size) * (1 + self.fanout))

    def setup(self, stage: str) -> None:
        self.store  # noqa: B018  opens and validates before any training work

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records about this data, to refuse resuming on other data."""
        store = self.store
        return {"dataset": type(self).__name__, "num_nodes": store.num_nodes, "num_edges": store.num_edges,
                "num_features": store.num_features, "num_classes": store.num_classes,
                "batch_size": self.batch_size, "seed": self.seed, "fanout": self.fanout}

    def state_dict(self) -> Dict[str, object]:
        """The position in the training partition: the epoch and how many of this epoch's batches
        the training loop has finished (taken from the loop: DataLoader workers draw ahead)."""
        sampler, epoch, position = self._train_sampler, 0, 0
        if sampler is not None:
            epoch = sampler.epoch
            if self.trainer is not None:
                position = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if position >= len(sampler):
                epoch, position = epoch + 1, 0
        world_size = sampler.num_replicas if sampler is not None else 1
        return {"epoch": epoch, "position": position, "world_size": world_size, "data": self.describe()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        # The data itself was compared by NodeClassifier.on_load_checkpoint (checkpoint.check_compatible).
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if fitting and state["position"] > 0 and state["world_size"] != world_size:
            raise ValueError(f"the checkpoint was written mid-epoch by {state['world_size']} ranks and this run has "
                             f"{world_size}: the epoch's batches differ between the two, so it cannot continue "
                             f"exactly. Resume with {state['world_size']} devices, or from an end-of-epoch checkpoint.")
        self._resume_at = (int(state["epoch"]), int(state["position"]))

    def probe_batch(self, num_nodes: int, seed: int = 0) -> Data:
        """A fixed batch of ``num_nodes`` random nodes with their induced subgraph."""
        num_nodes = min(num_nodes, self.store.num_nodes)
        nodes = torch.randperm(self.store.num_nodes, generator=torch.Generator().manual_seed(seed))[:num_nodes]
        return BatchBuilder(self.path)[(nodes, seed)]

    def _loader(self, batch_size: int, shuffle: bool, seeds: Optional[Tensor] = None) -> DataLoader:
        sampler = PartitionSampler(self.store.num_nodes, batch_size, self.seed, shuffle, nodes=seeds)
        if shuffle:
            self._train_sampler = sampler
            if self._resume_at is not None:
                sampler.resume(*self._resume_at)
                self._resume_at = None
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # An own generator: the DataLoader draws its worker base seed from it, not from the global
        # RNG, whose state (dropout) a mid-epoch checkpoint restores.
        rows_only = not shuffle and self._plan is not None
        # Exact-evaluation batches are a few index lookups each: built in this process. Forking workers
        # then would also make every page of this process's heap copy-on-write while the exact pass
        # rewrites it (measured: 1M nodes, 8 s of page faults added to a 5 s pass).
        workers = 0 if rows_only else self.num_workers
        return DataLoader(BatchBuilder(self.path, self.fanout, rows_only), sampler=sampler, batch_size=None,
                          num_workers=workers, pin_memory=on_gpu, persistent_workers=workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        if self.fanout == 0:
            return self._loader(self.batch_size, shuffle=True)
        seeds = self.store.train_idx
        return self._loader(min(self.batch_size, seeds.numel()), shuffle=True, seeds=seeds)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False)
