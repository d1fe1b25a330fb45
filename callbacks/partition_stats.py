"""How much of the graph the training batches keep."""
import lightning.pytorch as pl
import torch


class PartitionStats(pl.Callback):
    """Logs per training epoch ``partition/edges_kept`` (edges inside batches over the in-edges
    their nodes have in the whole graph: 1 for full-batch data, about ``B / N`` for a random
    partition into batches of ``B`` of ``N`` nodes), ``partition/batch_nodes_{mean,min,max}`` and
    ``partition/batch_edges_mean``, over the batches of all ranks.
    """

    def on_train_epoch_start(self, trainer, module) -> None:
        self._nodes, self._edges, self._graph_edges = [], 0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        edges = int(batch.num_edges)
        self._nodes.append(int(batch.num_nodes))
        self._edges += edges
        self._graph_edges += int(batch.get("graph_in_edges", edges))

    def on_train_epoch_end(self, trainer, module) -> None:
        reduce = trainer.strategy.reduce
        count = len(self._nodes)
        totals = {name: float(reduce(torch.tensor(float(value), device=module.device), reduce_op="sum"))
                  for name, value in (("batches", count), ("nodes", sum(self._nodes)), ("edges", self._edges),
                                      ("graph_edges", self._graph_edges))}
        module.log("partition/edges_kept", totals["edges"] / max(totals["graph_edges"], 1.0))
        batches = max(totals["batches"], 1.0)
        module.log("partition/batch_nodes_mean", totals["nodes"] / batches)
        module.log("partition/batch_edges_mean", totals["edges"] / batches)
        module.log("partition/batch_nodes_min", float(min(self._nodes, default=0)), reduce_fx="min", sync_dist=True)
        module.log("partition/batch_nodes_max", float(max(self._nodes, default=0)), reduce_fx="max", sync_dist=True)
