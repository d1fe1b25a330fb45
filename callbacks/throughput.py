"""Nodes per second, batches per second, and the share of time the training loop waits for data."""
import time

import lightning.pytorch as pl


class Throughput(pl.Callback):
    """Logs, every training epoch, ``throughput/nodes_per_s``, ``throughput/batches_per_s`` and
    ``throughput/data_wait_fraction``: the time between one step's end and the next step's start
    (the loader producing the batch, plus Lightning's bookkeeping) over the epoch's wall time.
    The progress bar shows the epoch's running ``nodes/s``.
    """

    def on_train_epoch_start(self, trainer, module) -> None:
        self._epoch_start = self._last_end = time.perf_counter()
        self._wait = 0.0
        self._nodes = self._batches = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._wait += time.perf_counter() - self._last_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._last_end = time.perf_counter()
        self._nodes += int(batch.num_nodes)
        self._batches += 1
        running = self._nodes / max(self._last_end - self._epoch_start, 1e-9)
        module.log("nodes/s", running, prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer, module) -> None:
        elapsed = max(self._last_end - self._epoch_start, 1e-9)
        module.log("throughput/nodes_per_s", self._nodes / elapsed, sync_dist=True)
        module.log("throughput/batches_per_s", self._batches / elapsed, sync_dist=True)
        module.log("throughput/data_wait_fraction", self._wait / elapsed, sync_dist=True)
