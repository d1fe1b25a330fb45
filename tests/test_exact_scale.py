"""Exact evaluation at ogbn-papers100M's scale: products past 2**31 elements, statistics in bounded memory,
the scratch folder's faults, reading only the nodes a loop needs, predictions of chosen nodes, progress."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import logged_epochs, scaled_timeout
from datamodules import GraphStore, RandomPartitionDataModule
from datamodules.store import write_store_from_data
from datamodules.synthetic import write_synthetic_store
from difformer_lightning import DIFFormer, NodeClassifier, NormalizedGraph
from difformer_lightning import graph as graph_module
from difformer_lightning.attention import LinearAttentionStats
from difformer_lightning.graph import gcn_degree
from difformer_lightning.streaming import (STATISTICS_GROUPS, ArraySpec, Collectives, PassProgress, Scratch,
                                           ScratchError, chunk_groups, exact_states, layerwise_inference,
                                           layout_bytes, rank_groups, scratch_layout)
from test_exact import CLASSES, FEATURES, NUM_NODES, awkward_graph

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}


# --- the graph term past 2**31 elements ------------------------------------------------------------------

def dense_normalized(source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """A^ = D^-1/2 (A + I) D^-1/2 of an edge list without self loops, as a dense float64 matrix: the degree
    counts in-edges plus the self loop, the weights multiply the normalised values (DIFFORMER.md section 1)."""
    adjacency = torch.zeros(size, size, dtype=torch.float64)
    adjacency.index_put_((target, source), weight.double(), accumulate=True)
    degree = torch.bincount(target, minlength=size).double() + 1
    scale = degree.pow(-0.5)
    return scale[:, None] * (adjacency + torch.eye(size, dtype=torch.float64)) * scale[None, :]


@pytest.mark.parametrize("width", [16, 128, 256])
def test_graph_term_is_right_for_sources_past_2_31_elements(tmp_path, width):
    """A closed component at the top of the id range of a graph whose value array [N, 1, width] passes 2**31
    elements (torch's CPU kernel segfaults or, at width 128, sums wrong values there): the graph term of its
    rows, read from the memory-mapped array (sparse files: only the component's rows are ever written) and in
    the gathered form, equals a dense float64 computation."""
    top = 40
    num_nodes = 2**31 // width + top
    start = num_nodes - top  # every component row r has r * width >= 2**31
    generator = torch.Generator().manual_seed(width)
    pairs = torch.randint(top, (2, 300), generator=generator)
    pairs = pairs[:, pairs[0] != pairs[1]]
    weight = torch.rand(pairs.size(1), generator=generator) + 0.5
    order = torch.sort(pairs[1], stable=True).indices  # a store's rows: sorted by target
    source, target, weight = pairs[0][order] + start, pairs[1][order], weight[order]
    values = np.lib.format.open_memmap(tmp_path / "value.npy", "w+", np.float32, (num_nodes, 1, width))
    rows = torch.randn(top, 1, width, generator=generator)
    values[start:] = rows.numpy()
    degrees = np.lib.format.open_memmap(tmp_path / "degree.npy", "w+", np.float32, (num_nodes,))
    degrees[start:] = gcn_degree(source, target, top, start).float().pow(-0.5).numpy()
    expected = dense_normalized(source - start, target, weight, top) @ rows[:, 0].double()
    inv_sqrt = torch.from_numpy(degrees)
    row_pointer = torch.zeros(top + 1, dtype=torch.long)
    row_pointer[1:] = torch.cumsum(torch.bincount(target, minlength=top), 0)
    for gather_to in (None, torch.device("cpu")):
        # the edge-list form (GAT's) and the CSR row form the pass uses for the graph term
        block, ids = NormalizedGraph.rows(source, target, weight, inv_sqrt, start, top, gather_to)
        operand = torch.from_numpy(values) if ids is None else torch.from_numpy(values[ids.numpy()])
        torch.testing.assert_close(block.propagate(operand)[:, 0].double(), expected, rtol=1e-5, atol=1e-5)
        block, ids = NormalizedGraph.row_block(row_pointer, source.int(), weight, inv_sqrt, start, False, gather_to)
        operand = torch.from_numpy(values) if ids is None else torch.from_numpy(values[ids.numpy()])
        got = block.propagate(operand, rows)[:, 0]
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def awkward_store(tmp_path_factory):
    data = awkward_graph()
    return data, GraphStore.open(write_store_from_data(data, tmp_path_factory.mktemp("awkward") / "store"))


@pytest.mark.parametrize("kernel, heads", [("simple", 1), ("simple", 4), ("gcn", 2), ("gat", 1)])
def test_exact_pass_with_products_in_blocks_equals_the_in_memory_forward(awkward_store, tmp_path, monkeypatch,
                                                                        kernel, heads):
    """With the offset limit lowered to 97 elements every graph-term product runs in blocks of 2 or 3 source
    rows (the code path of graphs past 2**31): the exact pass in both forms, and the training forward and
    backward, equal the unsplit computation."""
    data, store = awkward_store
    torch.manual_seed(0)
    model = DIFFormer(FEATURES, 8, CLASSES, num_layers=2, num_heads=heads, kernel=kernel).eval()
    with torch.no_grad():
        expected = model(data.x, data.edge_index, data.edge_weight)
    training = DIFFormer(FEATURES, 8, CLASSES, num_layers=2, num_heads=heads, kernel=kernel)

    def forward_backward():
        training.zero_grad()
        out = training(data.x, data.edge_index, data.edge_weight)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in training.parameters() if p.grad is not None]

    whole_out, whole_grads = forward_backward()
    monkeypatch.setattr(graph_module, "DENSE_OFFSET_LIMIT", 97)
    for gather in (False, True):
        got = layerwise_inference(model, store, chunk_nodes=7, workdir=tmp_path, gather=gather)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    split_out, split_grads = forward_backward()
    torch.testing.assert_close(split_out, whole_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(split_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# --- statistics in bounded memory, the same for any number of ranks --------------------------------------

def test_chunk_groups_depend_on_the_number_of_chunks_only():
    for num_chunks in (0, 3, 64, 65, 11_106):
        groups = chunk_groups(num_chunks)
        assert len(groups) == STATISTICS_GROUPS
        assert [index for group in groups for index in group] == list(range(num_chunks))
        sizes = [len(group) for group in groups]
        assert max(sizes) - min(sizes) <= 1
        for world in (1, 2, 3, 8):
            mine = [rank_groups(num_chunks, rank, world) for rank in range(world)]
            assert sorted(index for groups_of_rank in mine for index, _ in groups_of_rank) == list(range(64))


@pytest.mark.slow
def test_statistics_memory_is_the_same_for_20_and_2000_chunks(tmp_path):
    """The table all-reduced per layer has 64 rows whatever the number of chunks, and the pass's peak memory
    does not grow with it (one row per chunk would add 2,000 x 16,899 x 8 bytes = 270 MB here)."""
    store = write_synthetic_store(tmp_path / "store", 2000, num_classes=3, seed=1)
    shapes = {}
    for chunk in (100, 1):  # 20 and 2,000 chunks
        recorded = []

        def all_reduce(tensor, recorded=recorded):
            recorded.append((tuple(tensor.shape), tensor.dtype))
            return tensor

        torch.manual_seed(0)
        model = DIFFormer(64, 64, 3, num_layers=2, num_heads=4).eval()
        scratch = Scratch(tmp_path, Collectives(all_reduce=all_reduce))
        exact_states(model, GraphStore.open(store), chunk, scratch)
        scratch.close()
        shapes[chunk] = recorded
    assert shapes[100] == shapes[1] == [((STATISTICS_GROUPS, 4 * 64 * 66 + 3), torch.float64)] * 2
    script = textwrap.dedent(f"""
        import resource, torch
        from datamodules import GraphStore
        from difformer_lightning import DIFFormer
        from difformer_lightning.streaming import Scratch, exact_states
        store = GraphStore.open({str(store)!r})
        model = DIFFormer(64, 64, 3, num_layers=2, num_heads=4).eval()
        peaks = []
        for chunk in (100, 1):
            scratch = Scratch({str(tmp_path)!r})
            exact_states(model, store, chunk, scratch)
            scratch.close()
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(peaks[1] - peaks[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=scaled_timeout(120))
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 60, "peak memory grew with the number of chunks (MB)"


def test_node_count_is_exact():
    zeros = torch.zeros(1, 2, 1, 3)
    stats = LinearAttentionStats.of(zeros, zeros, zeros, num_nodes=torch.tensor([111_059_956]))
    again = stats.unflatten(stats.flatten()).to(torch.float32)
    assert again.num_nodes.dtype == torch.float64 and int(again.num_nodes) == 111_059_956
    assert float(torch.tensor(111_059_956, dtype=torch.float32)) == 111_059_952  # what float32 held


@pytest.mark.slow
def test_ranks_are_bitwise_equal_when_groups_hold_several_chunks(tmp_path):
    """1,003 nodes in chunks of 7: 144 chunks in 64 groups of 2 or 3; 1, 2 and 4 ranks (the bitwise check of
    tests/test_exact.py with fewer chunks than groups, one rank without a chunk, is the other case)."""
    store = write_synthetic_store(tmp_path / "store", 1003, num_classes=3, seed=3)
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    for world in (1, 2, 4):
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "exact_ranks.py"), str(store),
                               str(tmp_path / f"world{world}"), str(world), "7", "simple", "gcn"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=scaled_timeout(20 * world))
        assert done.returncode == 0, done.stderr[-3000:]
    for kernel in ("simple", "gcn"):
        one = np.load(tmp_path / f"world1-{kernel}.npy")
        for world in (2, 4):
            assert np.array_equal(one, np.load(tmp_path / f"world{world}-{kernel}.npy")), (kernel, world)


# --- storage in the run's precision ------------------------------------------------------------------------

def test_sixteen_bit_storage_halves_the_scratch_and_stays_close(awkward_store, tmp_path):
    data, store = awkward_store
    torch.manual_seed(0)
    model = DIFFormer(FEATURES, 8, CLASSES, num_layers=3, num_heads=2).eval()
    full, half = scratch_layout(model, NUM_NODES), scratch_layout(model, NUM_NODES, torch.bfloat16)
    assert layout_bytes({k: v for k, v in half.items() if k != "inv_sqrt_degree"}) * 2 == \
        layout_bytes({k: v for k, v in full.items() if k != "inv_sqrt_degree"})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.diffuse(data.x, data.edge_index, data.edge_weight)[-1].float()
        scratch = Scratch(tmp_path)
        states = exact_states(model, store, 7, scratch, storage=torch.bfloat16)
        got = states.rows(slice(0, NUM_NODES))
    assert scratch.arrays["h"].dtype == np.uint16 and scratch.arrays["value"].dtype == np.uint16  # bf16 words
    # the states pass through bfloat16 between layers (8 bits of mantissa)
    torch.testing.assert_close(got, expected, rtol=3e-2, atol=3e-2)
    scratch.close()


# --- the scratch folder: created at the first pass, checked before, cleaned after -------------------------

def test_scratch_check_names_the_folder_the_bytes_needed_and_free(tmp_path, monkeypatch):
    layout = {"h": ArraySpec((1000, 16), torch.float32)}
    missing = Scratch(tmp_path / "absent")
    with pytest.raises(ScratchError, match=r"data.scratch_dir .*absent does not exist.*64,000 bytes \(64.0 kB\)"):
        missing.check(layout)
    import difformer_lightning.streaming as streaming
    monkeypatch.setattr(streaming, "free_bytes", lambda folder: 1000)
    with pytest.raises(ScratchError, match=r"data.scratch_dir .* has 1,000 bytes \(1.0 kB\) free, but exact "
                                           r"evaluation needs 64,000 bytes"):
        Scratch(tmp_path).check(layout)
    unset = Scratch(None)
    assert "unset: the system's temporary folder" in unset.problem({"h": ArraySpec((10**15, 16), torch.float32)})


def _namespace_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, text=True)
    return probe.returncode == 0


needs_namespace = pytest.mark.skipif(not _namespace_works(),
                                     reason="needs `unshare --user --mount` to mount a small or read-only file system")


def in_namespace(setup: str, command, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``command`` (a list) in a user and mount namespace after the shell lines ``setup`` (mounts that
    vanish with the namespace)."""
    script = setup + "\nexec \"$@\""
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-ec", script, "sh", *command],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    # half the nodes unlabelled (papers100M: 98.6%)
    return write_synthetic_store(tmp_path_factory.mktemp("small") / "csbm", 1003, num_classes=3, seed=3,
                                 split=(0.3, 0.1, 0.1))


def fit_command(store: Path, run_dir: Path, scratch_dir: Path, *extra) -> list:
    return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "synthetic_partition.yaml"),
            "--data.init_args.store", str(store), "--data.init_args.batch_size", "300",
            "--data.init_args.num_workers", "0", "--data.init_args.scratch_dir", str(scratch_dir),
            "--model.encoder.init_args.hidden_channels", "16", "--model.encoder.init_args.num_layers", "2",
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", *extra]


def assert_refused_before_training(done: subprocess.CompletedProcess, run_dir: Path, *patterns: str) -> None:
    assert done.returncode != 0 and done.returncode != -signal.SIGBUS and done.returncode != 135
    tail = done.stderr[-3000:]
    assert "ScratchError" in tail and "data.scratch_dir" in tail and "bytes" in tail, tail
    for pattern in patterns:
        assert pattern in tail, (pattern, tail)
    assert not list(run_dir.rglob("*.ckpt"))
    assert not any("train/loss" in row for row in logged_epochs(run_dir).values()) if (run_dir / "logs").exists() else True


@pytest.mark.slow
def test_a_missing_scratch_folder_is_refused_before_the_first_step(tmp_path, small_store):
    run_dir = tmp_path / "run"
    done = subprocess.run(fit_command(small_store, run_dir, tmp_path / "no-such-folder"), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=scaled_timeout(60))
    assert_refused_before_training(done, run_dir, "does not exist", "no-such-folder")


@needs_namespace
@pytest.mark.slow
def test_a_full_or_read_only_scratch_folder_is_refused_before_the_first_step(tmp_path, small_store):
    full, read_only = tmp_path / "full", tmp_path / "read-only"
    full.mkdir(), read_only.mkdir()
    # a 64 KiB file system filled to the last block, and a read-only bind mount
    setup = (f"mount -t tmpfs -o size=64k tmpfs {full}\n"
             f"dd if=/dev/zero of={full}/filler bs=4k count=64 2>/dev/null || true\n"
             f"mount --bind {read_only} {read_only}\nmount -o remount,bind,ro {read_only}")
    done = in_namespace(setup, fit_command(small_store, tmp_path / "run-full", full), scaled_timeout(60))
    assert_refused_before_training(done, tmp_path / "run-full", "has 0 bytes", "free, but exact evaluation needs")
    done = in_namespace(setup, fit_command(small_store, tmp_path / "run-ro", read_only), scaled_timeout(60))
    assert_refused_before_training(done, tmp_path / "run-ro", "cannot be written", "Read-only file system")


@needs_namespace
@pytest.mark.slow
def test_a_file_system_that_fills_up_before_the_first_pass_gives_an_error_not_sigbus(tmp_path):
    """The checked space is gone when the pass creates its arrays: their blocks are reserved at creation, so
    the pass stops with a ScratchError naming the space, where writing into unreserved pages of a full file
    system killed the process with SIGBUS."""
    small = tmp_path / "small"
    small.mkdir()
    script = textwrap.dedent(f"""
        import torch
        from difformer_lightning.streaming import ArraySpec, Scratch, ScratchError
        scratch = Scratch({str(small)!r})
        layout = {{"h": ArraySpec((100_000, 16), torch.float32)}}  # 6.4 MB on a 1 MB file system
        try:
            arrays = scratch.get(layout)
            arrays["h"][:] = 1.0
            print("written")
        except ScratchError as error:
            print("refused:", error)
        scratch.close()
    """)
    done = in_namespace(f"mount -t tmpfs -o size=1m tmpfs {small}", [sys.executable, "-c", script], scaled_timeout(60))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "refused:" in done.stdout and "needs 6,400,000 bytes (6.4 MB)" in done.stdout and "free, but" in done.stdout, done.stdout


def _scratch_holder(folder: Path, action: str) -> subprocess.Popen:
    """A process that creates a scratch folder under ``folder``, prints it, then kills itself (``'die'``) or
    waits on stdin (``'hold'``)."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from difformer_lightning.streaming import ArraySpec, Scratch
        scratch = Scratch({str(folder)!r})
        scratch.get({{"h": ArraySpec((1000, 8), torch.float32)}})
        print(scratch.folder, flush=True)
        if {action!r} == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_runs_scratch_is_removed_by_the_next_start_and_a_live_ones_kept(tmp_path, small_store):
    scratch_dir = tmp_path / "scratch"
    scratch_dir.mkdir()
    dead = _scratch_holder(scratch_dir, "die")
    dead_folder = Path(dead.stdout.readline().strip())
    assert dead.wait(timeout=scaled_timeout(30)) == -signal.SIGKILL and dead_folder.is_dir()
    live = _scratch_holder(scratch_dir, "hold")
    try:
        live_folder = Path(live.stdout.readline().strip())
        run_dir, watch = tmp_path / "run", tmp_path / "scratch-at-first-step.json"
        done = subprocess.run(fit_command(small_store, run_dir, scratch_dir, "--trainer.num_sanity_val_steps", "0",
                                          "--trainer.callbacks+=cli_helpers.ScratchWatcher",
                                          "--trainer.callbacks.scratch_dir", str(scratch_dir),
                                          "--trainer.callbacks.out", str(watch)),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=scaled_timeout(60))
        assert done.returncode == 0, done.stderr[-3000:]
        output = done.stdout + done.stderr
        assert f"removed {dead_folder}" in output and "no longer running" in output
        assert not dead_folder.exists() and live_folder.is_dir()
        # no scratch of this run before its first evaluation (the first training step)...
        assert sorted(json.loads(watch.read_text())) == [live_folder.name]
        # ...its pass reported its progress without a terminal, and its folder is gone at exit
        assert "exact pass: 2 layers over 1,003 nodes" in output and "exact pass: done in" in output
        assert sorted(path.name for path in scratch_dir.iterdir()) == [live_folder.name]
    finally:
        live.stdin.close()
        live.wait(timeout=scaled_timeout(30))
    assert not live_folder.exists()


def test_progress_reports_stage_chunks_rate_and_time_left(awkward_store, tmp_path):
    _, store = awkward_store
    lines = []
    model = DIFFormer(FEATURES, 8, CLASSES, num_layers=2).eval()
    scratch = Scratch(tmp_path)
    exact_states(model, store, 7, scratch, progress=PassProgress(report=lines.append, interval=0.0))
    folder = scratch.folder
    scratch.close()
    assert folder is not None and folder.parent == tmp_path
    assert lines[0] == ("exact pass: 2 layers over 29 nodes in 5 chunks; this process streams 5 chunks (29 nodes); "
                        f"scratch {layout_bytes(scratch_layout(model, 29)) / 1e9:,.3f} GB in {folder}")
    assert any(line.startswith("exact pass: encoding, 5/5 chunks;") for line in lines)
    assert any(line.startswith("exact pass: layer 2/2, states, 3/5 chunks;") and "nodes/s" in line and "left" in line
               for line in lines)
    assert lines[-1].startswith("exact pass: done in")


# --- read only the nodes a loop needs; predictions of chosen nodes ----------------------------------------

def visited(loader) -> torch.Tensor:
    return torch.cat([batch.n_id for batch in loader])


def test_evaluation_loops_read_only_their_split_nodes(small_store, tmp_path):
    ids = torch.tensor([5, 1002, 0, 17])
    np.save(tmp_path / "ids.npy", ids.numpy())
    data = RandomPartitionDataModule(str(small_store), batch_size=300, num_workers=0, predict_nodes=str(tmp_path / "ids.npy"))
    store = data.store
    data.evaluation_plan(DIFFormer(store.num_features, 8, store.num_classes))
    labelled = torch.sort(torch.cat([store.train_idx, store.val_idx, store.test_idx])).values
    assert labelled.numel() < store.num_nodes
    assert torch.equal(visited(data.val_dataloader()), labelled)
    assert torch.equal(visited(data.test_dataloader()), torch.sort(store.test_idx).values)
    assert torch.equal(visited(data.predict_dataloader()), torch.sort(ids).values)
    assert torch.equal(data.prediction_nodes, ids)  # rows in the file's order
    everything = RandomPartitionDataModule(str(small_store), batch_size=300, num_workers=0)
    everything.evaluation_plan(DIFFormer(store.num_features, 8, store.num_classes))
    assert torch.equal(visited(everything.predict_dataloader()), torch.arange(store.num_nodes))
    # by partition every batch is every node's context: all nodes are visited
    by_batches = RandomPartitionDataModule(str(small_store), batch_size=300, num_workers=0, evaluation="partition")
    by_batches.evaluation_plan(DIFFormer(store.num_features, 8, store.num_classes))
    assert torch.equal(visited(by_batches.val_dataloader()), torch.arange(store.num_nodes))


def test_bad_prediction_node_files_are_named(small_store, tmp_path):
    for name, content, message in (("dup.txt", "3\n7\n3\n", "holds node id 3 more than once"),
                                   ("far.txt", "3\n1003\n", "holds node id 1003, but the graph's ids are 0 .. 1002"),
                                   ("neg.txt", "-1\n", "holds node id -1"),
                                   ("empty.txt", "", "holds no node id")):
        path = tmp_path / name
        path.write_text(content)
        data = RandomPartitionDataModule(str(small_store), batch_size=300, num_workers=0, predict_nodes=str(path))
        with pytest.raises(ValueError, match=message):
            data.prediction_nodes
    np.save(tmp_path / "floats.npy", np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="float64 array of shape .2.: give a 1-D array of integer node ids"):
        RandomPartitionDataModule(str(small_store), batch_size=300,
                                  predict_nodes=str(tmp_path / "floats.npy")).prediction_nodes
    with pytest.raises(ValueError, match="neither 'all', 'train', 'val', 'test', 'labelled' nor an existing file"):
        RandomPartitionDataModule(str(small_store), predict_nodes="validation")


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.slow
def test_predictions_of_chosen_nodes_and_metrics_from_split_reads(tmp_path, small_store, ranks):
    """A fit whose evaluation reads only labelled nodes logs the metrics of the offline full-graph forward;
    `predict` writes all rows, the test split's or a file's (in its order), equal to that forward's rows."""
    store = GraphStore.open(small_store)
    run_dir, scratch_dir = tmp_path / "run", tmp_path / "scratch"
    scratch_dir.mkdir()
    ddp = ["--trainer.devices", str(ranks), "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"] if ranks > 1 else []
    common = fit_command(small_store, run_dir, scratch_dir)[3:]  # the options after `fit`
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *common, "--trainer.max_epochs", "2", *ddp],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=scaled_timeout(40 * ranks))
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    model = NodeClassifier.load_from_checkpoint(checkpoint).eval()
    source, target, _ = store.in_edges(0, store.num_nodes)
    with torch.no_grad():
        logits = model.encoder(store.x.float(), torch.stack([source, target]))
    last = logged_epochs(run_dir)[1]
    for split in ("train", "val", "test"):
        index = getattr(store, f"{split}_idx")
        accuracy = (logits[index].argmax(dim=1) == store.y[index].long()).float().mean().item()
        assert last[f"{split}/acc"] == pytest.approx(accuracy, abs=1e-6), split
    ids = torch.tensor([999, 3, 512, 40, 0])
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids.tolist())))
    predictions = run_dir / "predictions"
    for choice, nodes in ((None, None), ("test", torch.sort(store.test_idx).values), (str(tmp_path / "ids.txt"), ids)):
        option = [] if choice is None else ["--data.init_args.predict_nodes", choice]
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), "predict", *common, "--ckpt_path",
                               str(checkpoint), "--predictions.embeddings", "true", *option, *ddp], cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=scaled_timeout(40 * ranks))
        assert done.returncode == 0, done.stderr[-3000:]
        written = np.load(predictions / "logits.npy")
        if nodes is None:
            np.testing.assert_allclose(written, logits.numpy(), rtol=1e-5, atol=1e-5)
            assert not (predictions / "node_ids.npy").exists()
        else:
            assert np.array_equal(np.load(predictions / "node_ids.npy"), nodes.numpy())
            np.testing.assert_allclose(written, logits[nodes].numpy(), rtol=1e-5, atol=1e-5)
            assert np.load(predictions / "embeddings.npy").shape == (nodes.numel(), 16)
