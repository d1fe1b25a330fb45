"""Random node partition against seed + sampled-neighbour batches, on the same store and model.

    python benchmarks/locality.py --store runs/stores/cora --batch-size 500 --seeds 64 --fanout 10 \
        --epochs 100 --out results/locality_cora.json

For each mode: the fraction of the loss nodes' incoming edges that lie inside their batch
(averaged over one epoch), and the test accuracy at the best validation epoch measured by
exact full-graph inference (``layerwise_inference`` after the epoch, outside the loop), so both modes are
judged the same way, beside the one the training loop itself reports (``test@best_val``, with the data
module's ``--evaluation``: ``exact`` by default, ``partition`` for the batched evaluation).
``--store cora:ROOT`` builds a store from the Planetoid Cora files under ROOT (reference split).
"""
import argparse
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import GraphStore, PlanetoidDataModule, RandomPartitionDataModule  # noqa: E402
from datamodules.store import write_store_from_data  # noqa: E402
from difformer_lightning import DIFFormer, NodeClassifier  # noqa: E402
from difformer_lightning.streaming import layerwise_inference  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


def kept_fraction(module: RandomPartitionDataModule, store: GraphStore) -> float:
    """Share of the training nodes' incoming edges that fall inside their batch, over one epoch."""
    kept = total = 0
    for batch in module.train_dataloader():
        loss_nodes = batch.train_mask.nonzero().flatten()
        kept += int(torch.isin(batch.edge_index[1], loss_nodes).sum())
        ids = batch.n_id[loss_nodes]
        total += int((store.rowptr[ids + 1] - store.rowptr[ids]).sum())
    return kept / max(total, 1)


class FullGraphAccuracy(pl.Callback):
    """Test accuracy at the best validation epoch, by exact full-graph inference every ``every`` epochs."""

    def __init__(self, store: GraphStore, every: int) -> None:
        self.store, self.every = store, every
        self.best_val, self.test_at_best = -1.0, float("nan")

    def on_train_epoch_end(self, trainer, module) -> None:
        if (trainer.current_epoch + 1) % self.every:
            return
        with tempfile.TemporaryDirectory() as scratch:
            predicted = layerwise_inference(module.encoder, self.store, workdir=scratch).argmax(dim=1)
        module.train()
        y = self.store.y.long()
        val = (predicted[self.store.val_idx] == y[self.store.val_idx]).float().mean().item()
        if val > self.best_val:
            self.best_val = val
            self.test_at_best = (predicted[self.store.test_idx] == y[self.store.test_idx]).float().mean().item()


def run(store_path: Path, mode: str, args) -> dict:
    store = GraphStore.open(store_path)
    fanout, batch = (0, args.batch_size) if mode == "random_partition" else (args.fanout, args.seeds)
    module = RandomPartitionDataModule(str(store_path), batch_size=batch, eval_batch_size=args.batch_size,
                                       num_workers=args.workers, fanout=fanout, seed=args.seed,
                                       evaluation=args.evaluation)
    module.setup("fit")
    fraction = kept_fraction(module, store)
    pl.seed_everything(args.seed)
    model = NodeClassifier(DIFFormer(store.num_features, args.hidden, store.num_classes, num_layers=args.layers,
                                     use_weight=True, dropout=args.dropout), lr=args.lr, weight_decay=args.weight_decay)
    exact = FullGraphAccuracy(store, args.eval_every)
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=args.eval_every,
                         callbacks=[exact])
    trainer.fit(model, datamodule=module)
    return {"mode": mode, "batch": batch, "fanout": fanout, "loss_node_edges_kept": round(fraction, 4),
            "full_graph_test_at_best_val": round(100 * exact.test_at_best, 2),
            "own_eval_test_at_best_val": round(100 * float(model.test_at_best_val), 2), "evaluation": args.evaluation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a store directory, or cora:ROOT")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=100_000, help="random partition batch (and eval batch)")
    parser.add_argument("--seeds", type=int, default=10_000, help="seeds per batch in neighbour mode")
    parser.add_argument("--fanout", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluation", choices=["exact", "partition"], default="exact",
                        help="how the training loop evaluates (its own test@best_val)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        store_path = Path(args.store)
        if args.store.startswith("cora:"):
            data = PlanetoidDataModule("Cora", root=args.store[len("cora:"):]).data
            store_path = write_store_from_data(data, Path(scratch) / "cora")
        results = [run(store_path, mode, args) for mode in ("random_partition", "seed_neighbors")]
        nodes = GraphStore.open(store_path).num_nodes
    write_json_atomic(args.out, {"store": args.store, "num_nodes": nodes, "epochs": args.epochs, "results": results})
    print(f"| mode | batch | fanout | loss-node in-edges kept | test@best val, full-graph inference | "
          f"the loop's own ({args.evaluation}) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['batch']} | {r['fanout']} | {r['loss_node_edges_kept']:.3f} "
              f"| {r['full_graph_test_at_best_val']:.2f} | {r['own_eval_test_at_best_val']:.2f} |")


if __name__ == "__main__":
    main()
