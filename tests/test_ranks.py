"""The loop under any number of ranks: train.py with 1, 2 and 3 CPU processes (DDP, in subprocesses) over
awkward sizes (N not a multiple of anything, one evaluation batch in all, a single training node) finishes
within its timeout, and what it logs equals a single-process recomputation from the saved weights."""
import os
import subprocess
import sys

import pytest
import torch
from torch_geometric.data import Data

from conftest import ROOT, logged_epochs, scaled_timeout
from datamodules import GraphStore
from datamodules.partition import BatchBuilder, PartitionSampler
from datamodules.store import write_store_from_data
from difformer_lightning import NodeClassifier

CASES = [
    # ranks, nodes, batch, eval batch (None: as batch), training nodes (None: a third of them), evaluation
    dict(ranks=2, nodes=203, batch=100, eval=None, train=[7], evaluation="exact"),  # one rank sees no training node
    dict(ranks=2, nodes=203, batch=60, eval=203, train=None, evaluation="partition"),  # one evaluation batch in all
    dict(ranks=3, nodes=101, batch=10, eval=101, train=None, evaluation="exact"),
    dict(ranks=3, nodes=101, batch=20, eval=40, train=[3], evaluation="partition"),
    dict(ranks=2, nodes=203, batch=100, eval=30, train=None, evaluation="partition"),
    dict(ranks=1, nodes=50, batch=50, eval=None, train=[0], evaluation="partition"),
]


def graph(num_nodes: int, train) -> Data:
    generator = torch.Generator().manual_seed(num_nodes)
    y = torch.randint(3, (num_nodes,), generator=generator)
    x = torch.randn(num_nodes, 5, generator=generator) + torch.nn.functional.one_hot(y, 5).float()
    edge_index = torch.randint(num_nodes, (2, 6 * num_nodes), generator=generator)
    train_mask = torch.zeros(num_nodes, dtype=torch.bool)
    if train is None:
        train_mask[torch.arange(0, num_nodes, 3)] = True
    else:
        train_mask[train] = True
    rest = (~train_mask).nonzero().flatten()
    val_mask, test_mask = torch.zeros_like(train_mask), torch.zeros_like(train_mask)
    val_mask[rest[::2]], test_mask[rest[1::2]] = True, True
    return Data(x=x, y=y, edge_index=edge_index, train_mask=train_mask, val_mask=val_mask, test_mask=test_mask)


def recompute(checkpoint, store: GraphStore, evaluation: str, eval_batch: int) -> dict:
    """Each split's accuracy, by hand in one process: the whole graph's forward, or the evaluation batches."""
    model = NodeClassifier.load_from_checkpoint(checkpoint).eval()
    correct = {split: 0 for split in ("train", "val", "test")}
    total = dict(correct)
    if evaluation == "exact":
        source, target, _ = store.in_edges(0, store.num_nodes)
        batches = [Data(x=store.x.float(), edge_index=torch.stack([source, target]), y=store.y.long(),
                        **{f"{s}_mask": store.split == code for s, code in (("train", 1), ("val", 2), ("test", 3))})]
    else:
        builder = BatchBuilder(store.path)
        batches = [builder[request] for request in PartitionSampler(store.num_nodes, eval_batch, shuffle=False)]
    with torch.no_grad():
        for batch in batches:
            hits = model.encoder(batch.x, batch.edge_index).argmax(dim=1) == batch.y
            for split in correct:
                mask = batch[f"{split}_mask"]
                correct[split] += int(hits[mask].sum())
                total[split] += int(mask.sum())
    return {split: correct[split] / total[split] for split in correct}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.slow
def test_every_rank_count_and_size_finishes_and_logs_the_single_process_numbers(tmp_path, case):
    store = GraphStore.open(write_store_from_data(graph(case["nodes"], case["train"]), tmp_path / "store"))
    eval_batch = case["eval"] or case["batch"]
    config = tmp_path / "config.yaml"
    config.write_text("\n".join([
        "seed_everything: 0",
        "model: {encoder: {hidden_channels: 8, num_layers: 2, kernel: simple, dropout: 0.1}, lr: 0.02}",
        "data: {class_path: datamodules.RandomPartitionDataModule,",
        f"       init_args: {{store: {store.path}, batch_size: {case['batch']}, eval_batch_size: {eval_batch}, "
        f"num_workers: 0, evaluation: {case['evaluation']}}}}}",
        "trainer: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false, log_every_n_steps: 1,",
        "          accelerator: cpu, devices: " + str(case["ranks"])
        + (", strategy: ddp}" if case["ranks"] > 1 else "}")]) + "\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config),
                           "--trainer.default_root_dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=scaled_timeout(15 * case["ranks"]))  # a hang ends here, as a failure
    assert done.returncode == 0, done.stderr[-3000:]
    logged = logged_epochs(run_dir)
    last = logged[max(logged)]
    expected = recompute(run_dir / "checkpoints" / "last.ckpt", store, case["evaluation"], eval_batch)
    for split, value in expected.items():
        assert last[f"{split}/acc"] == pytest.approx(value, abs=1e-6), split
    assert last["train/loss"] == last["train/loss"]  # logged on every rank, and a number
