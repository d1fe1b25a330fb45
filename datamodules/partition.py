"""Random node partition over a graph store: memory per batch, not per graph.

Every epoch a permutation of the nodes derived from ``(seed, epoch)`` is cut into batches; each
batch carries its nodes' features, labels, split masks and the subgraph they induce. A batch is
built from the store's CSR by gathering only its own nodes' neighbour lists, so one epoch costs
O(E) in total, where the reference scheme scans the whole edge list for every batch.
"""
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch_geometric.data import Data

from .store import SPLIT_CODES, GraphStore, StoreError


def induced_subgraph(rowptr: Tensor, col: Tensor, nodes: Tensor, member: Optional["NodeBitmap"] = None) -> Tensor:
    """Edges among ``nodes`` as positions in ``nodes``: ``[2, E_b]``, messages row 0 -> row 1.

    ``nodes`` must be sorted and unique. Reads only the CSR rows of ``nodes``: cost
    O(sum of their in-degrees) for the gather and the membership test (a bitmap of N bits),
    plus a log(batch) search for the few neighbours that fall inside the batch. Nothing of
    size N is allocated per call, so it works on a memory-mapped CSR of any size.
    """
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
    return torch.stack([torch.searchsorted(nodes, source[inside].long()), target])


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


class BatchBuilder(Dataset):
    """Turns a tensor of node ids into a batch ``Data``; opens the store lazily in each process.

    Only the store's path crosses process boundaries (DataLoader workers, DDP ranks), so
    every process maps the same files instead of receiving a pickled copy.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._store: Optional[GraphStore] = None
        self._member: Optional[NodeBitmap] = None

    @property
    def store(self) -> GraphStore:
        if self._store is None:
            self._store = GraphStore.open(self.path, validate=False)  # validated once, in setup()
            self._member = NodeBitmap(self._store.num_nodes)
        return self._store

    def __getitem__(self, nodes: Tensor) -> Data:
        store = self.store
        # Order inside a batch is free: sorted ids read the memory-mapped rows in file order.
        nodes = torch.sort(nodes.long()).values
        code = store.split[nodes]
        y = store.y[nodes]
        return Data(x=store.x[nodes].float(), y=y.float() if store.multilabel else y.long(),
                    edge_index=induced_subgraph(store.rowptr, store.col, nodes, self._member), n_id=nodes,
                    **{f"{name}_mask": code == value for name, value in SPLIT_CODES.items()})

    def __len__(self) -> int:
        return self.store.num_nodes

    def __getstate__(self) -> dict:
        return {"path": self.path, "_store": None, "_member": None}


class PartitionSampler(DistributedSampler):
    """Yields one tensor of node ids per batch: a partition of all nodes, new every epoch.

    The permutation comes from a generator seeded with ``(seed, epoch)``, never from the
    global RNG, so every rank derives the same one. The nodes are cut into ``k * world``
    batches of near-equal size (at most ``batch_size``) and rank ``r`` takes batches
    ``r, r + world, ...``: every rank gets exactly ``k`` batches and every node is used once
    per epoch, so no rank waits at a last batch the others do not have. It subclasses
    ``DistributedSampler`` so Lightning leaves it in place and calls :meth:`set_epoch`.
    """

    def __init__(self, num_nodes: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if batch_size <= 0 or batch_size > num_nodes:
            raise ValueError(f"batch_size must be in [1, {num_nodes}] (the number of nodes), got {batch_size}")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.num_nodes, self.batch_size, self.seed, self.shuffle = num_nodes, batch_size, seed, shuffle
        self.epoch, self.drop_last = 0, False
        per_rank = -(-num_nodes // batch_size)  # ceil
        self.batches_per_rank = -(-per_rank // self.num_replicas)
        if self.batches_per_rank * self.num_replicas > num_nodes:
            raise ValueError(f"{num_nodes} nodes cannot fill {self.batches_per_rank} batches on each of "
                             f"{self.num_replicas} ranks")

    def permutation(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_nodes)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_nodes, generator=generator)

    def __iter__(self) -> Iterator[Tensor]:
        batches = torch.tensor_split(self.permutation(), self.batches_per_rank * self.num_replicas)
        yield from batches[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self.batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class RandomPartitionDataModule(pl.LightningDataModule):
    """Random node partition training over a graph store (see :mod:`datamodules.store`).

    Training batches are a fresh random partition every epoch; validation, test and
    prediction use a fixed partition (consecutive node ids). Batches are built in
    ``num_workers`` DataLoader processes while the model trains, and copied into pinned
    memory when a GPU is used.
    """

    def __init__(self, store: str, batch_size: int = 10_000, eval_batch_size: Optional[int] = None, seed: int = 0,
                 num_workers: int = 2) -> None:
        super().__init__()
        self.path = Path(store)
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self._store: Optional[GraphStore] = None

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
        return max(self.batch_size, self.eval_batch_size)

    def setup(self, stage: str) -> None:
        self.store  # noqa: B018  opens and validates before any training work

    def _loader(self, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = PartitionSampler(self.store.num_nodes, batch_size, self.seed, shuffle)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(BatchBuilder(self.path), sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          pin_memory=on_gpu, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.eval_batch_size, shuffle=False)
