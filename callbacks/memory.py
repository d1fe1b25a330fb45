"""Process memory as the operating system counts it, and CUDA's peak allocation."""
from pathlib import Path

import lightning.pytorch as pl
import torch


def process_memory_mb() -> dict:
    """RSS, PSS (shared pages divided among their users), private memory (pages no other process maps,
    including file pages of memory-mapped arrays only this process has touched) and anonymous memory
    (the process's own heap and tensors, never page cache) of this process, in MB, from
    /proc/self/smaps_rollup (Linux); empty where that file does not exist."""
    rollup = Path("/proc/self/smaps_rollup")
    if not rollup.is_file():
        return {}
    fields = {}
    for line in rollup.read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": fields["Rss"], "pss_mb": fields["Pss"],
            "private_mb": fields["Private_Clean"] + fields["Private_Dirty"], "anonymous_mb": fields["Anonymous"]}


class Memory(pl.Callback):
    """Logs ``memory/rss_mb``, ``memory/pss_mb``, ``memory/private_mb``, ``memory/anonymous_mb`` of each
    rank's main process
    (memory-mapped graph stores show up in RSS but, shared between ranks, not in private memory)
    and ``memory/cuda_max_allocated_mb`` on GPUs, every training epoch."""

    def on_train_epoch_end(self, trainer, module) -> None:
        for key, value in process_memory_mb().items():
            module.log(f"memory/{key}", value, reduce_fx="max", sync_dist=True)
        if torch.cuda.is_available() and module.device.type == "cuda":
            module.log("memory/cuda_max_allocated_mb", torch.cuda.max_memory_allocated(module.device) / 2**20,
                       reduce_fx="max", sync_dist=True)
