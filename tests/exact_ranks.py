"""Runs the streamed exact forward in WORLD processes (gloo, CPU) and saves the final states.

    python tests/exact_ranks.py STORE OUT_PREFIX WORLD CHUNK KERNEL [KERNEL ...]

For each kernel the model is built from seed 0 in every process (the same weights everywhere); rank 0
saves the states to OUT_PREFIX-KERNEL.npy. Used by tests/test_exact.py to check that any number of ranks gives bitwise the same result.
"""
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules import GraphStore
from difformer_lightning import DIFFormer
from difformer_lightning.streaming import Collectives, Scratch, exact_states


def collectives(rank: int, world: int) -> Collectives:
    def all_reduce(tensor):
        dist.all_reduce(tensor)
        return tensor

    def broadcast(value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    return Collectives(rank, world, all_reduce, dist.barrier, broadcast)


def run(rank: int, world: int, store: str, out: str, chunk: int, kernels: list, init: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    source = GraphStore.open(store)
    scratch = Scratch(collectives=collectives(rank, world))  # one for every kernel: reused or re-laid out
    for kernel in kernels:
        torch.manual_seed(0)
        model = DIFFormer(source.num_features, 8, source.num_classes, num_layers=3, num_heads=2, kernel=kernel).eval()
        states = exact_states(model, source, chunk, scratch)
        if rank == 0:
            np.save(f"{out}-{kernel}.npy", states.rows(slice(0, source.num_nodes)).numpy())
        dist.barrier()
    scratch.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    store, out, world, chunk, kernels = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
    init = tempfile.mktemp(prefix="difformer-init-")
    mp.spawn(run, args=(world, store, out, chunk, kernels, init), nprocs=world)
