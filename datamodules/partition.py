"""Random node partition over a graph store: memory per batch, not per graph.

Every epoch a permutation of the nodes derived from ``(seed, epoch)`` is cut into batches; each
batch carries its nodes' features, labels, split masks and the subgraph they induce. A batch is
built from the store's CSR by gathering only its own nodes' neighbour lists, so one epoch costs
O(E) in total, where the reference scheme scans the whole edge list for every batch.
"""
import warnings
from pathlib import Path
from typing import Dict, Iterator, Literal, Optional, Tuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch_geometric.data import Data

import numpy as np

from difformer_lightning.contracts import SPLITS, ExactEvaluationPlan, NodeRows

from .base import ClassificationTargets, GraphDataModule, loader_generator
from .csr import NodeBitmap, induced_subgraph, sample_neighbors
from .store import SPLIT_CODES, GraphStore, check_feature_range
from .validation import FEATURE_LIMIT, feature_limit


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


class PartitionSampler(Sampler):
    """Yields one request ``(node ids, batch seed)`` per batch: a partition of all nodes (or of
    ``nodes``), new every epoch; the batch seed drives any sampling inside the batch.

    The permutation comes from a generator seeded with ``(seed, epoch)``, never from the
    global RNG, so every rank derives the same one. For training (``shuffle``) the nodes are
    cut into ``k * world`` batches of near-equal size (at most ``batch_size``) and rank ``r``
    takes batches ``r, r + world, ...``: every rank gets exactly ``k`` batches and every node
    is used once per epoch, so no rank waits at a last batch the others do not have. For
    evaluation (``shuffle=False``) the consecutive ids are cut into ``ceil(N / batch_size)``
    batches whatever the number of ranks (ranks may differ by one batch; a rank left without one gets an
    empty batch, so it still runs the evaluation loop), so metrics summed over ranks equal a single-process
    evaluation. ``start`` (reset after each pass) skips this
    rank's first batches of the epoch: :class:`PartitionLoader` sets it to resume part-way.
    """

    def __init__(self, num_nodes: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0, nodes: Optional[Tensor] = None) -> None:
        super().__init__()
        self.nodes = nodes
        num_nodes = nodes.numel() if nodes is not None else num_nodes
        if batch_size <= 0 or (shuffle and batch_size > num_nodes):
            raise ValueError(f"batch_size must be in [1, {num_nodes}] (the number of nodes), got {batch_size}")
        if not shuffle:  # evaluation over a set of nodes smaller than a batch (or empty): one batch, or none
            batch_size = max(1, min(batch_size, num_nodes))
        self.num_replicas, self.rank = num_replicas, rank
        self.num_nodes, self.batch_size, self.seed, self.shuffle = num_nodes, batch_size, seed, shuffle
        self.epoch, self.start = 0, 0
        self.total_batches = -(-num_nodes // batch_size)  # ceil
        if shuffle:
            self.total_batches = -(-self.total_batches // self.num_replicas) * self.num_replicas
            if self.total_batches > num_nodes:
                raise ValueError(f"{num_nodes} nodes cannot fill {self.total_batches // self.num_replicas} batches "
                                 f"on each of {self.num_replicas} ranks: use fewer devices or a larger graph")

    def _epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch

    def permutation(self) -> Tensor:
        """The epoch's order of the nodes (training); evaluation batches need none (:meth:`bounds`). int32 below
        2**31 nodes (the same permutation as int64, half the memory: 0.44 GB per rank at papers100M)."""
        dtype = torch.int32 if self.num_nodes < 2**31 else torch.int64
        order = torch.randperm(self.num_nodes, generator=torch.Generator().manual_seed(self._epoch_seed()), dtype=dtype)
        return self.nodes[order] if self.nodes is not None else order

    def bounds(self, index: int) -> Tuple[int, int]:
        """Positions ``[start, stop)`` of batch ``index`` in the node order: ``total_batches`` near-equal parts
        (the larger first, as ``torch.tensor_split`` cuts)."""
        size, larger = divmod(self.num_nodes, self.total_batches)
        start = index * size + min(index, larger)
        return start, start + size + (index < larger)

    def _indices(self) -> range:
        return range(self.rank, self.total_batches, self.num_replicas)

    def __iter__(self) -> Iterator[Tuple[Tensor, int]]:
        indices = self._indices()[self.start:]
        self.start = 0
        if len(self._indices()) == 0:
            # Fewer evaluation batches than ranks: this rank gets one empty batch, so that it runs the
            # evaluation loop (and its collectives: metric sums, the exact pass) with the others.
            yield torch.zeros(0, dtype=torch.long), 0
            return
        # Evaluation batches are consecutive positions of `nodes` (or ids): built one at a time, nothing of
        # size N. Every request is a tensor of its own (`clone`): a view would send its whole base tensor to a
        # DataLoader worker.
        order = self.permutation() if self.shuffle else self.nodes
        for index in indices:
            start, stop = self.bounds(index)
            nodes = order[start:stop].clone() if order is not None else torch.arange(start, stop)
            yield nodes, self._epoch_seed() * 65_537 + index

    def __len__(self) -> int:
        return max(len(self._indices()), 1)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose permutation the next pass draws (Lightning calls it at every epoch start)."""
        self.epoch = epoch


class PartitionLoader:
    """The batches of a :class:`PartitionSampler`, built by a ``DataLoader`` (workers, pinned memory), with
    the loader owning its position, as torchtitan's stateful loaders do.

    It counts the batches it has handed to the training loop in the current epoch; :meth:`state_dict`
    (``epoch``, ``position``, ``world_size``), saved by Lightning in every checkpoint because this object
    has ``state_dict`` / ``load_state_dict``, says where the next batch comes from, and after
    :meth:`load_state_dict` the next pass over that epoch skips the batches already trained on. A mid-epoch
    position is refused under another number of ranks (the epoch's batches differ). DataLoader workers draw
    requests ahead of the training loop, so the position is counted here, not in the sampler.

    Relies on a Lightning behaviour no public API promises: its training loop does not take a batch ahead of
    the step from an iterable with a length (``_PrefetchDataFetcher`` prefetches only to find the last batch of
    one without), so when a checkpoint is written after step ``k`` this loader has handed out exactly ``k``
    batches. ``tests/test_contracts.py::test_lightning_takes_no_batch_ahead_of_the_step`` fails if that changes.

    Not a ``DataLoader`` itself: Lightning then leaves it as it is (it replaces the samplers of
    ``DataLoader`` objects only), and calls ``sampler.set_epoch`` every epoch.
    """

    def __init__(self, dataset: Dataset, sampler: PartitionSampler, num_workers: int = 0, pin_memory: bool = False,
                 seed: int = 0) -> None:
        self.sampler = sampler
        self.batch_sampler = None  # as a DataLoader with batch_size=None: Lightning looks for both
        self.loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers,
                                 pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                 generator=loader_generator(seed))
        self._epoch, self._position = 0, 0
        self._resume: Optional[Tuple[int, int]] = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Data]:
        # A generator: nothing runs until the loop asks for the first batch, after Lightning's set_epoch.
        epoch, start = self.sampler.epoch, 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                start = self._resume[1]
            self._resume = None
        self.sampler.start = start
        self._epoch, self._position = epoch, start
        for batch in self.loader:
            self._position += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        epoch, position = self._epoch, self._position
        if position >= len(self):  # the epoch is done: the next batch is the next epoch's first
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "world_size": self.sampler.num_replicas}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["position"] > 0 and state["world_size"] != self.sampler.num_replicas:
            raise ValueError(f"the checkpoint was written mid-epoch by {state['world_size']} ranks and this run has "
                             f"{self.sampler.num_replicas}: the epoch's batches differ between the two, so it cannot "
                             f"continue exactly. Resume with {state['world_size']} devices, or from an end-of-epoch "
                             f"checkpoint.")
        self._resume = (int(state["epoch"]), int(state["position"]))
        self._epoch, self._position = self._resume
        self.sampler.set_epoch(int(state["epoch"]))


class RandomPartitionDataModule(ClassificationTargets, GraphDataModule):
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

    In exact evaluation, validation reads the final states of the labelled nodes only (those of the three
    splits, whose metrics it logs) and test those of the test split; ``predict`` writes every node's row, or
    with ``predict_nodes`` only the rows of ``'train'``, ``'val'``, ``'test'`` or ``'labelled'`` nodes or of
    the node ids in a file (``.npy`` of integers, or text with one id per line), in the file's order
    (:attr:`prediction_nodes`; ``callbacks.PredictionWriter`` then also writes ``node_ids.npy``).

    The store's full check (every array read: :func:`datamodules.store.validate_store`) runs when it is
    written or first opened and is recorded in its ``meta.json`` with the files' sizes and modification times;
    later opens (every rank, every run) check the metadata only. ``store_check='full'`` runs the full check
    at every start.
    """

    def __init__(self, store: str, batch_size: int = 10_000, eval_batch_size: Optional[int] = None, seed: int = 0,
                 num_workers: int = 2, fanout: int = 0, evaluation: Optional[Literal["exact", "partition"]] = None,
                 scratch_dir: Optional[str] = None, exact_budget_flops: float = 1e12,
                 predict_nodes: Optional[str] = None, store_check: Literal["once", "full"] = "once") -> None:
        super().__init__()
        if store_check not in ("once", "full"):
            raise ValueError(f"store_check must be 'once' (the full check when the store was written or first "
                             f"opened, recorded in its meta.json) or 'full' (every time), got {store_check!r}")
        self.store_check = store_check
        if fanout < 0:
            raise ValueError(f"fanout must be >= 0 (0: random partition), got {fanout}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: batches built in this process), got {num_workers}")
        if not exact_budget_flops > 0:
            raise ValueError(f"exact_budget_flops must be > 0, got {exact_budget_flops}")
        if evaluation not in (None, "exact", "partition"):
            raise ValueError(f"unknown evaluation {evaluation!r}: choose 'exact' or 'partition' (or leave it unset: "
                             f"exact wherever the kernel allows it)")
        self.path = Path(store)
        self.batch_size, self.seed, self.num_workers, self.fanout = batch_size, seed, num_workers, fanout
        self.eval_batch_size = eval_batch_size or batch_size
        self.evaluation, self.exact_budget_flops = evaluation, exact_budget_flops
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else None
        if predict_nodes in (None, "all"):
            predict_nodes = None
        elif predict_nodes not in NODE_SETS and not Path(predict_nodes).is_file():
            raise ValueError(f"predict_nodes {predict_nodes!r} is neither 'all', {', '.join(map(repr, NODE_SETS))} nor "
                             f"an existing file of node ids (.npy of integers, or text with one id per line)")
        self.predict_nodes = predict_nodes
        self._store: Optional[GraphStore] = None
        self._plan: Optional[ExactEvaluationPlan] = None
        self._node_sets: Dict[str, Tensor] = {}

    def evaluation_plan(self, encoder) -> Optional[ExactEvaluationPlan]:
        """Exact evaluation for ``encoder`` (a ``DIFFormer``) unless ``evaluation='partition'`` or the kernel
        is DIFFormer-a's without a request and a budget that allows it; says which, and why, on rank 0.
        Raises a ``ValueError`` when several machines would share no scratch folder."""
        num_nodes, kernel = self.store.num_nodes, encoder.kernel
        exact = self.evaluation != "partition"
        reason = "evaluation='partition'" if not exact else "every node's full-graph output"
        if exact and kernel.quadratic_cost:
            flops = encoder.exact_evaluation_flops(num_nodes)
            title = kernel.title or kernel.qualified_name()
            if self.evaluation is None:
                exact = False
                reason = (f"{title}'s exact pass costs O(N^2), about {flops:.2e} FLOPs here: pass "
                          f"evaluation='exact' (and exact_budget_flops >= that) to evaluate every node exactly")
            elif flops > self.exact_budget_flops:
                exact = False
                reason = (f"{title}'s exact pass would cost about {flops:.2e} FLOPs, above exact_budget_flops="
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
            self._store = GraphStore.open(self.path, validate=self.store_check)
            for name, size in (("batch_size", self.batch_size), ("eval_batch_size", self.eval_batch_size)):
                if size <= 0 or size > self._store.num_nodes:
                    raise ValueError(f"{name} must be in [1, {self._store.num_nodes}] (the number of nodes), got {size}")
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
        store = self.store  # opens and validates before any training work
        limit = feature_limit(self.trainer.precision) if self.trainer is not None else FEATURE_LIMIT
        if limit < FEATURE_LIMIT:  # a float16 run: its smaller range
            check_feature_range(store, limit)

    def describe(self) -> Dict[str, object]:
        """What a checkpoint records about this data, to refuse resuming on other data."""
        store = self.store
        return {"dataset": type(self).__name__, "num_nodes": store.num_nodes, "num_edges": store.num_edges,
                "num_features": store.num_features, "num_classes": store.num_classes,
                "batch_size": self.batch_size, "seed": self.seed, "fanout": self.fanout}

    def probe_batch(self, num_nodes: int, seed: int = 0) -> Data:
        """A fixed batch of ``num_nodes`` random nodes with their induced subgraph."""
        num_nodes = min(num_nodes, self.store.num_nodes)
        nodes = torch.randperm(self.store.num_nodes, generator=torch.Generator().manual_seed(seed))[:num_nodes]
        return BatchBuilder(self.path)[(nodes, seed)]

    def node_set(self, name: str) -> Tensor:
        """The sorted ids of the nodes of a split (``'train'``, ``'val'``, ``'test'``) or of all three
        (``'labelled'``); read once from the store's index arrays (O(labelled nodes), nothing of size N)."""
        if name not in self._node_sets:
            store = self.store
            parts = [getattr(store, f"{split}_idx") for split in SPLITS] if name == "labelled" \
                else [getattr(store, f"{name}_idx")]
            self._node_sets[name] = torch.sort(torch.cat([part.long() for part in parts])).values
        return self._node_sets[name]

    @property
    def prediction_nodes(self) -> Optional[Tensor]:
        """The node ids ``predict`` writes rows for, in that order (``predict_nodes``), or ``None``: every node,
        row ``i`` for node ``i``. A file's ids are checked: integers in ``[0, N)``, none twice."""
        if self.predict_nodes is None:
            return None
        if self.predict_nodes in NODE_SETS:
            return self.node_set(self.predict_nodes)
        if "file" not in self._node_sets:
            self._node_sets["file"] = read_node_ids(Path(self.predict_nodes), self.store.num_nodes)
        return self._node_sets["file"]

    def _evaluation_nodes(self, split: str) -> Optional[Tensor]:
        """The nodes an evaluation loop visits: in exact evaluation only those it reads (``'labelled'``,
        ``'test'``, or the prediction's), by partition all of them (each batch is every node's context)."""
        if self._plan is None:
            return None
        if split == "predict":
            nodes = self.prediction_nodes
            return None if nodes is None else torch.sort(nodes).values
        return self.node_set(split)

    def _loader(self, batch_size: int, shuffle: bool, seeds: Optional[Tensor] = None) -> PartitionLoader:
        # This process's rank and the world size come from the Trainer (one process without one).
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = PartitionSampler(self.store.num_nodes, batch_size, self.seed, shuffle, world, rank, nodes=seeds)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        rows_only = not shuffle and self._plan is not None
        # Exact-evaluation batches are a few index lookups each: built in this process. Forking workers
        # then would also make every page of this process's heap copy-on-write while the exact pass
        # rewrites it (measured: 1M nodes, 8 s of page faults added to a 5 s pass).
        workers = 0 if rows_only else self.num_workers
        return PartitionLoader(BatchBuilder(self.path, self.fanout, rows_only), sampler, workers, on_gpu, self.seed)

    def train_dataloader(self) -> PartitionLoader:
        if self.fanout == 0:
            return self._loader(self.batch_size, shuffle=True)
        seeds = self.store.train_idx
        return self._loader(min(self.batch_size, seeds.numel()), shuffle=True, seeds=seeds)

    def val_dataloader(self) -> PartitionLoader:
        return self._loader(self.eval_batch_size, shuffle=False, seeds=self._evaluation_nodes("labelled"))

    def test_dataloader(self) -> PartitionLoader:
        return self._loader(self.eval_batch_size, shuffle=False, seeds=self._evaluation_nodes("test"))

    def predict_dataloader(self) -> PartitionLoader:
        return self._loader(self.eval_batch_size, shuffle=False, seeds=self._evaluation_nodes("predict"))


# The node sets predict_nodes names (besides 'all' and a file of ids).
NODE_SETS = (*SPLITS, "labelled")


def read_node_ids(path: Path, num_nodes: int) -> Tensor:
    """Node ids ``[K]`` int64 from ``path`` (``.npy`` of integers, or text with one id per line), in the file's
    order. Raises a ``ValueError`` naming the file and the problem: not integers, not 1-D, empty, an id outside
    ``[0, num_nodes)``, an id twice."""
    try:
        with warnings.catch_warnings():  # an empty file: refused below by name
            warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
            ids = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)
    except ValueError as error:
        raise ValueError(f"predict_nodes {path}: not a file of integer node ids ({error})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"predict_nodes {path} holds a {ids.dtype} array of shape {list(ids.shape)}: give a 1-D array "
                         f"of integer node ids")
    if ids.size == 0:
        raise ValueError(f"predict_nodes {path} holds no node id")
    ids = torch.from_numpy(ids.astype(np.int64))
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_nodes:
        bad = low if low < 0 else high
        raise ValueError(f"predict_nodes {path} holds node id {bad}, but the graph's ids are 0 .. {num_nodes - 1}")
    ordered = torch.sort(ids).values
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.numel():
        raise ValueError(f"predict_nodes {path} holds node id {int(repeated[0])} more than once "
                         f"({repeated.numel()} repeats in all): list each node once")
    return ids
