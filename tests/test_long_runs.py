"""DDP, exact resume after SIGKILL, safe checkpoints, bf16: train.py run in subprocesses."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import logged_epochs, scaled_timeout
from datamodules.partition import BatchBuilder, PartitionSampler
from datamodules.synthetic import write_synthetic_store
from difformer_lightning import NodeClassifier
from difformer_lightning.checkpoint import AtomicCheckpointIO, CheckpointError, check_checkpoint_file, check_compatible

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES = 1003  # not a multiple of any batch size used here
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
       "--data.init_args.num_workers", "0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "csbm", NUM_NODES, num_classes=3)


def partition_config(tmp_path: Path, store: Path, batch_size: int, evaluation: str = "exact", **checkpoint) -> Path:
    lines = ["seed_everything: 0",
             "model: {encoder: {hidden_channels: 16, num_layers: 2, kernel: simple, dropout: 0.2}, lr: 0.01}",
             "data: {class_path: datamodules.RandomPartitionDataModule,",
             f"       init_args: {{store: {store}, batch_size: {batch_size}, num_workers: 1, evaluation: {evaluation}}}}}",
             "trainer: {max_epochs: 3, enable_progress_bar: false, enable_model_summary: false}"]
    if checkpoint:
        lines.append("checkpoint: {" + ", ".join(f"{k}: {v}" for k, v in checkpoint.items()) + "}")
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(*args, run_dir: Path, **popen):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    command = [sys.executable, str(ROOT / "train.py"), "fit", *args, "--trainer.default_root_dir", str(run_dir)]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled_timeout(40))


def last_epoch_metrics(run_dir: Path) -> dict:
    """The last epoch's logged values, over all log versions (a resumed run writes a new one)."""
    values = logged_epochs(run_dir)
    return values[max(values)]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_ddp_ranks_share_one_partition_and_metrics_match_one_process(tmp_path, store):
    # evaluation by partition batches: their metrics, summed over ranks, are what this test checks
    config = partition_config(tmp_path, store, batch_size=130, evaluation="partition", every_n_train_steps="null")
    run_dir = tmp_path / "ddp"
    result = train("--config", str(config), *DDP, "--trainer.callbacks+=cli_helpers.BatchRecorder", "--trainer.callbacks.out_dir",
                   str(tmp_path / "batches"), run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "batches" / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == ["0", "1", "2"]
    for epoch in ranks[0]:
        counts = [len(rank[epoch]) for rank in ranks]
        assert counts[0] == counts[1] == 4  # 1003 nodes / 130 -> 8 batches, 4 per rank, none left over
        seen = [node for rank in ranks for batch in rank[epoch] for node in batch]
        assert sorted(seen) == list(range(NUM_NODES))  # disjoint, and together every node once
    assert ranks[0]["0"] != ranks[0]["1"]  # a new permutation every epoch

    # The logged validation accuracy is the global one: recompute it in one process, by hand.
    model = NodeClassifier.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    builder = BatchBuilder(store)
    correct, total, per_rank = 0, 0, [[0, 0], [0, 0]]
    for index, (nodes, seed) in enumerate(PartitionSampler(NUM_NODES, 130, shuffle=False, num_replicas=1, rank=0)):
        batch = builder[(nodes, seed)]
        with torch.no_grad():
            hits = (model(batch).argmax(dim=1) == batch.y)[batch.val_mask]
        correct, total = correct + int(hits.sum()), total + hits.numel()
        per_rank[index % 2][0] += int(hits.sum())
        per_rank[index % 2][1] += hits.numel()
    logged = last_epoch_metrics(run_dir)["val/acc"]
    assert logged == pytest.approx(correct / total, abs=1e-6)
    mean_of_ranks = sum(c / t for c, t in per_rank) / 2
    assert abs(mean_of_ranks - correct / total) > 1e-4  # the test would notice per-rank averaging


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, store, ranks):
    # One rank: 7 batches per epoch; two: 4 per rank. 3 epochs, a checkpoint every 3 steps, so
    # most fall mid-epoch; the kill comes at a random step after the first checkpoint.
    config = partition_config(tmp_path, store, batch_size=150, every_n_train_steps=3)
    extra = DDP if ranks == 2 else []
    reference = train("--config", str(config), *extra, run_dir=tmp_path / "uninterrupted")
    assert reference.returncode == 0, reference.stderr[-3000:]

    steps = 21 if ranks == 1 else 12
    # two ranks: 4 steps an epoch, checkpoints after steps 3, 4 (epoch end), 6, 8, 9; a kill after steps 4, 7, 8
    # or 9 resumes mid-epoch, where each rank's partial sums of the training loss must come back as they were
    kill_at = int(os.environ.get("KILL_AT", 0)) or (random.Random().randint(4, steps - 3) if ranks == 1 else
                                                    random.Random().choice([4, 7, 8, 9]))
    run_dir = tmp_path / "killed"
    process = train("--config", str(config), *extra, "--trainer.callbacks+=cli_helpers.StepPrinter",
                    "--trainer.callbacks.pause", "0.2", run_dir=run_dir, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    for line in process.stdout:
        if line.split() == ["step", str(kill_at)] or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)  # every rank, as a preemption would
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"

    resumed = train("--config", str(config), *extra, "--ckpt_path", "last", run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout, resumed.stderr
    expected, got = final_weights(tmp_path / "uninterrupted"), final_weights(run_dir)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"{ranks} rank(s) killed at step {kill_at}: {different}"
    # every logged value of every epoch, the epoch means of the training loss over all ranks included
    assert logged_epochs(run_dir) == logged_epochs(tmp_path / "uninterrupted"), f"killed at step {kill_at}"


def run_until(config: Path, run_dir: Path, line: str, *extra) -> None:
    """Starts a fit that checkpoints every step and prints its progress, and SIGKILLs its whole process
    group when it prints ``line``."""
    process = train("--config", str(config), *extra, "--trainer.callbacks+=cli_helpers.StepPrinter",
                    "--trainer.callbacks.pause", "0.3", run_dir=run_dir, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    for output in process.stdout:
        if output.strip() == line or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before printing {line!r}"


@pytest.mark.parametrize("first_kill", ["validating 0", "step 7"])
@pytest.mark.slow
def test_kills_while_validating_or_right_after_an_epochs_last_step_resume_to_the_same_logs(tmp_path, store,
                                                                                            first_kill):
    # 7 batches an epoch, 3 epochs, a checkpoint after every step. A first kill while epoch 0 validates, or
    # right after its last step (before it validates), a second one early in epoch 1, then to the end: every
    # logged value, and the step it is logged at, must be the uninterrupted run's.
    config = partition_config(tmp_path, store, batch_size=150, every_n_train_steps=1)
    reference = train("--config", str(config), run_dir=tmp_path / "uninterrupted")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "killed"
    run_until(config, run_dir, first_kill)
    run_until(config, run_dir, "step 9", "--ckpt_path", "last")
    resumed = train("--config", str(config), "--ckpt_path", "last", run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_epochs(run_dir) == logged_epochs(tmp_path / "uninterrupted")
    expected, got = final_weights(tmp_path / "uninterrupted"), final_weights(run_dir)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
def test_last_ckpt_is_the_final_state_when_the_step_interval_does_not_divide_the_run(tmp_path, store):
    # 21 steps, a checkpoint every 5: without the epoch-end and final saves last.ckpt would be step 20.
    config = partition_config(tmp_path, store, batch_size=150, every_n_train_steps=5)
    done = train("--config", str(config), run_dir=tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    (tmp_path / "reference").mkdir()
    reference_config = partition_config(tmp_path / "reference", store, batch_size=150)
    reference = train("--config", str(reference_config), run_dir=tmp_path / "epochs")
    assert reference.returncode == 0, reference.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 21
    expected = final_weights(tmp_path / "epochs")
    assert all(torch.equal(expected[name], checkpoint["state_dict"][name]) for name in expected)
    again = train("--config", str(config), "--ckpt_path", "last", run_dir=tmp_path / "run")
    assert again.returncode == 0, again.stderr[-3000:]
    after = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert after["global_step"] == 21  # nothing more was trained
    assert all(torch.equal(after["state_dict"][name], checkpoint["state_dict"][name]) for name in expected)


@pytest.mark.slow
def test_resume_with_another_configuration_names_the_difference(tmp_path, store):
    config = partition_config(tmp_path, store, batch_size=150)
    first = train("--config", str(config), "--trainer.max_epochs", "1", run_dir=tmp_path / "run")
    assert first.returncode == 0, first.stderr[-3000:]
    for args, names in ((["--model.encoder.init_args.num_layers", "3"], ["model.encoder.num_layers: checkpoint 2"]),
                        (["--data.init_args.batch_size", "200"], ["data.batch_size: checkpoint 150, this run 200"])):
        result = train("--config", str(config), "--ckpt_path", "last", *args, run_dir=tmp_path / "run")
        assert result.returncode != 0
        assert all(name in result.stderr for name in names), result.stderr[-2000:]
        assert "Epoch" not in result.stdout


@pytest.mark.slow
def test_resuming_from_an_epoch_end_checkpoint_with_or_without_torch_compile(tmp_path, store):
    """From the checkpoint written at an epoch's end, the next epoch logs what an uninterrupted run
    logs (its loss mean must not include the finished epoch's losses). compile_encoder changes how
    the encoder runs, not what it computes (without dropout, whose compiled kernels draw other
    random numbers), so a checkpoint written without it resumes with it and ends alike."""
    config = partition_config(tmp_path, store, batch_size=150)
    no_dropout = ["--config", str(config), "--model.encoder.init_args.dropout", "0.0"]
    plain = train(*no_dropout, "--trainer.max_epochs", "2", run_dir=tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    expected = last_epoch_metrics(tmp_path / "plain")
    for name, options in (("resumed", []), ("compiled", ["--model.compile_encoder", "true"])):
        first = train(*no_dropout, "--trainer.max_epochs", "1", run_dir=tmp_path / name)
        resumed = train(*no_dropout, "--trainer.max_epochs", "2", "--ckpt_path", "last", *options,
                        run_dir=tmp_path / name)
        assert first.returncode == 0 and resumed.returncode == 0, (first.stderr + resumed.stderr)[-3000:]
        got = last_epoch_metrics(tmp_path / name)
        assert got["epoch"] == expected["epoch"] == 1
        if not options:
            assert got == expected
        for key in ("val/acc", "test@best_val", "train/loss"):
            assert got[key] == pytest.approx(expected[key], abs=2e-3), (name, key)  # compiled kernels round differently


def test_a_checkpoints_model_class_is_compared_when_it_was_saved():
    hparams = {"_class_path": "difformer_lightning.NodeClassifier", "lr": 0.1, "compile_encoder": True}
    # written before train.py saved the class (it took only NodeClassifier), without compile_encoder
    check_compatible({"hyper_parameters": {"lr": 0.1}}, hparams, {}, None, fitting=True)
    regressor = {"hyper_parameters": {"_class_path": "difformer_lightning.NodeRegressor", "lr": 0.1}}
    with pytest.raises(ValueError, match="model._class_path: checkpoint 'difformer_lightning.NodeRegressor', "
                                         "this run 'difformer_lightning.NodeClassifier'"):
        check_compatible(regressor, hparams, {}, None, fitting=True)


def test_a_memory_budget_never_blocks_a_resume_and_a_model_setting_does():
    saved = {"hyper_parameters": {"encoder": {"init_args": {"sigmoid_block_bytes": 2**30, "num_layers": 2}}}}
    check_compatible(saved, {"encoder": {"init_args": {"sigmoid_block_bytes": 2**20, "num_layers": 2}}}, {}, None)
    with pytest.raises(ValueError, match="model.encoder.num_layers: checkpoint 2, this run 3"):
        check_compatible(saved, {"encoder": {"init_args": {"sigmoid_block_bytes": 2**30, "num_layers": 3}}}, {}, None)


@pytest.mark.slow
def test_a_torch_file_that_is_no_checkpoint_is_refused_by_name_before_lightning_reads_it(tmp_path):
    path = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), path)  # a complete torch.save file, but a bare tensor
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "test", "--config", str(ROOT / "configs" / "synthetic.yaml"),
                             "--ckpt_path", str(path), "--trainer.default_root_dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=scaled_timeout(20))
    assert result.returncode != 0
    assert (f"CheckpointError: {path} is a PyTorch file but not a checkpoint of this project (it holds Tensor, "
            "no 'state_dict')") in result.stderr.strip().splitlines()[-1]


def test_a_kill_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"weights": torch.ones(3)}}, path)

    def dies_half_way(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"weights": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir() if "last" in p.name] == ["last.ckpt"]  # 'last' finds no partial


@pytest.mark.slow
def test_bad_checkpoint_paths_and_device_counts_fail_before_work(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        check_checkpoint_file(truncated)
    synthetic = str(ROOT / "configs" / "synthetic.yaml")
    for args, message in ((["--ckpt_path", str(tmp_path / "nothing.ckpt")], "does not exist"),
                          (["--ckpt_path", str(truncated)], "truncated or not a checkpoint"),
                          (["--trainer.accelerator", "gpu", "--trainer.devices", "1"] if not torch.cuda.is_available()
                           else ["--trainer.devices", str(torch.cuda.device_count() + 1)], "GPU")):
        result = train("--config", synthetic, *args, run_dir=tmp_path / "run")
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-1500:])
        assert "Epoch" not in result.stdout


@pytest.mark.slow
def test_bf16_mixed_training_stays_finite_and_learns(tmp_path):
    result = train("--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.precision", "bf16-mixed",
                   "--trainer.max_epochs", "40", "--trainer.enable_progress_bar", "false", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = last_epoch_metrics(tmp_path)
    assert all(value == value and abs(value) != float("inf") for value in metrics.values())
    assert metrics["test@best_val"] > 0.6  # as in float32 (test_default_job_learns_far_above_chance)


@pytest.mark.slow
def test_sigint_ends_a_fit_with_130_and_says_where_it_stopped_and_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT) once the first checkpoint exists: exit code 130 (the shell's for Ctrl-C; Lightning
    itself exits 1), a line naming the epoch, the step, what last.ckpt holds and the resume option."""
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "synthetic.yaml"),
               "--trainer.max_epochs", "100000", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.enable_progress_bar", "false"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    # SIGINT's default handler in the child (a shell runs background jobs with SIGINT ignored)
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + scaled_timeout(30)
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=scaled_timeout(30))
    assert process.returncode == 130, output[-2000:]
    line = next(line for line in output.splitlines() if line.startswith("fit interrupted at epoch "))
    assert f"{last} holds step " in line and line.endswith("Resume: the same command with --ckpt_path last.")


@pytest.mark.parametrize("kill", ["step 5", "validating 4"])
@pytest.mark.slow
def test_the_full_batch_demo_killed_and_resumed_logs_what_the_uninterrupted_run_logs(tmp_path, kill):
    """The README's default job (one batch an epoch, dropout) killed after a step or while validating, then
    resumed with --ckpt_path last: every logged value of every epoch and the final weights are the
    uninterrupted run's. (The DataLoaders' iterators must not draw from the global random state that the
    checkpoint restores: the resumed run's sanity check creates one more.)"""
    config = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.max_epochs", "10",
              "--trainer.enable_progress_bar", "false"]
    reference = train(*config, run_dir=tmp_path / "uninterrupted")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run_dir = tmp_path / "killed"
    run_until(config[1], run_dir, kill, *config[2:])
    resumed = train(*config, "--ckpt_path", "last", run_dir=run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_epochs(run_dir) == logged_epochs(tmp_path / "uninterrupted")
    expected, got = final_weights(tmp_path / "uninterrupted"), final_weights(run_dir)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
def test_a_fit_with_lightnings_early_stopping_as_a_user_adds_it_resumes(tmp_path):
    """``--trainer.callbacks+=EarlyStopping`` with its defaults: resuming from the epoch-end checkpoint stopped
    with "Early stopping conditioned on metric `val/acc` which is not available" (train.py now has it decide
    after each validation); the resumed run stops where an uninterrupted one does."""
    stopping = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.enable_progress_bar", "false",
                "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor", "val/acc",
                "--trainer.callbacks.mode", "max", "--trainer.callbacks.patience", "3"]
    whole = train(*stopping, "--trainer.max_epochs", "60", run_dir=tmp_path / "whole")
    first = train(*stopping, "--trainer.max_epochs", "4", run_dir=tmp_path / "resumed")
    resumed = train(*stopping, "--trainer.max_epochs", "60", "--ckpt_path", "last", run_dir=tmp_path / "resumed")
    assert whole.returncode == first.returncode == resumed.returncode == 0, resumed.stderr[-2000:]
    assert max(logged_epochs(tmp_path / "whole")) < 59  # it stopped early
    assert logged_epochs(tmp_path / "resumed") == logged_epochs(tmp_path / "whole")


@pytest.mark.slow
def test_a_checkpoint_without_the_modules_buffers_is_evaluated_and_resumed(tmp_path):
    synthetic = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.enable_progress_bar", "false"]
    fitted = train(*synthetic, "--trainer.max_epochs", "2", run_dir=tmp_path / "run")
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    model = NodeClassifier.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    parameters = dict(model.named_parameters())
    checkpoint["state_dict"] = {name: value for name, value in checkpoint["state_dict"].items() if name in parameters}
    stripped = tmp_path / "weights_only.ckpt"
    torch.save(checkpoint, stripped)
    for subcommand, extra in (("test", []), ("fit", ["--trainer.max_epochs", "3"])):
        command = [sys.executable, str(ROOT / "train.py"), subcommand, *synthetic, "--ckpt_path", str(stripped), *extra,
                   "--trainer.default_root_dir", str(tmp_path / subcommand)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=scaled_timeout(40))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "the checkpoint has no best_val, test_at_best_val, best_step" in done.stdout + done.stderr


@pytest.mark.slow
def test_a_named_optimiser_trains_with_its_own_values_and_a_schedule_resumes_exactly(tmp_path):
    synthetic = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.enable_progress_bar", "false"]
    adamw = train(*synthetic, "--trainer.max_epochs", "1", "--optimizer", "AdamW", "--optimizer.lr", "0.005",
                  "--optimizer.weight_decay", "0.02", run_dir=tmp_path / "adamw")
    assert adamw.returncode == 0, adamw.stderr[-2000:]
    assert "restored" not in adamw.stdout + adamw.stderr  # a fresh run restored nothing
    saved = torch.load(tmp_path / "adamw" / "checkpoints" / "last.ckpt", weights_only=False)
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert (group["lr"], group["weight_decay"], group["decoupled_weight_decay"]) == (0.005, 0.02, True)
    assert (saved["hyper_parameters"]["lr"], saved["hyper_parameters"]["weight_decay"]) == (0.005, 0.02)
    conflict = train(*synthetic, "--optimizer", "AdamW", "--optimizer.lr", "0.005", "--model.lr", "0.01",
                     run_dir=tmp_path / "conflict")
    assert conflict.returncode != 0 and "--model.lr 0.01 and --optimizer.lr 0.005 disagree" in conflict.stderr

    # the model's own Adam under a schedule (LightningCLI alone ignores --lr_scheduler without --optimizer)
    schedule = [*synthetic, "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "2", "--lr_scheduler.gamma", "0.5"]
    whole = train(*schedule, "--trainer.max_epochs", "6", run_dir=tmp_path / "whole")
    first = train(*schedule, "--trainer.max_epochs", "3", run_dir=tmp_path / "resumed")
    resumed = train(*schedule, "--trainer.max_epochs", "6", "--ckpt_path", "last", run_dir=tmp_path / "resumed")
    assert whole.returncode == first.returncode == resumed.returncode == 0, resumed.stderr[-2000:]
    assert "restored from the checkpoint" not in resumed.stdout + resumed.stderr  # nothing changed
    final = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** 3)
    assert logged_epochs(tmp_path / "resumed") == logged_epochs(tmp_path / "whole")
    expected = final_weights(tmp_path / "whole")
    assert all(torch.equal(expected[name], final["state_dict"][name]) for name in expected)


def test_the_data_description_is_a_named_slot_compared_field_by_field():
    from difformer_lightning.checkpoint import DATA_SLOT, check_compatible
    saved = {"dataset": "TemporalDataModule:chickenpox", "num_nodes": 20, "num_edges": 102, "num_features": 4,
             "num_classes": 1, "num_snapshots": 516, "split": [103, 103, 310], "edge_weight_transform": "none",
             "batch_size": 8}
    checkpoint = {DATA_SLOT: saved, "hyper_parameters": {}}
    check_compatible(checkpoint, {}, {}, dict(saved))
    with pytest.raises(ValueError, match=r"data.num_snapshots: checkpoint 516, this run 517"):
        check_compatible(checkpoint, {}, {}, {**saved, "num_snapshots": 517})
    check_compatible(checkpoint, {}, {}, {**saved, "batch_size": 4}, fitting=False)  # evaluating: how batches are drawn does not count
    with pytest.raises(ValueError, match=r"data.batch_size: checkpoint 8, this run 4"):
        check_compatible(checkpoint, {}, {}, {**saved, "batch_size": 4})
    # a checkpoint of 0.1.0 kept the description in the data module's state
    old = {"TemporalDataModule": {"data": {k: v for k, v in saved.items() if k != "num_snapshots"}}, "hyper_parameters": {}}
    check_compatible(old, {}, {}, {**saved, "num_snapshots": 517})  # a field it did not record is not compared
    with pytest.raises(ValueError, match=r"data.num_nodes: checkpoint 20, this run 21"):
        check_compatible(old, {}, {}, {**saved, "num_nodes": 21})
