"""python -m difformer_lightning.sweep: the search space, a tiny sweep end to end (runs, prunes, writes a preset
that train.py loads), a sweep killed mid-trial and resumed with the same command, two processes on one study."""
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import ROOT
from difformer_lightning.sweep import SweepError, as_arguments, baseline_params, load_space, parse_average_over

# a tiny graph (300 nodes, hidden 8) and 2 epochs: a trial is train.py's start-up and a few seconds
TINY = ["--data.init_args.num_nodes", "300", "--data.init_args.num_val", "50", "--data.init_args.num_test", "100",
        "--model.encoder.init_args.hidden_channels", "8", "--trainer.max_epochs", "2"]
SPACE = "model.lr: {type: float, low: 1e-3, high: 5e-2, log: true}\nmodel.encoder.init_args.dropout: [0.0, 0.5]\n"


def write_space(folder: Path, text: str = SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


def sweep(tmp_path: Path, *extra: str, trials: int = 3, **popen):
    command = [sys.executable, "-m", "difformer_lightning.sweep", "--config", "configs/synthetic.yaml",
               "--space", str(write_space(tmp_path)), "--trials", str(trials), "--runs-dir", str(tmp_path / "runs"),
               "--study", "tiny", "--prune-after-trials", "1", "--prune-warmup-epochs", "0", *TINY, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def load(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / 'tiny.db'}")


# --- the search space and the command lines (fast) ------------------------------------------------------------

def test_space_reads_each_kind_of_distribution(tmp_path):
    space = load_space(write_space(tmp_path, "model.lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n"
                                             "model.encoder.init_args.num_layers: {type: int, low: 1, high: 4}\n"
                                             "model.encoder.init_args.kernel: [simple, sigmoid]\n"
                                             "model.encoder.init_args.use_bn: {type: categorical, choices: [true, false]}\n"))
    assert space["model.lr"] == FloatDistribution(1e-4, 1e-1, log=True)  # 1e-4 is a string to YAML
    assert space["model.encoder.init_args.num_layers"] == IntDistribution(1, 4)
    assert space["model.encoder.init_args.kernel"] == CategoricalDistribution(["simple", "sigmoid"])
    assert space["model.encoder.init_args.use_bn"] == CategoricalDistribution([True, False])


@pytest.mark.parametrize("text, says", [
    ("model.lr: {type: gaussian, low: 0, high: 1}", "type one of float, int, categorical"),
    ("model.lr: {type: float, low: small, high: 1}", "low must be a number"),
    ("model.lr: {type: float, low: 1, high: 0.1}", "model.lr"),  # Optuna's message: low > high
    ("model.lr: {type: float, low: 0, high: 1, log: true}", "model.lr"),  # log needs low > 0
    ("- model.lr", "must map train.py options"),
    ("model.encoder.init_args.num_layers: {type: int, low: 1.5, high: 3}", "low of an int distribution must be an integer"),
    ("model.lr: [1, 2\n", "not valid YAML"),
])
def test_bad_space_names_the_entry_and_the_fix(tmp_path, text, says):
    with pytest.raises(SweepError, match=says):
        load_space(write_space(tmp_path, text))


def test_missing_space_file_is_named(tmp_path):
    with pytest.raises(SweepError, match="cannot read the search space"):
        load_space(tmp_path / "absent.yaml")


def test_arguments_are_yaml_scalars_train_py_reads():
    assert as_arguments({"model.lr": 0.001, "model.encoder.init_args.use_bn": False, "x": None, "k": "simple"}) == \
        ["--model.lr", "0.001", "--model.encoder.init_args.use_bn", "false", "--x", "null", "--k", "simple"]


def test_average_over_every_combination():
    assert parse_average_over([]) == [{}]
    assert parse_average_over(["data.init_args.split=0,1", "seed_everything=0, 1"]) == [
        {"data.init_args.split": "0", "seed_everything": "0"}, {"data.init_args.split": "0", "seed_everything": "1"},
        {"data.init_args.split": "1", "seed_everything": "0"}, {"data.init_args.split": "1", "seed_everything": "1"}]
    with pytest.raises(SweepError, match="OPTION=V1,V2"):
        parse_average_over(["data.init_args.split"])


def test_baseline_is_the_presets_values_inside_the_space():
    config = {"model": {"class_path": "difformer_lightning.NodeClassifier",
                        "init_args": {"lr": 0.01, "weight_decay": 5e-4,
                                      "encoder": {"class_path": "difformer_lightning.DIFFormer",
                                                  "init_args": {"num_layers": 3, "use_bn": True, "dropout": 0.2}}}}}
    space = {"model.lr": FloatDistribution(1e-3, 5e-2, log=True), "model.weight_decay": FloatDistribution(1e-3, 1e-1),
             "model.encoder.init_args.num_layers": IntDistribution(1, 5, step=2),
             "model.encoder.init_args.use_bn": CategoricalDistribution([True, False]),
             "model.encoder.init_args.dropout": CategoricalDistribution([0.0, 0.5]), "model.absent": IntDistribution(1, 2)}
    # weight decay below the range, dropout not a choice, an option the preset lacks: left to the sampler
    assert baseline_params(config, space) == {"model.lr": 0.01, "model.encoder.init_args.num_layers": 3,
                                              "model.encoder.init_args.use_bn": True}


def test_unknown_option_is_refused_before_any_trial(tmp_path):
    done = sweep(tmp_path, "--trails", "3")
    assert done.returncode == 2 and "unknown option --trails" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_train_option_is_refused_before_any_trial(tmp_path):
    done = sweep(tmp_path, "--model.encoder.init_args.kernal", "simple")
    assert done.returncode == 2 and "train.py refuses these options" in done.stderr, done.stderr
    assert not (tmp_path / "runs" / "tiny").exists()


def test_bad_choice_is_refused_before_any_trial(tmp_path):
    # the second choice, not the first, is wrong: every choice is probed
    space = write_space(tmp_path, "model.encoder.init_args.hidden_channels: [32, big]\n")
    done = subprocess.run([sys.executable, "-m", "difformer_lightning.sweep", "--config", "configs/synthetic.yaml",
                           "--space", str(space), "--trials", "1", "--runs-dir", str(tmp_path / "runs"), *TINY],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "train.py refuses these options" in done.stderr and "big" in done.stderr, \
        done.stderr
    assert not list((tmp_path / "runs").glob("*/trial-*"))


# --- whole sweeps (slow) ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_sweep_runs_prunes_and_writes_a_preset_train_py_loads(tmp_path):
    done = sweep(tmp_path, "--sampler-seed", "0")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    study = load(tmp_path)
    states = [trial.state for trial in study.trials]
    assert len(states) == 3 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    assert TrialState.PRUNED in states, "no trial was pruned: the pruner saw no report"
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE  # accuracy
    assert len(re.findall(r"\[sweep tiny\] trial \d+ (complete|pruned)", done.stdout)) == 3, done.stdout
    assert "3/3 finished" in done.stdout
    assert "[sweep tiny] trial 0 is the preset's own values; outside the space, sampled instead: " \
        "model.encoder.init_args.dropout" in done.stdout
    for trial in study.trials:  # each trial a normal run folder; reports are val/best per epoch
        run = tmp_path / "runs" / "tiny" / f"trial-{trial.number:04d}" / "run"
        assert (run / "command.txt").is_file() and (run / "logs").is_dir() and (run / "checkpoints").is_dir()
        assert set(trial.intermediate_values) <= {0, 1}
        values = list(trial.intermediate_values.values())
        assert values == sorted(values), "val/best never decreases"
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(trial.intermediate_values[1])
    baseline = study.trials[0]  # the preset as it is: lr 1e-2 (its dropout, 0.2, is not among the space's choices)
    assert baseline.user_attrs["baseline"] and baseline.params["model.lr"] == 0.01
    best = study.best_trial
    preset = tmp_path / "runs" / "tiny" / "best.yaml"
    text = preset.read_text()
    assert f"trial {best.number}, the best of 3 finished" in text
    printed = subprocess.run([sys.executable, "train.py", "fit", "--config", str(preset), "--print_config"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert printed.returncode == 0, printed.stderr[-2000:]
    config = yaml.safe_load(printed.stdout)
    model = config["model"]["init_args"]
    assert model["lr"] == pytest.approx(best.params["model.lr"])
    assert model["encoder"]["init_args"]["dropout"] == best.params["model.encoder.init_args.dropout"]
    assert config["data"]["init_args"]["num_nodes"] == 300 and config["trainer"]["max_epochs"] == 2
    assert config["trainer"]["default_root_dir"] is None or "trial-" not in str(config["trainer"]["default_root_dir"])

    again = sweep(tmp_path)  # the study already has its 3 trials: nothing runs, the preset is written again
    assert again.returncode == 0 and "3/3 trials finished" in again.stdout and len(load(tmp_path).trials) == 3


def running_train_py(run_dir: Path) -> list:
    """pids of train.py processes whose command line names ``run_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run_dir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


SLOW = ["--trainer.callbacks+=cli_helpers.StepPrinter", "--trainer.callbacks.pause", "1.0", "--heartbeat", "1",
        "--no-prune"]


def stop_mid_trial(process: subprocess.Popen, log: Path, how: int) -> None:
    """Sends ``how`` to the sweep (not to its run) once ``log`` (a trial's train.log) shows a training step."""
    deadline = time.monotonic() + 300
    while not (log.is_file() and "step 1" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, f"the sweep ended before {log} trained"
        time.sleep(0.2)
    os.kill(process.pid, how)
    process.wait(timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the run's parent-death signal is Linux's")
def test_killed_sweep_resumes_with_the_same_command(tmp_path):
    process = sweep(tmp_path, *SLOW, trials=2, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "runs" / "tiny" / "trial-0001" / "run" / "train.log"
    stop_mid_trial(process, log, signal.SIGKILL)  # trial 0 done, trial 1 mid-run: the sweep alone, as an OOM kill
    assert process.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while running_train_py(log.parent):  # its run follows it (parent-death signal), not left training unwatched
        assert time.monotonic() < deadline, "trial 1's train.py outlived the killed sweep"
        time.sleep(0.2)
    killed = load(tmp_path).trials[1]
    assert killed.state == TrialState.RUNNING  # as the kill left it
    time.sleep(3)  # past the grace period (2 heartbeats), so the restart sees the trial as stale

    done = sweep(tmp_path, *SLOW, trials=2)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "1/2 trials finished" in done.stdout
    trials = load(tmp_path).trials
    assert trials[1].state == TrialState.FAIL
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 2
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # renamed in Optuna 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = [t for t in finished if retry.retried_trial_number(t) == 1]
    assert len(retried) == 1 and retried[0].params == killed.params  # rerun with the killed trial's parameters
    assert (tmp_path / "runs" / "tiny" / "best.yaml").is_file()


@pytest.mark.slow
def test_interrupted_sweep_reruns_the_interrupted_trial(tmp_path):
    process = sweep(tmp_path, *SLOW, "--sampler-seed", "0", trials=1, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True)
    stop_mid_trial(process, tmp_path / "runs" / "tiny" / "trial-0000" / "run" / "train.log", signal.SIGINT)  # Ctrl-C
    assert process.returncode == 130 and "the same command resumes (trial 0 runs again)" in process.stderr.read()
    interrupted, queued = load(tmp_path).trials
    assert interrupted.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.user_attrs["rerun_of"] == 0  # (a waiting trial's parameters are set when it starts)

    done = sweep(tmp_path, *SLOW, "--sampler-seed", "0", trials=1)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    interrupted, rerun = load(tmp_path).trials
    assert rerun.state == TrialState.COMPLETE and rerun.params == interrupted.params


@pytest.mark.slow
def test_diverging_trial_is_pruned_not_failed(tmp_path):
    # from step 1 the weights are NaN, so the loss is (NonFiniteGuard stops the run); the preset's lr 1e-2 is not
    # among the space's choices: no baseline trial
    space = write_space(tmp_path, "model.lr: [0.02]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "difformer_lightning.sweep", "--config", "configs/synthetic.yaml",
                           "--space", str(space), "--trials", "1", "--runs-dir", str(tmp_path / "runs"), "--study",
                           "tiny", *TINY, "--trainer.callbacks+=cli_helpers.PoisonWeights"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    (trial,) = load(tmp_path).trials
    assert trial.state == TrialState.PRUNED, done.stdout + done.stderr[-2000:]
    assert "trial 0 pruned" in done.stdout
    assert done.returncode == 1 and "no trial of 'tiny' completed" in done.stderr


@pytest.mark.slow
def test_two_processes_share_one_sqlite_study(tmp_path):
    paced = ["--trainer.callbacks+=cli_helpers.StepPrinter", "--trainer.callbacks.pause", "2.0"]  # trials overlap
    first = sweep(tmp_path, *paced, trials=2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # the first creates the study; the second joins it
    second = sweep(tmp_path, *paced, trials=2, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for process in (first, second):
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, out[-2000:] + err[-3000:]
    trials = load(tmp_path).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # each process stops once 2 have finished; one running in the other when that happens finishes too
    assert 2 <= len(finished) <= 3 and len(trials) == len(finished)
    hosts = {t.user_attrs["host"] for t in trials}
    assert len(hosts) == 2, hosts  # both processes ran trials
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers)
    folders = sorted(p.name for p in (tmp_path / "runs" / "tiny").glob("trial-*"))
    assert folders == [f"trial-{n:04d}" for n in sorted(numbers)]
    with sqlite3.connect(tmp_path / "runs" / "tiny.db") as db:  # one study, in one file
        assert db.execute("select count(*) from studies").fetchone() == (1,)
