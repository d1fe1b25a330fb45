"""Hyperparameter sweeps over ``train.py`` with Optuna: a study in a database, pruning, resume, a tuned preset.

    python -m difformer_lightning.sweep --config configs/heterophily_s.yaml \\
        --space configs/sweeps/heterophily.yaml --trials 40 \\
        --average-over data.init_args.split=0,1 --best-out configs/tuned/minesweeper_s.yaml \\
        --data.init_args.name Minesweeper --trainer.max_epochs 100

Every option ``--space``, ``--average-over`` and the rest of the command line name is an option of
``train.py fit`` (the rest is passed to every trial as given). Each trial:

1. samples one value per option of the search space (a YAML file, ``option: {type: float|int|categorical, ...}``
   with the arguments of Optuna's ``FloatDistribution``, ``IntDistribution``, ``CategoricalDistribution``);
2. runs ``train.py fit`` once per combination of ``--average-over`` values (splits, seeds), each a normal run folder
   (checkpoints, CSV logs and the resolved ``config.yaml`` under ``logs/``, ``command.txt``, ``train.log``) under
   ``--runs-dir``/<study>/trial-<number>/<values, or run>/;
3. is worth the mean over those runs of ``val/best``, the validation metric at the best epoch (the model selection
   ``test@best_val`` uses), maximised or minimised as the model's metric asks (``higher_is_better``).

While a run trains, its ``val/best`` of every finished epoch is reported to the trial (step = epoch, offset by
``max_epochs`` per earlier run of the trial); when Optuna's pruner (``MedianPruner``) says the trial is worse than
the median of earlier trials at that step, the run is stopped (SIGINT: Lightning's graceful shutdown) and the trial
is marked pruned; a run that stops on a non-finite loss (``NonFiniteError``) prunes its trial too (a setting that
diverges is a bad trial, not a broken sweep). A new study's first trial is the preset's own values of the space's
options (``--no-baseline`` skips it). All Optuna calls happen in this process, through its public API; the runs
are plain ``train.py`` processes.

The study lives in a database (``--storage``, any SQLAlchemy URL; a SQLite file under ``--runs-dir`` by default), so
several processes or machines can work on one study, and a sweep that was stopped resumes where it was with the
same command: finished trials are kept, a trial stopped by Ctrl-C is queued again with its parameters, a trial
whose process died (no heartbeat for ``2 x --heartbeat`` seconds)
is marked failed and run again with its parameters (Optuna's heartbeat retry callback), and the sweep stops
when ``--trials`` trials of the study have finished (completed or pruned), counting every process's. At the end
(and after every trial that improves the best), the best trial's settings are written to ``--best-out`` as a preset:
``train.py fit --print_config`` of the preset with those values, with a header saying where they come from.
"""
import argparse
import ctypes
import importlib
import itertools
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

try:
    import optuna
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("the sweep needs Optuna: pip install 'difformer-lightning[tune]' (or pip install optuna)") \
        from error
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from .io import atomic_file
from .plot import read_metrics

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
DISTRIBUTIONS = {"float": FloatDistribution, "int": IntDistribution, "categorical": CategoricalDistribution}
# The last line a run that stopped on a non-finite loss prints (callbacks.non_finite.NonFiniteError, uncaught)
NON_FINITE = "callbacks.non_finite.NonFiniteError:"
MONITOR = "val/best"  # the validation metric at the best epoch so far (EncoderModule's model selection)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SweepError(ValueError):
    """A bad search space, option or storage: the message names it and the fix."""


class RunFailed(RuntimeError):
    """A trial's ``train.py`` run failed (the trial is marked failed; the sweep goes on)."""


# --- the search space ------------------------------------------------------------------------------------------

def load_space(path: Path) -> Dict[str, BaseDistribution]:
    """The search space of a YAML file: ``{option: distribution}``. Each entry is ``option: {type: float, low: 1e-4,
    high: 1e-1, log: true}`` (``int`` likewise, with ``step``), ``option: {type: categorical, choices: [...]}``, or a
    plain list (categorical). Raises :class:`SweepError` naming the file, the entry and what is wrong."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SweepError(f"cannot read the search space {path}: {error}") from error
    except yaml.YAMLError as error:
        raise SweepError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"{path} must map train.py options to distributions, e.g. 'model.lr: {{type: float, low: 1e-4, "
                         f"high: 1e-1, log: true}}'")
    space = {}
    for option, spec in raw.items():
        if isinstance(spec, list):
            spec = {"type": "categorical", "choices": spec}
        if not isinstance(spec, dict) or spec.get("type") not in DISTRIBUTIONS:
            raise SweepError(f"{path}: {option}: give a mapping with type one of {', '.join(DISTRIBUTIONS)} (or a "
                             f"list of choices), got {spec!r}")
        arguments = {key: value for key, value in spec.items() if key != "type"}
        if spec["type"] == "int":
            bad = [key for key in ("low", "high", "step") if key in arguments and
                   (isinstance(arguments[key], bool) or not isinstance(arguments[key], int))]
            if bad:
                raise SweepError(f"{path}: {option}: {bad[0]} of an int distribution must be an integer, got "
                                 f"{arguments[bad[0]]!r} (use type: float for a real number)")
        if spec["type"] == "float":  # YAML reads 1e-4 (no dot) as a string
            arguments = {key: _number(path, option, key, value) if key in ("low", "high", "step") else value
                         for key, value in arguments.items()}
        try:
            space[str(option)] = DISTRIBUTIONS[spec["type"]](**arguments)
        except (TypeError, ValueError) as error:
            raise SweepError(f"{path}: {option}: {error}") from error
    return space


def _number(path: Path, option: str, key: str, value: Any) -> Any:
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SweepError(f"{path}: {option}: {key} must be a number, got {value!r}") from None


def suggest(trial: optuna.Trial, space: Dict[str, BaseDistribution]) -> Dict[str, Any]:
    """One value per option, drawn by the study's sampler (Optuna's public ``suggest_*``)."""
    params = {}
    for name, distribution in space.items():
        if isinstance(distribution, FloatDistribution):
            params[name] = trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log,
                                               step=distribution.step)
        elif isinstance(distribution, IntDistribution):
            params[name] = trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log,
                                             step=distribution.step)
        else:
            params[name] = trial.suggest_categorical(name, distribution.choices)
    return params


def as_arguments(params: Dict[str, Any]) -> List[str]:
    """``--option value`` pairs for train.py (values as YAML scalars: ``true``, ``null``, ``0.001``)."""
    arguments = []
    for name, value in params.items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else \
            json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        arguments += [f"--{name}", text]
    return arguments


def parse_average_over(values: Sequence[str]) -> List[Dict[str, str]]:
    """``["data.init_args.split=0,1", "seed_everything=0,1"]`` -> the 4 combinations, each ``{option: value}``."""
    axes = []
    for value in values:
        option, _, choices = value.partition("=")
        if not option or not choices:
            raise SweepError(f"--average-over {value!r}: write OPTION=V1,V2,... (e.g. data.init_args.split=0,1)")
        axes.append([(option.strip(), choice.strip()) for choice in choices.split(",") if choice.strip()])
    return [dict(combination) for combination in itertools.product(*axes)] if axes else [{}]


# --- train.py ---------------------------------------------------------------------------------------------------

def resolved_config(preset: str, arguments: Sequence[str]) -> Tuple[dict, str]:
    """``train.py fit --print_config`` of ``preset`` with ``arguments``: the configuration a run would use (parsed,
    and as text). A bad option or value stops here, with train.py's message, before any trial."""
    if not TRAIN_PY.is_file():
        raise SweepError(f"{TRAIN_PY} not found: run the sweep from a checkout of difformer-lightning")
    done = subprocess.run([sys.executable, str(TRAIN_PY), "fit", "--config", preset, *arguments, "--print_config"],
                          capture_output=True, text=True, cwd=Path.cwd())
    if done.returncode != 0:
        message = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        raise SweepError(f"train.py refuses these options ({shlex.join(arguments)}):\n  " + "\n  ".join(message))
    return yaml.safe_load(done.stdout), done.stdout


def higher_is_better(config: dict) -> bool:
    """The direction of the model's validation metric (its class's ``higher_is_better``)."""
    module_name, _, class_name = config["model"]["class_path"].rpartition(".")
    return bool(getattr(importlib.import_module(module_name), class_name).higher_is_better)


def best_so_far(run_dir: Path, complete_only: bool) -> Dict[int, float]:
    """``{epoch: val/best}`` of a run's CSV logs so far; with ``complete_only``, the epochs before the latest one
    logged (whose rows may still be being written)."""
    try:
        values = read_metrics(run_dir / "logs").get(MONITOR, {})
    except (FileNotFoundError, ValueError, KeyError):  # no log yet, or a row being written
        return {}
    if complete_only and values:
        values = {epoch: value for epoch, value in values.items() if epoch < max(values)}
    return values


# --- the study --------------------------------------------------------------------------------------------------

def open_study(name: str, storage: str, maximize: bool, heartbeat: float, prune_after: int, warmup: int,
               seed: Optional[int], startup: int = 10) -> optuna.Study:
    """The study ``name`` in ``storage`` (created, or loaded to resume / to join other processes)."""
    engine = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # a trial whose process died is rerun with its parameters: Optuna 4.9 renamed the callback and its argument
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.8; we rely on them
            warnings.simplefilter("ignore", ExperimentalWarning)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
                retry = {"heartbeat_stale_trial_callback":
                         optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
            else:
                retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
            rdb = RDBStorage(storage, engine_kwargs=engine, heartbeat_interval=max(1, int(heartbeat)),
                             grace_period=max(2, int(2 * heartbeat)), **retry)
    except Exception as error:  # SQLAlchemy's errors (bad URL, no driver, unreachable server)
        raise SweepError(f"--storage {storage!r}: {error}") from error
    direction = "maximize" if maximize else "minimize"
    if seed is not None:  # a resumed seeded sweep must not draw the first trials' values again
        try:
            seed += len(optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False))
        except KeyError:  # a new study
            pass
    study = optuna.create_study(study_name=name, storage=rdb, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=warmup))
    if study.direction.name.lower() != direction:
        raise SweepError(f"study {name!r} in {storage} was created to {study.direction.name.lower()}; this model's "
                         f"metric asks to {direction}: use another --study")
    return study


def preset_value(config: dict, option: str) -> Any:
    """The value of a dotted ``train.py`` option (``model.encoder.init_args.dropout``) in a resolved configuration,
    where ``class_path``/``init_args`` nest what the command line writes flat (``model.lr`` is
    ``model: {init_args: {lr: ...}}``). Raises ``KeyError`` when the configuration has no such value."""
    node: Any = config
    for key in option.split("."):
        if isinstance(node, dict) and key not in node and isinstance(node.get("init_args"), dict):
            node = node["init_args"]
        if not isinstance(node, dict) or key not in node:
            raise KeyError(option)
        node = node[key]
    return node


def baseline_params(config: dict, space: Dict[str, BaseDistribution]) -> Dict[str, Any]:
    """The preset's own values of the search space's options, those the space contains (the others are left
    to the sampler)."""
    params = {}
    for name, distribution in space.items():
        try:
            value = preset_value(config, name)
        except KeyError:
            continue
        if isinstance(distribution, CategoricalDistribution):
            inside = value in distribution.choices
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            inside = False
        else:
            step = distribution.step
            inside = distribution.low <= value <= distribution.high and (
                step is None or math.isclose((value - distribution.low) / step,
                                             round((value - distribution.low) / step)))
        if inside:
            params[name] = value
    return params


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class Sweep:
    """One process's share of a study: runs trials until the study has ``trials`` finished ones."""

    def __init__(self, args: argparse.Namespace, passthrough: List[str], space: Dict[str, BaseDistribution],
                 repeats: List[Dict[str, str]], config: dict) -> None:
        self.args, self.passthrough, self.space, self.repeats = args, passthrough, space, repeats
        self.max_epochs = int(config["trainer"].get("max_epochs") or 1000)
        self.failures_in_a_row = 0
        self.current: Optional[Tuple[int, Dict[str, Any]]] = None  # the trial running now: (number, params)

    def objective(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.space)
        self.current = (trial.number, params)
        trial.set_user_attr("host", f"{socket.gethostname()}:{os.getpid()}")
        values, tests = [], []
        for index, repeat in enumerate(self.repeats):
            label = "-".join(f"{option.rsplit('.', 1)[-1]}{value}" for option, value in repeat.items()) or "run"
            run_dir = Path(self.args.runs_dir) / self.args.study / f"trial-{trial.number:04d}" / label
            try:
                value, test = self.run(trial, params, repeat, run_dir, offset=index * self.max_epochs)
            except (RunFailed, SweepError) as error:
                trial.set_user_attr("error", str(error).splitlines()[0])
                raise
            values.append(value)
            tests.append(test)
        trial.set_user_attr("test@best_val", sum(tests) / len(tests) if all(map(math.isfinite, tests)) else None)
        trial.set_user_attr("values", values)
        self.failures_in_a_row = 0
        return sum(values) / len(values)

    def run(self, trial: optuna.Trial, params: Dict[str, Any], repeat: Dict[str, str], run_dir: Path,
            offset: int) -> Tuple[float, float]:
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(TRAIN_PY), "fit", "--config", self.args.config, *self.passthrough,
                   *as_arguments(params), *as_arguments(repeat),
                   "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false"]
        (run_dir / "command.txt").write_text(shlex.join(command) + "\n")
        reported: Dict[int, float] = {}
        with open(run_dir / "train.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_prepare_run)
            pruned = False
            while process.poll() is None:
                time.sleep(self.args.poll)
                pruned = self.report(trial, run_dir, offset, reported, complete_only=True)
                if pruned:
                    process.send_signal(signal.SIGINT)  # Lightning's graceful shutdown: the run folder stays whole
                    try:
                        process.wait(timeout=120)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
                    break
        if not pruned:
            pruned = self.report(trial, run_dir, offset, reported, complete_only=False)
        if pruned:
            last = max(reported)
            raise optuna.TrialPruned(f"{MONITOR} {reported[last]:.4f} at epoch {last - offset} of {run_dir} is below "
                                     f"the median of earlier trials")
        if process.returncode != 0:
            lines = [line for line in (run_dir / "train.log").read_text(errors="replace").splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("train.py: error") or "Error:" in line]
            last = (errors or lines or [f"exit status {process.returncode}, nothing logged"])[-1]
            if last.startswith(NON_FINITE):  # these values diverge: a bad trial, pruned (TPE learns from it)
                raise optuna.TrialPruned(f"diverged in {run_dir}: {last[len(NON_FINITE):].strip()[:200]}")
            self.failures_in_a_row += 1
            tail = "\n".join(lines[-15:])
            if self.failures_in_a_row >= 3:
                raise SweepError(f"three trials in a row failed; the last one's log ({run_dir / 'train.log'}):\n{tail}")
            raise RunFailed(f"{run_dir.name}: {last[:300]} (see {run_dir / 'train.log'}; the command is in "
                            f"command.txt)\n{tail}")
        metrics = read_metrics(run_dir / "logs")
        if not metrics.get(MONITOR):
            raise RunFailed(f"{run_dir} logged no {MONITOR}: the preset must validate (check_val_every_n_epoch)")
        last = max(metrics[MONITOR])
        test = metrics.get("test@best_val", {}).get(last, float("nan"))
        return metrics[MONITOR][last], test

    def report(self, trial: optuna.Trial, run_dir: Path, offset: int, reported: Dict[int, float],
               complete_only: bool) -> bool:
        """Reports the run's new epochs to the trial; True when the pruner stops the trial."""
        for epoch, value in sorted(best_so_far(run_dir, complete_only).items()):
            if offset + epoch not in reported:
                reported[offset + epoch] = value
                trial.report(value, offset + epoch)
                if self.args.prune and trial.should_prune():
                    return True
        return False


def _prepare_run() -> None:
    """In the trial's child, before exec. SIGINT back to its default, so the run stops when pruned even when the
    sweep was started in the background (a shell starts background jobs with SIGINT ignored, and an ignored
    signal stays ignored across exec). On Linux, SIGTERM when the sweep's process dies (killed or crashed), so no
    run trains on unwatched after a sweep is stopped (Lightning ends on SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def write_best(study: optuna.Study, args: argparse.Namespace, passthrough: List[str], out: Path) -> None:
    """The best trial's settings as a preset (``train.py fit --print_config``), written whole or not at all."""
    best = study.best_trial
    _, text = resolved_config(args.config, [*passthrough, *as_arguments(best.params)])
    done = finished(study)
    test = best.user_attrs.get("test@best_val")
    header = [f"# Tuned by python -m difformer_lightning.sweep: study {study.study_name!r} ({args.storage}),",
              f"# trial {best.number}, the best of {done} finished; from {args.config}"
              + (f" with {shlex.join(passthrough)}" if passthrough else "") + ".",
              f"# Objective: mean {MONITOR} over {len(parse_average_over(args.average_over))} run(s) "
              f"({', '.join(args.average_over) or 'one run'}): {best.value:.4f}"
              + (f"; their mean test@best_val {test:.4f} (not used to select)." if test is not None else "."),
              "# Tuned: " + ", ".join(f"{name}={value!r}" for name, value in best.params.items()) + "."]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "w") as handle:
        handle.write("\n".join(header) + "\n" + text)


def progress_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, total: int) -> str:
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    if trial.state == TrialState.FAIL:
        value = trial.user_attrs.get("error", "the sweep's process stopped")
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f"{trial.intermediate_values[step]:.4f} at step {step}"
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no trial completed yet"
    return (f"[sweep {study.study_name}] trial {trial.number} {trial.state.name.lower()}: {value} | "
            f"{finished(study)}/{total} finished, {best}")


def main(argv: Optional[Sequence[str]] = None) -> optuna.Study:
    parser = argparse.ArgumentParser(prog="python -m difformer_lightning.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the preset every trial starts from")
    parser.add_argument("--space", required=True, help="the search space (YAML), see above")
    parser.add_argument("--trials", type=int, required=True, help="finished trials the study should have")
    parser.add_argument("--study", help="the study's name (default: <preset>-<space>)")
    parser.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///<runs-dir>/<study>.db)")
    parser.add_argument("--runs-dir", default="runs/sweeps", help="where trials' run folders go")
    parser.add_argument("--best-out", help="the tuned preset (default: <runs-dir>/<study>/best.yaml)")
    parser.add_argument("--average-over", action="append", default=[], metavar="OPTION=V1,V2",
                        help="run each trial once per value (several: every combination) and average")
    parser.add_argument("--no-prune", dest="prune", action="store_false", help="run every trial to its end")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="do not start a new study with the preset's own values as its first trial")
    parser.add_argument("--prune-after-trials", type=int, default=5, help="trials finished before any is pruned")
    parser.add_argument("--prune-warmup-epochs", type=int, default=10, help="epochs of a run before it is pruned")
    parser.add_argument("--sampler-seed", type=int, help="TPE's seed (leave unset when processes share a study)")
    parser.add_argument("--heartbeat", type=float, default=60.0,
                        help="seconds between a running trial's heartbeats; a trial silent for twice that is rerun")
    parser.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    args, passthrough = parser.parse_known_args(argv)
    stray = [arg for arg in passthrough if arg.startswith("--") and not arg.startswith(("--model", "--data",
                                                                                         "--trainer", "--seed_everything",
                                                                                         "--optimizer", "--lr_scheduler",
                                                                                         "--checkpoint", "--predictions"))]
    if stray:
        parser.error(f"unknown option {stray[0]}: the sweep's own options are listed by --help; train.py options "
                     f"start with --model, --data, --trainer, --seed_everything, --optimizer, --lr_scheduler")
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial, below, instead of Optuna's
    # Ctrl-C or kill -INT stops the sweep resumably, also when a shell started it in the background (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        space = load_space(Path(args.space))
        args.study = args.study or f"{Path(args.config).stem}-{Path(args.space).stem}"
        args.storage = args.storage or f"sqlite:///{Path(args.runs_dir) / (args.study + '.db')}"
        best_out = Path(args.best_out or Path(args.runs_dir) / args.study / "best.yaml")
        repeats = parse_average_over(args.average_over)
        # every value checked by train.py before any trial: each bound, each choice (one probe per choice of the
        # longest list, at least two: low, then high), the repeated values
        probes = max([2] + [len(d.choices) for d in space.values() if isinstance(d, CategoricalDistribution)])
        for k in range(probes):
            probe = {name: (d.choices[k % len(d.choices)] if isinstance(d, CategoricalDistribution)
                            else d.low if k % 2 == 0 else d.high) for name, d in space.items()}
            config, _ = resolved_config(args.config, [*passthrough, *as_arguments(probe),
                                                      *as_arguments(repeats[k % len(repeats)])])
        # TPE samples at random for its first trials (Optuna's default: 10); a small budget keeps a quarter
        study = open_study(args.study, args.storage, higher_is_better(config), args.heartbeat,
                           args.prune_after_trials, args.prune_warmup_epochs, args.sampler_seed,
                           startup=min(10, max(3, args.trials // 4)))
    except SweepError as error:
        print(f"sweep: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    sweep = Sweep(args, passthrough, space, repeats, config)
    state = {"best": None}

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        print(progress_line(study, trial, args.trials), flush=True)
        try:
            best = study.best_trial.number
        except ValueError:
            return
        if best != state["best"]:
            state["best"] = best
            write_best(study, args, passthrough, best_out)

    if args.baseline and not study.get_trials(deepcopy=False):
        # the first trial is the preset as it is, for the options whose preset value the space holds (the others are
        # sampled, and said so): then the tuned preset is never worse on validation than the start
        preset, _ = resolved_config(args.config, passthrough)
        params = baseline_params(preset, space)
        if params:
            study.enqueue_trial(params, user_attrs={"baseline": True})
            outside = [name for name in space if name not in params]
            print(f"[sweep {args.study}] trial 0 is the preset's own values" +
                  (f"; outside the space, sampled instead: {', '.join(outside)}" if outside else ""), flush=True)
    done = finished(study)
    print(f"[sweep {args.study}] {args.storage}: {done}/{args.trials} trials finished; runs under "
          f"{Path(args.runs_dir) / args.study}", flush=True)
    if done < args.trials:
        try:
            study.optimize(sweep.objective, catch=(RunFailed,), gc_after_trial=True,
                           callbacks=[optuna.study.MaxTrialsCallback(args.trials, states=FINISHED), after_trial])
        except SweepError as error:
            print(f"sweep: error: {error}", file=sys.stderr)
            raise SystemExit(1)
        except KeyboardInterrupt:
            # Optuna marks the interrupted trial failed; it is queued again, so resuming reruns its parameters
            if sweep.current is not None:
                number, params = sweep.current
                study.enqueue_trial(params, user_attrs={"rerun_of": number})
            print(f"[sweep {args.study}] interrupted: {finished(study)}/{args.trials} trials finished are kept in "
                  f"{args.storage}; the same command resumes" + (f" (trial {sweep.current[0]} runs again)"
                                                                  if sweep.current else ""),
                  file=sys.stderr, flush=True)
            raise SystemExit(130)
    try:
        study.best_trial
    except ValueError:
        print(f"sweep: error: no trial of {args.study!r} completed", file=sys.stderr)
        raise SystemExit(1)
    write_best(study, args, passthrough, best_out)  # again: its header counts the trials finished by now
    print(f"[sweep {args.study}] best: trial {study.best_trial.number}, {study.best_value:.4f}; preset {best_out}",
          flush=True)
    importance = write_importance(study, best_out.parent / "importance.json")
    if importance:
        print(f"[sweep {args.study}] importance (Optuna's fANOVA, share of the objective's variance): "
              + ", ".join(f"{name} {value:.2f}" for name, value in importance.items()), flush=True)
    return study


def write_importance(study: optuna.Study, out: Path) -> Dict[str, float]:
    """Each option's share of the objective's variance over the completed trials (Optuna's
    ``get_param_importances``, fANOVA), written to ``out`` as JSON; empty below 4 completed trials."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 4:
        return {}
    try:
        importance = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # e.g. every trial with the same value
        return {}
    importance = {name: float(value) for name, value in importance.items()}
    with atomic_file(out, "w") as handle:
        json.dump({"study": study.study_name, "completed_trials": len(complete), "importance": importance}, handle,
                  indent=1)
    return importance


if __name__ == "__main__":
    main()
