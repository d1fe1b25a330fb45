"""An on-disk graph that every process maps instead of loading: CSR, features, labels, splits.

A store is a directory of ``.npy`` arrays and a ``meta.json``:

* ``rowptr`` int64 ``[N + 1]`` and ``col`` (int32 while N < 2**31, else int64) ``[E]``: the
  *incoming* edges of every node, so ``col[rowptr[i]:rowptr[i + 1]]`` are the sources of the
  messages node ``i`` receives (for an undirected graph, its neighbours); duplicate edges and self
  loops are kept as given;
* optionally ``edge_weight`` float32 ``[E]``, the weight of each entry of ``col``;
* ``x`` float16 or float32 ``[N, F]``; ``y`` int32 ``[N]`` (``-1`` = unlabelled) or uint8
  ``[N, T]`` for multi-label data;
* ``train_idx``, ``val_idx``, ``test_idx`` int64, and ``split`` uint8 ``[N]`` (0 none, 1 train,
  2 val, 3 test) so a batch finds its nodes' splits without a search.

Arrays are opened with ``numpy.load(mmap_mode="r")``: nothing is copied into process memory,
and all processes on a machine (DDP ranks, DataLoader workers) share one copy in the page
cache. Read-only, shared mappings: a private copy-on-write one (``mmap_mode="c"``) is charged against the
kernel's commit limit at its full size, and the papers100M rehearsal's 28 GB feature file could not be
mapped that way on a 24 GB host (``OSError: [Errno 12] Cannot allocate memory``). The tensors are read-only:
nothing in the project writes into a store's arrays (a write would fault, not change the file). Writers build the directory under a temporary name and rename it when complete (replacing a
store swaps the directories atomically), so an interrupted conversion never leaves a store that opens
and the path always holds a complete store.
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from difformer_lightning.contracts import SPLITS
from difformer_lightning.graph import edge_targets

from difformer_lightning.io import atomic_file, read_only_tensor
from difformer_lightning.progress import Progress

from .csr import count_self_loops, write_csr
from .validation import FEATURE_LIMIT, check_finite_features, check_labels, check_split_sizes

FORMAT = "difformer-graph-store"
VERSION = 1
# The per-node split code of the ``split`` array: 0 for no split, then 1, 2, 3 in the order of SPLITS.
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS, start=1)}
_CHECK_CHUNK = 1 << 24  # elements per chunk when validating, to bound memory


class StoreError(ValueError):
    """A graph store is missing, incomplete or inconsistent."""


@dataclass
class GraphStore:
    """A memory-mapped graph store; see the module docstring for the layout."""

    path: Path
    meta: dict
    rowptr: Tensor
    col: Tensor
    x: Tensor
    y: Tensor
    split: Tensor
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor
    edge_weight: Optional[Tensor] = None

    @property
    def num_nodes(self) -> int:
        return self.meta["num_nodes"]

    @property
    def num_edges(self) -> int:
        return self.meta["num_edges"]

    @property
    def num_features(self) -> int:
        return self.meta["num_features"]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def multilabel(self) -> bool:
        return self.meta["multilabel"]

    @property
    def self_loops(self) -> Optional[int]:
        """Edges from a node to itself, as the full check counted them (``None`` before one ran)."""
        return self.meta.get("self_loops")

    def features(self, start: int, stop: int) -> Tensor:
        """Features of nodes ``start .. stop - 1`` as float32 (:class:`~difformer_lightning.contracts.GraphSource`)."""
        return self.x[start:stop].float()

    def in_rows(self, start: int, stop: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The edges into nodes ``start .. stop - 1`` as stored: ``rowptr[start:stop + 1]``, the sources (the
        memory-mapped ``col`` rows, int32 or int64, not copied) and the weights or ``None``
        (:class:`~difformer_lightning.contracts.GraphSource`). Reads only those CSR rows."""
        begin, end = int(self.rowptr[start]), int(self.rowptr[stop])
        weight = self.edge_weight[begin:end].float() if self.edge_weight is not None else None
        return self.rowptr[start:stop + 1], self.col[begin:end], weight

    def in_edges(self, start: int, stop: int) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The edges into nodes ``start .. stop - 1``: sources (global ids, int64), targets (``- start``),
        weights or ``None``. Reads only those CSR rows."""
        row_pointer, source, weight = self.in_rows(start, stop)
        return source.long(), edge_targets(row_pointer), weight

    @classmethod
    def open(cls, path: Union[str, Path], validate: Union[bool, str] = True) -> "GraphStore":
        """Maps the store at ``path``. Every open checks ``meta.json`` and each array's dtype, shape and size.
        The full check (:func:`validate_store`: it reads every array) runs once: ``validate=True`` (or
        ``'once'``) runs it unless ``meta.json`` records that it passed on these very files (their sizes and
        modification times, :func:`fingerprint`), and records it when it passes (where the folder can be
        written); ``'full'`` runs it whatever is recorded; ``False`` skips it."""
        if validate not in (True, False, "once", "full"):
            raise ValueError(f"validate must be True, False, 'once' or 'full', got {validate!r}")
        path = Path(path)
        meta = read_meta(path)
        arrays = {name: _map_array(path, name, spec) for name, spec in meta["arrays"].items()}
        store = cls(path=path, meta=meta, **{name: read_only_tensor(a) for name, a in arrays.items()})
        if validate == "full" or (validate and meta.get(VALIDATED) != fingerprint(path, meta)):
            store.meta["self_loops"] = validate_store(store)
            record_validated(path, store.meta["self_loops"])
        return store


# meta.json's record of a passed full check: the arrays' sizes and modification times when it passed
VALIDATED = "validated"


def fingerprint(path: Path, meta: dict) -> Dict[str, list]:
    """``{array: [size in bytes, modification time in ns]}`` of the store's array files: what a recorded full
    check is tied to (a file rewritten in place changes its modification time)."""
    status = {name: (path / f"{name}.npy").stat() for name in meta["arrays"]}
    return {name: [entry.st_size, entry.st_mtime_ns] for name, entry in sorted(status.items())}


def record_validated(path: Path, self_loops: int) -> bool:
    """Records in ``path``'s ``meta.json`` (replaced atomically) that the full check passed on the present
    files, with the self loops it counted; False where the folder cannot be written (a read-only store is then
    checked at every open)."""
    meta = json.loads((path / "meta.json").read_text())
    meta[VALIDATED], meta["self_loops"] = fingerprint(path, meta), self_loops
    try:
        with atomic_file(path / "meta.json", "w") as handle:
            handle.write(json.dumps(meta, indent=2) + "\n")
    except OSError:
        return False
    return True


WRITERS = ("datamodules.store.write_store_from_data, datamodules.synthetic.write_synthetic_store or "
           "datamodules.ogb.write_store_from_ogb")
META_KEYS = ("format", "version", "num_nodes", "num_edges", "num_features", "num_classes", "multilabel", "arrays")
REQUIRED_ARRAYS = ("rowptr", "col", "x", "y", "split", "train_idx", "val_idx", "test_idx")
# The dtypes the format allows for each array (the module docstring).
FORMAT_DTYPES = {"rowptr": ("int64",), "col": ("int32", "int64"), "x": ("float16", "float32"),
                 "y": ("int32", "int64", "uint8"), "split": ("uint8",), "train_idx": ("int64",),
                 "val_idx": ("int64",), "test_idx": ("int64",), "edge_weight": ("float32",)}


def read_meta(path: Path) -> dict:
    """``meta.json`` of the store at ``path``, checked against the format: a ``StoreError`` names the file and
    the missing or wrong key (or the JSON error's position in a file cut short)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise StoreError(f"no graph store at {path} (missing meta.json); build one with {WRITERS} (the demo store "
                         f"of configs/synthetic_partition.yaml: python -m datamodules.make_store --out {path} "
                         f"--nodes 1000000)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{meta_path} is not valid JSON ({error}): the file is cut short or damaged; rebuild the "
                         f"store") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_path} holds a {type(meta).__name__}, not an object; rebuild the store")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise StoreError(f"{meta_path} lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}; rebuild "
                         f"the store")
    if meta["format"] != FORMAT or meta["version"] != VERSION:
        raise StoreError(f"{path} is not a version-{VERSION} {FORMAT} (meta says format={meta['format']!r}, "
                         f"version={meta['version']!r})")
    arrays = meta["arrays"]
    lacking = [name for name in REQUIRED_ARRAYS if name not in arrays]
    unknown = [name for name in arrays if name not in FORMAT_DTYPES]
    if lacking or unknown:
        raise StoreError(f"{meta_path}: 'arrays' " + (f"lacks {', '.join(lacking)}" if lacking else "")
                         + ("; " if lacking and unknown else "") + (f"names unknown arrays {', '.join(unknown)}"
                                                                    if unknown else ""))
    for name, spec in arrays.items():
        for key in ("dtype", "shape", "bytes"):
            if key not in spec:
                raise StoreError(f"{meta_path}: arrays.{name} lacks the key {key!r}; rebuild the store")
        if spec["dtype"] not in FORMAT_DTYPES[name]:
            raise StoreError(f"{path / (name + '.npy')} holds {spec['dtype']}, but the store format stores {name} as "
                             f"{' or '.join(FORMAT_DTYPES[name])}; rebuild the store with {WRITERS}")
    return meta


def _map_array(path: Path, name: str, spec: dict) -> np.ndarray:
    file = path / f"{name}.npy"
    if not file.is_file():
        raise StoreError(f"graph store {path} lacks {file.name}")
    if file.stat().st_size != spec["bytes"]:
        raise StoreError(f"{file} has {file.stat().st_size} bytes but meta.json records {spec['bytes']}: the file is "
                         f"truncated or from another store; rebuild the store")
    try:
        array = np.load(file, mmap_mode="r")  # shared and read-only: see the module's docstring
    except ValueError as error:
        raise StoreError(f"{file} is not a readable .npy array ({error}); rebuild the store") from error
    if str(array.dtype) != spec["dtype"] or list(array.shape) != spec["shape"]:
        raise StoreError(f"{file} holds {array.dtype} {list(array.shape)} but meta.json records {spec['dtype']} "
                         f"{spec['shape']}")
    return array


def validate_store(store: GraphStore) -> int:
    """Checks counts, a monotone ``rowptr`` ending at E, column and split ids in range; returns the number of
    self loops (:func:`~datamodules.csr.count_self_loops`, recorded as ``meta.json``'s ``self_loops``: with none,
    the exact pass takes the degrees from ``rowptr`` alone).

    Every check streams over the arrays in chunks, so memory stays bounded; it reads
    rowptr and col twice (seconds for a billion edges).
    """
    n, e = store.num_nodes, store.num_edges
    rowptr, col = store.rowptr, store.col
    if rowptr.numel() != n + 1 or col.numel() != e:
        raise StoreError(f"{store.path}: rowptr has {rowptr.numel()} entries and col {col.numel()}, expected "
                         f"{n + 1} and {e}")
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != e:
        raise StoreError(f"{store.path}: rowptr runs from {int(rowptr[0])} to {int(rowptr[-1])}, expected 0 to {e}")
    for start in range(0, n, _CHECK_CHUNK):
        chunk = rowptr[start:start + _CHECK_CHUNK + 1]
        if (chunk[1:] < chunk[:-1]).any():
            bad = start + int((chunk[1:] < chunk[:-1]).nonzero()[0])
            raise StoreError(f"{store.path}: rowptr decreases at node {bad} ({int(rowptr[bad])} -> "
                             f"{int(rowptr[bad + 1])}); the CSR is corrupt")
    for start in range(0, e, _CHECK_CHUNK):
        chunk = col[start:start + _CHECK_CHUNK]
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= n:
            raise StoreError(f"{store.path}: col holds node ids in [{low}, {high}] near edge {start} but there are "
                             f"{n} nodes")
    for split in SPLITS:
        index = getattr(store, f"{split}_idx")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise StoreError(f"{store.path}: {split}_idx holds ids in [{int(index.min())}, {int(index.max())}] "
                             f"but there are {n} nodes")
    if store.edge_weight is not None:
        if store.edge_weight.shape != (e,):
            raise StoreError(f"{store.path}: edge_weight has shape {tuple(store.edge_weight.shape)}, expected ({e},)")
        for start in range(0, e, _CHECK_CHUNK):
            chunk = store.edge_weight[start:start + _CHECK_CHUNK]
            if not bool(torch.isfinite(chunk).all()):
                bad = start + int((~torch.isfinite(chunk)).nonzero()[0])
                raise StoreError(f"{store.path}: edge_weight holds {float(store.edge_weight[bad])} at edge {bad}; "
                                 f"weights must be finite")
    if store.x.shape != (n, store.num_features) or store.y.size(0) != n or store.split.numel() != n:
        raise StoreError(f"{store.path}: x {tuple(store.x.shape)}, y {tuple(store.y.shape)} and split "
                         f"{tuple(store.split.shape)} do not all have {n} rows")
    _validate_nodes(store)
    return count_self_loops(rowptr, col)


def _validate_nodes(store: GraphStore) -> None:
    """The rules every dataset passes (:mod:`datamodules.validation`): non-empty splits whose per-node codes
    agree with the index arrays, labels of split nodes in range, finite features (read in chunks, unless
    the writer checked them: ``meta.json``'s ``checked``)."""
    sizes = {split: getattr(store, f"{split}_idx").numel() for split in SPLITS}
    check_split_sizes(sizes, str(store.path), StoreError)
    counts = torch.zeros(len(SPLITS) + 1, dtype=torch.long)
    for start in range(0, store.num_nodes, _CHECK_CHUNK):
        counts += torch.bincount(store.split[start:start + _CHECK_CHUNK].long(), minlength=len(SPLITS) + 1)[:4]
    for split, code in SPLIT_CODES.items():
        index = getattr(store, f"{split}_idx")
        codes = store.split[index]
        if counts[code] != index.numel() or bool((codes != code).any()):
            raise StoreError(f"{store.path}: split.npy marks {int(counts[code])} nodes as {split} but {split}_idx.npy "
                             f"lists {index.numel()} (or other ones): the two disagree; rebuild the store")
        for start in range(0, index.numel(), _CHECK_CHUNK):
            nodes = index[start:start + _CHECK_CHUNK]
            check_labels(store.y[nodes], nodes, split, None if store.multilabel else store.num_classes,
                         store.multilabel, str(store.path / "y.npy"), StoreError)
    check_feature_range(store, FEATURE_LIMIT)


def check_feature_range(store: GraphStore, limit: float) -> None:
    """Finite features within ``limit`` (:func:`datamodules.validation.feature_limit`): from what the writer
    recorded (``checked``, ``largest_feature`` in meta.json), else read in chunks."""
    where = str(store.path / "x.npy")
    recorded = store.meta.get("largest_feature")
    if "finite_features" in store.meta.get("checked", ()) and recorded is not None:
        value, node, feature = recorded
        if value > limit:
            check_finite_features(store.x[node:node + 1], node, where, StoreError, limit)
        return
    rows = max(1, _CHECK_CHUNK // max(store.num_features, 1))
    for start in range(0, store.num_nodes, rows):
        check_finite_features(store.x[start:start + rows], start, where, StoreError, limit)


class StoreWriter:
    """Builds a store in ``.<name>.tmp-<pid>`` beside ``path`` and moves it to ``path`` on :meth:`commit`.

    Arrays are created as memory-mapped ``.npy`` files (:meth:`create`) and filled in chunks
    by the caller, so no array needs to fit in memory. Use as a context manager: an
    exception discards the temporary directory and leaves any existing store untouched.
    Replacing a store swaps the two directories in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), so
    ``path`` always holds a complete store, the old or the new; where the system lacks the call, the old
    store is renamed aside first and an error in between names both folders. Leftovers of killed writers
    (their process gone) are removed.
    """

    def __init__(self, path: Union[str, Path], overwrite: bool = False, progress: bool = True) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers(self.path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.arrays: Dict[str, np.ndarray] = {}
        self.checked: set = set()  # what the writers verified while writing (meta.json's "checked")
        self.largest_feature: Optional[list] = None
        # how far the writing is (a conversion of papers100M takes an hour): the writers report their stages
        self.progress: Optional[Progress] = Progress(f"store {self.path.name}") if progress else None
        if self.progress is not None:
            self.progress.begin(message=f"writing {self.path}")

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.arrays.clear()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def create(self, name: str, shape: Tuple[int, ...], dtype) -> np.ndarray:
        """A writable memory-mapped array that will be part of the store."""
        array = np.lib.format.open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self.arrays[name] = array
        return array

    def put(self, name: str, values: np.ndarray) -> None:
        """Stores a small array whole."""
        self.create(name, values.shape, values.dtype)[...] = values

    def commit(self, num_classes: int, multilabel: bool = False, **extra) -> Path:
        """Flushes every array, writes meta.json, and atomically moves the store into place."""
        required = {"rowptr", "col", "x", "y", "split", "train_idx", "val_idx", "test_idx"}
        missing = required - set(self.arrays)
        if missing:
            raise StoreError(f"cannot commit the store at {self.path}: {', '.join(sorted(missing))} not written")
        specs = {}
        for name, array in self.arrays.items():
            array.flush()
            specs[name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                           "bytes": (self.tmp / f"{name}.npy").stat().st_size}
        x, col = self.arrays["x"], self.arrays["col"]
        meta = {"format": FORMAT, "version": VERSION, "num_nodes": int(x.shape[0]), "num_edges": int(col.shape[0]),
                "num_features": int(x.shape[1]), "num_classes": int(num_classes), "multilabel": bool(multilabel),
                "checked": sorted(self.checked), "arrays": specs, **extra}
        if self.largest_feature is not None:
            meta["largest_feature"] = self.largest_feature
        with atomic_file(self.tmp / "meta.json", "w") as handle:  # written last: its presence marks completeness
            handle.write(json.dumps(meta, indent=2) + "\n")
        self.arrays.clear()
        # The full check once, here, recorded with the files it passed on: opens then skip it.
        if self.progress is not None:
            self.progress.stage("full check")
        GraphStore.open(self.tmp, validate="full")
        if not self.path.exists():
            self.tmp.rename(self.path)
        elif _exchange(self.tmp, self.path):
            shutil.rmtree(self.tmp)  # now the old store
        else:
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            self.path.rename(old)
            try:
                self.tmp.rename(self.path)
            except OSError as error:
                raise StoreError(f"could not move the new store {self.tmp} to {self.path} ({error}); the previous store "
                                 f"is at {old}: rename it back, or retry the write") from error
            shutil.rmtree(old)
        if self.progress is not None:
            self.progress.end()
        return self.path


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return result == 0


def _remove_dead_writers(path: Path) -> None:
    """Removes ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` folders whose writer process no longer runs."""
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if not (kind.endswith(".tmp") or kind.endswith(".old")) or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(leftover, ignore_errors=True)


def write_nodes(writer: StoreWriter, x_chunks: Iterable[np.ndarray], num_nodes: int, num_features: int,
                feature_dtype, y: np.ndarray, splits: Dict[str, np.ndarray]) -> None:
    """Writes features (streamed), labels and splits (index arrays plus the per-node code)."""
    x = writer.create("x", (num_nodes, num_features), feature_dtype)
    start, largest = 0, [0.0, 0, 0]
    if writer.progress is not None:
        writer.progress.stage("features written", num_nodes, "nodes")
    for chunk in x_chunks:
        if writer.progress is not None:
            writer.progress.advance(len(chunk))
        x[start:start + len(chunk)] = chunk
        # as stored: a value too large for float16 becomes inf here
        stored = torch.from_numpy(np.asarray(x[start:start + len(chunk)]))
        check_finite_features(stored, start, f"{writer.path} (features)", StoreError, limit=float("inf"))
        if stored.numel():
            position = int(stored.abs().argmax())
            value = float(stored.abs().flatten()[position])
            if value > largest[0]:
                largest = [value, start + position // num_features, position % num_features]
        start += len(chunk)
    if start != num_nodes:
        raise StoreError(f"feature chunks gave {start} rows for {num_nodes} nodes")
    writer.checked.add("finite_features")
    writer.largest_feature = largest  # meta.json: [|value|, node, feature], for the precision check at open
    writer.put("y", y)
    code = writer.create("split", (num_nodes,), np.uint8)
    code[:] = 0
    for name in SPLITS:
        index = np.asarray(splits[name], dtype=np.int64)
        writer.put(f"{name}_idx", index)
        code[index] = SPLIT_CODES[name]


def write_store_from_data(data, path: Union[str, Path], num_classes: Optional[int] = None,
                          feature_dtype=np.float32, chunk_edges: int = 1 << 22, overwrite: bool = False) -> Path:
    """Converts a PyG ``Data`` (as validated by ``NodeDataModule``) into a store at ``path``: every edge
    as given (duplicates, self loops, direction) with its ``edge_weight`` when the data has one."""
    from .base import infer_num_classes, validate_node_data

    multilabel = data.y.dim() == 2
    # what the store cannot hold faithfully is refused here, naming the node: nodes in two splits, edge ids
    # outside [0, N), labels out of range, non-finite features
    validate_node_data(data, num_classes, multilabel)
    num_nodes = data.num_nodes
    edge_index = data.edge_index.numpy()
    edge_weight = data.get("edge_weight")
    edge_weight = edge_weight.float().numpy() if edge_weight is not None else None

    def edge_chunks():
        for start in range(0, edge_index.shape[1], chunk_edges):
            part = slice(start, start + chunk_edges)
            if edge_weight is None:
                yield edge_index[0, part], edge_index[1, part]
            else:
                yield edge_index[0, part], edge_index[1, part], edge_weight[part]

    y = data.y.numpy().astype(np.uint8 if multilabel else np.int32)
    splits = {name: data[f"{name}_mask"].nonzero().flatten().numpy() for name in SPLITS}
    with StoreWriter(path, overwrite=overwrite) as writer:
        write_csr(writer, num_nodes, edge_chunks)
        write_nodes(writer, [data.x.numpy()], num_nodes, data.num_features, feature_dtype, y, splits)
        classes = num_classes if num_classes is not None else infer_num_classes(data, multilabel)
        return writer.commit(classes, multilabel)
