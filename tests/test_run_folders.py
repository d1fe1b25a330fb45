"""One run, one folder (train.py): a rerun with other settings never shares the first run's folder, and
``test`` evaluates the selected run's best-validation weights by default."""
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, logged_epochs, scaled_timeout

CONFIG = str(ROOT / "configs" / "synthetic.yaml")
QUIET = ["--trainer.enable_progress_bar", "false"]


def train_py(cwd, *args):
    """``python train.py ARGS`` from ``cwd`` (runs go to ``cwd/runs``, as from a clone)."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=scaled_timeout(30))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_fits_of_one_preset_get_two_folders_and_test_evaluates_the_selected_best(tmp_path):
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "12", *QUIET)
    first = tmp_path / "runs" / "synthetic"
    first_last = digest(first / "checkpoints" / "last.ckpt")
    other = ["--model.encoder.init_args.num_layers", "1", "--model.lr", "0.02"]  # peaks near epoch 23 of 40
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "40", *other, *QUIET)
    second = tmp_path / "runs" / "synthetic-2"

    # the second run wrote nothing into the first one's folder
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert digest(first / "checkpoints" / "last.ckpt") == first_last
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    logged = logged_epochs(second)
    last_epoch = max(logged)
    best_val = logged[last_epoch]["val/best"]
    best_epoch = min(epoch for epoch, row in logged.items() if row.get("val/acc") == best_val)
    test_at_best_val = logged[last_epoch]["test@best_val"]

    output = train_py(tmp_path, "test", "--config", CONFIG, *other, "--trainer.logger", "false", *QUIET)
    assert f"evaluating {Path('runs', 'synthetic-2', 'checkpoints', 'best.ckpt')} (epoch {best_epoch}," in output, output[-2000:]
    assert best_epoch < last_epoch  # the best is not the last state: test did not evaluate last.ckpt
    reported = float(re.search(r"test/acc\s+│?\s*([0-9.]+)", output).group(1))
    assert reported == pytest.approx(test_at_best_val, abs=1e-6)

    # the first run's settings select the first run
    output = train_py(tmp_path, "test", "--config", CONFIG, "--trainer.logger", "false", *QUIET)
    assert f"evaluating {Path('runs', 'synthetic', 'checkpoints', 'best.ckpt')}" in output
    assert float(re.search(r"test/acc\s+│?\s*([0-9.]+)", output).group(1)) == pytest.approx(
        logged_epochs(first)[max(logged_epochs(first))]["test@best_val"], abs=1e-6)


@pytest.mark.slow
def test_a_resumed_fit_continues_its_own_folder(tmp_path):
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "3", *QUIET)
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "5", "--ckpt_path", "last", *QUIET)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["synthetic"]
    assert max(logged_epochs(tmp_path / "runs" / "synthetic")) == 4


MY_DATA = '''
import torch
from torch_geometric.data import Data

from datamodules import NodeDataModule


class MyData(NodeDataModule):
    """Two classes told apart by the first feature, on a ring."""

    def load(self):
        generator = torch.Generator().manual_seed(0)
        y = torch.arange(200) % 2
        x = torch.randn(200, 8, generator=generator)
        x[:, 0] += 3 * y
        ring = torch.arange(200)
        edge_index = torch.stack([ring, (ring + 1) % 200])
        masks = [torch.zeros(200, dtype=torch.bool) for _ in range(3)]
        for mask, part in zip(masks, (slice(0, 100), slice(100, 150), slice(150, 200))):
            mask[part] = True
        return Data(x=x, y=y, edge_index=edge_index, train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])
'''


@pytest.mark.slow
def test_a_data_module_of_ones_own_from_the_readme_recipe(tmp_path):
    """README: with my_data.py in the folder you run from, `--data my_data.MyData` is all it takes."""
    (tmp_path / "my_data.py").write_text(MY_DATA)
    output = train_py(tmp_path, "fit", "--config", CONFIG, "--data", "my_data.MyData", "--trainer.max_epochs", "30",
                      *QUIET)
    logged = logged_epochs(tmp_path / "runs" / "synthetic")
    # chance 0.5; the Bayes rate of two unit Gaussians 3 apart is Phi(1.5) = 0.93, over only 50 test nodes
    assert logged[max(logged)]["test@best_val"] > 0.8, output[-2000:]


@pytest.mark.slow
def test_a_class_that_does_not_import_is_reported_in_a_few_lines(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", CONFIG, "--data",
                             "my_dta.MyData"], cwd=tmp_path, capture_output=True, text=True, timeout=scaled_timeout(20))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 6 and "my_dta" in lines[0] and "PYTHONPATH" in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_class_whose_own_import_fails_names_the_missing_package(tmp_path):
    (tmp_path / "my_data.py").write_text("import a_package_nobody_installed\n" + MY_DATA)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", CONFIG, "--data",
                             "my_data.MyData"], cwd=tmp_path, capture_output=True, text=True, timeout=scaled_timeout(20))
    assert result.returncode == 2
    assert "my_data was found but imports 'a_package_nobody_installed'" in result.stderr, result.stderr
    assert "PYTHONPATH" not in result.stderr  # the module itself was found: that advice would mislead


@pytest.mark.slow
def test_a_bare_unknown_class_name_asks_for_its_import_path(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", CONFIG, "--data", "MyData"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=scaled_timeout(20))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == ("train.py: error: --data: MyData is not a class this project knows: give its import path, "
                        "module.Class"), result.stderr
    assert "PlanetoidDataModule" in result.stderr and len(lines) <= 4


def run_py(cwd, *args):
    """``python train.py ARGS`` from ``cwd``, whatever its exit code."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=scaled_timeout(30))


@pytest.mark.slow
def test_evaluating_settings_no_run_has_lists_the_runs_and_what_differs(tmp_path):
    """The newest run of a preset is not evaluated for other settings: its number is not theirs."""
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "2", *QUIET)
    refused = run_py(tmp_path, "test", "--config", CONFIG, "--model.lr", "0.005", *QUIET)
    assert refused.returncode == 2 and "Testing" not in refused.stdout
    assert "train.py: error: test: no run of this preset has these settings" in refused.stderr, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr  # a usage error: the message, as for a bad argument
    assert f"  {Path('runs', 'synthetic')}: model.lr: 0.01 there, 0.005 here" in refused.stderr
    # where the data lives (the root; $DIFFORMER_DATA when it is not given) does not make another run
    output = train_py(tmp_path, "test", "--config", CONFIG, "--data.init_args.root", str(tmp_path / "elsewhere"), *QUIET)
    assert f"evaluating {Path('runs', 'synthetic', 'checkpoints', 'best.ckpt')}" in output


@pytest.mark.slow
def test_resuming_last_says_whether_it_continues_or_starts_afresh_and_why(tmp_path):
    output = train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "2", "--ckpt_path", "last", *QUIET)
    assert f"--ckpt_path last: starting a new run in {Path('runs', 'synthetic')}: no run of this preset exists" in output
    output = train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "3", "--ckpt_path", "last", *QUIET)
    assert f"--ckpt_path last: continuing {Path('runs', 'synthetic')}, the newest run of this preset" in output
    output = train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "2", "--ckpt_path", "last",
                      "--model.encoder.init_args.hidden_channels", "32", *QUIET)
    assert (f"--ckpt_path last: starting a new run in {Path('runs', 'synthetic-2')}: no run of this preset has "
            f"these settings:\n  {Path('runs', 'synthetic')}: model.encoder.hidden_channels: 64 there, 32 here") in output


@pytest.mark.slow
def test_simultaneous_starts_each_get_a_folder_of_their_own(tmp_path):
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; import train; "
              f"print(train.run_folder(Path('runs/synthetic'), 'seed_everything: 0\\n', 'fit', None))")
    for trial in range(5):  # 5 trials of 12 starts at once
        cwd = tmp_path / str(trial)
        cwd.mkdir()
        starts = [subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for _ in range(12)]
        outputs = [start.communicate(timeout=scaled_timeout(60)) for start in starts]
        assert all(start.returncode == 0 for start in starts), [err[-1500:] for _, err in outputs]
        folders = [out.strip() for out, _ in outputs]
        assert len(set(folders)) == 12
        assert all((cwd / folder / "run.yaml").read_text() == "seed_everything: 0\n" for folder in folders)


@pytest.mark.slow
def test_a_failed_start_leaves_no_folder_and_evaluation_logs_apart_from_the_fits(tmp_path):
    for bad in (["--data.init_args.num_nodes", "5"],  # refused by the data module
                ["--trainer.check_val_every_n_epoch", "0"]):  # refused before the data
        failed = run_py(tmp_path, "fit", "--config", CONFIG, *bad, *QUIET)
        assert failed.returncode != 0
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), failed.stderr[-1500:]
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "2", *QUIET)
    run = tmp_path / "runs" / "synthetic"  # not synthetic-3: the failed starts left no folder behind
    train_py(tmp_path, "test", "--config", CONFIG, *QUIET)
    failed = run_py(tmp_path, "test", "--config", CONFIG, "--data.init_args.num_nodes", "5", *QUIET)
    assert failed.returncode != 0
    assert sorted(p.relative_to(run).as_posix() for p in run.glob("**/metrics.csv")) == [
        "eval/test/version_0/metrics.csv", "logs/version_0/metrics.csv"]  # the failed test left no log folder
    assert sorted(logged_epochs(run)) == [0, 1] and "test/acc" in (run / "eval" / "test" / "version_0" /
                                                                  "metrics.csv").read_text()


@pytest.mark.slow
def test_resuming_with_a_lower_learning_rate_continues_the_run_and_updates_its_settings(tmp_path):
    """The resume rule (a lower lr after a divergence) also with --ckpt_path last: the run continues, says the
    change, and its run.yaml follows, so evaluating with the new settings finds it and no lr line is printed."""
    train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "2", *QUIET)
    output = train_py(tmp_path, "fit", "--config", CONFIG, "--trainer.max_epochs", "3", "--model.lr", "0.005",
                      "--ckpt_path", "last", *QUIET)
    run = tmp_path / "runs" / "synthetic"
    assert f"--ckpt_path last: continuing {Path('runs', 'synthetic')}, the newest run of this preset with these " \
           f"settings (but for its lr or weight decay)" in output
    assert "continuing with model.lr 0.01 -> 0.005" in output and "Restored all states" in output
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["synthetic"] and max(logged_epochs(run)) == 2
    assert "lr: 0.005" in (run / "run.yaml").read_text()
    output = train_py(tmp_path, "test", "--config", CONFIG, "--model.lr", "0.005", *QUIET)
    assert "evaluating" in output and "changes from" not in output


def test_differences_between_runs_name_a_changed_class_once():
    from train import settings_differences
    adamw = "optimizer:\n  class_path: torch.optim.AdamW\n  init_args: {lr: 0.01, amsgrad: false}\nmodel: {lr: 0.01}\n"
    assert settings_differences(adamw, "model: {lr: 0.01}\n") == ["optimizer.class_path: 'torch.optim.AdamW' there, "
                                                                   "'<not set>' here"]
    assert settings_differences(adamw, adamw.replace("lr: 0.01, amsgrad", "lr: 0.02, amsgrad")) == [
        "optimizer.lr: 0.01 there, 0.02 here"]


def test_channels_set_by_hand_are_refused_as_they_come_from_the_data(tmp_path):
    result = run_py(tmp_path, "fit", "--config", CONFIG, "--model.encoder.init_args.in_channels", "32", *QUIET)
    assert result.returncode != 0
    assert ("--model.encoder.init_args.in_channels is set from the data (its num_features); remove it"
            in result.stderr.strip().splitlines()[-1]), result.stderr[-1500:]
