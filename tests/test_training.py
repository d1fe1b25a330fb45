"""Training through Lightning and the command line, checked against independent computations."""
import csv
import subprocess
import sys
import tempfile

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from conftest import ROOT, scaled_timeout
from datamodules import SyntheticCSBMDataModule
from difformer_lightning import DIFFormer, NodeClassifier


class IndependentAccuracy(pl.Callback):
    """Recomputes every split's accuracy from the model's eval-mode logits, by hand."""

    def __init__(self):
        self.history = []

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        data = trainer.datamodule.data
        with torch.no_grad():
            predicted = module.encoder(data.x, data.edge_index).argmax(dim=1)
        self.history.append({split: (predicted == data.y)[data[f"{split}_mask"]].float().mean().item()
                             for split in ("train", "val", "test")})


@pytest.mark.slow
def test_logged_accuracy_and_test_at_best_val_match_a_hand_computation(tmp_path):
    # Unbalanced classes: a per-class (macro) mean would differ from the fraction of correct nodes.
    data = SyntheticCSBMDataModule(num_nodes=1200, num_classes=4, train_per_class=5, num_val=300, num_test=500, seed=1)
    data.data.y[data.data.y == 3] = 2  # merge two classes: 3 unequal classes remain
    pl.seed_everything(0)
    module = NodeClassifier(DIFFormer(64, 16, 4, num_layers=2, dropout=0.5), lr=0.01)
    recorder = IndependentAccuracy()
    trainer = pl.Trainer(max_epochs=12, logger=CSVLogger(tmp_path), callbacks=[recorder], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/acc")]
    assert len(rows) == len(recorder.history) == 12
    for row, expected in zip(rows, recorder.history):
        for split in ("train", "val", "test"):
            assert float(row[f"{split}/acc"]) == pytest.approx(expected[split], abs=1e-6)
    val = [h["val"] for h in recorder.history]
    best_epoch = val.index(max(val))  # the first epoch with the best validation accuracy
    assert float(module.best_val) == pytest.approx(val[best_epoch])
    assert float(module.test_at_best_val) == pytest.approx(recorder.history[best_epoch]["test"])
    assert float(rows[-1]["test@best_val"]) == pytest.approx(recorder.history[best_epoch]["test"])


def run_cli(*args, timeout=None):
    """train.py run as a user runs it, from the checkout, its run folder in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="run-") as folder:
        return subprocess.run([sys.executable, "train.py", *args, "--trainer.default_root_dir", folder], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout or scaled_timeout(30))


@pytest.mark.slow
def test_default_job_learns_far_above_chance():
    result = run_cli("fit", "--config", "configs/synthetic.yaml", "--trainer.max_epochs", "40",
                     "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                     "--trainer.enable_progress_bar", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() + result.stderr.splitlines() if "test@best_val" in line][-1]
    test_accuracy = float(line.split("test@best_val")[1])
    assert test_accuracy > 0.6, line  # 5 classes: chance is 0.2; features alone give about 0.54


@pytest.mark.parametrize("args, message", [
    (["--model.encoder.kernel", "softmax"], "kernel"),
    (["--data.init_args.name", "Corra"], "Corra"),
])
@pytest.mark.slow
def test_cli_rejects_bad_choices_before_training(args, message):
    config = "configs/cora_s.yaml"
    result = run_cli("fit", "--config", config, *args, timeout=scaled_timeout(20))
    assert result.returncode != 0
    assert message in result.stderr and "Epoch" not in result.stderr + result.stdout


@pytest.mark.slow
def test_cli_size_guard_for_difformer_a_fires_before_training(planetoid_root):
    result = run_cli("fit", "--config", "configs/cora_a.yaml", "--data.init_args.root", str(planetoid_root),
                     "--model.encoder.init_args.sigmoid_block_bytes", "1000", timeout=scaled_timeout(20))
    assert result.returncode != 0
    assert "DIFFormer-a (kernel='sigmoid') needs" in result.stderr
    assert "Epoch 0" not in result.stderr + result.stdout


@pytest.mark.slow
def test_cora_difformer_s_reaches_the_published_range(planetoid_root, tmp_path):
    """One seed of the published Cora recipe (paper: 85.9 +- 0.4; benchmarks/reproduce.py: 5 seeds)."""
    from train import main
    cli = main(["fit", "--config", str(ROOT / "configs" / "cora_s.yaml"), "--data.init_args.root", str(planetoid_root),
                "--seed_everything", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)],
               save_config_callback=None)
    assert float(cli.model.test_at_best_val) >= 0.84


@pytest.mark.slow
def test_checkpoint_round_trip_through_the_cli(tmp_path):
    """fit writes a checkpoint; `test` and load_from_checkpoint rebuild the encoder from it alone."""
    from train import main
    common = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.enable_progress_bar", "false"]
    main(["fit", *common, "--trainer.max_epochs", "8", "--trainer.default_root_dir", str(tmp_path)])
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    tested = main(["test", *common, "--ckpt_path", str(checkpoint), "--trainer.logger", "false",
                   "--trainer.default_root_dir", str(tmp_path)],
                  save_config_callback=None)
    reported = float(tested.trainer.callback_metrics["test/acc"])

    model = NodeClassifier.load_from_checkpoint(checkpoint).eval()  # no arguments: the encoder config is saved
    data = SyntheticCSBMDataModule().data
    with torch.no_grad():
        predicted = model.encoder(data.x, data.edge_index).argmax(dim=1)
    by_hand = (predicted == data.y)[data.test_mask].float().mean().item()
    assert reported == pytest.approx(by_hand, abs=1e-6)
    assert by_hand > 0.3  # eight epochs already beat chance (0.2)


@pytest.mark.slow
def test_multilabel_uses_bce_and_task_averaged_rocauc(tmp_path):
    from sklearn.metrics import roc_auc_score
    from datamodules import NodeDataModule

    generator = torch.Generator().manual_seed(0)
    base = SyntheticCSBMDataModule(num_nodes=800, num_classes=4, train_per_class=50, num_val=200, num_test=300).data
    # three binary tasks that depend on the class
    targets = torch.stack([base.y == 0, base.y <= 1, (base.y % 2 == 1) ^ (torch.rand(800, generator=generator) < 0.1)],
                          dim=1).long()
    data = base.clone()
    data.y = targets
    module = NodeDataModule(data, multilabel=True)
    pl.seed_everything(0)
    model = NodeClassifier(DIFFormer(64, 16, 3, num_layers=2), lr=0.01, task="multilabel", metric="rocauc")
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=module)
    assert model.metric_name == "rocauc" and module.num_classes == 3
    with torch.no_grad():
        scores = model.eval().encoder(data.x, data.edge_index)
    mask = data.val_mask
    expected = sum(roc_auc_score(targets[mask, t], scores[mask, t]) for t in range(3)) / 3
    assert float(trainer.callback_metrics["val/rocauc"]) == pytest.approx(expected, abs=1e-4)
    assert expected > 0.7
