"""OGB node datasets (ogbn-arxiv, -products, -proteins, -papers100M) converted into a graph store.

The converter reads OGB's raw files in chunks and writes the store as it goes, never building
the in-memory PyG ``Data`` that needs over 400 GB for ogbn-papers100M. CSV datasets are read
with pandas in chunks; binary ones (papers100M: ``raw/data.npz``) are streamed member by member
out of the zip archive. Two passes over the edges (degrees, then placement) keep memory at
O(N) plus one chunk.
"""
import gzip
import zipfile
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import pandas as pd

from difformer_lightning.contracts import SPLITS

from .base import DAMAGED_FILE_ERRORS, DatasetNotFoundError
from .csr import write_csr
from .partition import RandomPartitionDataModule
from .store import StoreWriter, write_nodes

# ogb's names for the validation split file
_SPLIT_FILES = {"train": "train", "val": "valid", "test": "test"}


def ogb_meta(name: str) -> dict:
    """OGB's meta information for ``name`` (its master table), e.g. add_inverse_edge, split, binary."""
    table = _master_table()
    if name not in table.columns:
        raise ValueError(f"unknown OGB node dataset {name!r}: choose one of {', '.join(table.columns)}")
    return dict(table[name])


def _download(name: str, meta: dict, root: Path) -> None:
    """Downloads and extracts OGB's archive so that ``root/raw`` exists."""
    from ogb.utils.url import download_url, extract_zip

    try:
        archive = download_url(meta["url"], str(root.parent))
    except OSError as error:
        raise DatasetNotFoundError(
            f"{name} is not under {root} (no raw/ folder) and could not be downloaded ({error}); copy OGB's "
            f"extracted dataset folder (with raw/ and split/) there, or pass root=") from error
    extract_zip(archive, str(root.parent))
    Path(archive).unlink()
    extracted = root.parent / meta["download_name"]
    if extracted != root:
        extracted.rename(root)


def _csv_chunks(path: Path, rows: int, dtype) -> Iterator[np.ndarray]:
    """The rows of one of OGB's ``.csv.gz`` files, ``rows`` at a time, as ``dtype``. A file cut short or damaged,
    a line with another number of fields, or a value that is not a number raises a ``ValueError`` naming the
    file (and the line and value where there is one) and what to do, not pandas' or gzip's own error."""
    advice = (f"fix the file, or delete {path.parent.parent} so that OGB's archive is downloaded and "
              f"extracted again")
    start = 0
    try:
        for frame in pd.read_csv(path, compression="gzip", header=None, chunksize=rows):
            try:
                values = frame.to_numpy(dtype=dtype)
            except (ValueError, TypeError):
                numbers = frame.apply(pd.to_numeric, errors="coerce")
                row, column = np.argwhere((numbers.isna() & frame.notna()).to_numpy())[0]
                raise ValueError(f"{path}, line {start + row + 1}, column {column + 1}: "
                                 f"{frame.iat[row, column]!r} is not a number; OGB's raw files hold numbers "
                                 f"only: {advice}") from None
            yield values
            start += len(frame)
    except DAMAGED_FILE_ERRORS + (OSError,) as error:
        if isinstance(error, FileNotFoundError):
            raise DatasetNotFoundError(f"OGB raw file {path} is missing: {advice}") from error
        read = f" (its first {start:,} lines were read)" if start else ""
        raise ValueError(f"{path} is cut short or damaged ({type(error).__name__}: {error}){read}: {advice}") \
            from error
    except pd.errors.ParserError as error:  # its message names the line: "Expected 2 fields in line 7, saw 3"
        raise ValueError(f"{path}: {error}: {advice}") from error


def _csv_column(path: Path, dtype) -> np.ndarray:
    """The first column of a small OGB ``.csv.gz`` (a split, the node count), checked as :func:`_csv_chunks`."""
    chunks = [chunk[:, 0] for chunk in _csv_chunks(path, 1 << 22, dtype)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)


def _npz_header(stream) -> Tuple[Tuple[int, ...], np.dtype]:
    major, _ = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(stream)
    if fortran:
        raise ValueError("an .npz member is stored in Fortran order; re-save it in C order")
    return shape, dtype


def _npz_shape(archive: Path, key: str) -> Tuple[int, ...]:
    with zipfile.ZipFile(archive) as bundle, bundle.open(f"{key}.npy") as stream:
        return _npz_header(stream)[0]


def _npz_rows(archive: Path, key: str, rows: int, start: int = 0, count: Optional[int] = None,
              flat: bool = False) -> Iterator[np.ndarray]:
    """Rows ``start..start+count`` of the C-ordered array ``key`` inside an ``.npz``, in chunks,
    read from the zip stream without loading the member (``flat``: elements instead of rows)."""
    with zipfile.ZipFile(archive) as bundle, bundle.open(f"{key}.npy") as stream:
        shape, dtype = _npz_header(stream)
        row_shape = () if flat else shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        total = int(np.prod(shape)) if flat else shape[0]
        skip = start * row_bytes
        while skip > 0:  # a deflated member can only be skipped by reading through it
            skip -= len(stream.read(min(skip, 1 << 26)))
        remaining = total - start if count is None else count
        while remaining > 0:
            take = min(rows, remaining)
            yield np.frombuffer(stream.read(take * row_bytes), dtype=dtype).reshape((take, *row_shape))
            remaining -= take


class _Raw:
    """Chunked access to an OGB raw folder, CSV or binary (npz)."""

    def __init__(self, root: Path, meta: dict, chunk: int) -> None:
        self.root, self.raw, self.meta, self.chunk = root, root / "raw", meta, chunk
        self.binary = meta.get("binary") == "True"
        self.inverse = meta.get("add_inverse_edge") == "True"
        if self.binary:
            with np.load(self.raw / "data.npz") as bundle:
                self.num_nodes = int(bundle["num_nodes_list"][0])
            self.num_edges = _npz_shape(self.raw / "data.npz", "edge_index")[1]
        else:
            self.num_nodes = int(_csv_column(self.raw / "num-node-list.csv.gz", np.int64)[0])

    def edges(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """(source, target) chunks as OGB stores them (each undirected edge once where it adds inverses)."""
        if not self.binary:
            for pairs in _csv_chunks(self.raw / "edge.csv.gz", self.chunk, np.int64):
                yield pairs[:, 0], pairs[:, 1]
            return
        archive, e = self.raw / "data.npz", self.num_edges
        # edge_index is [2, E] in C order: all sources, then all targets; read both side by side
        sources = _npz_rows(archive, "edge_index", self.chunk, 0, e, flat=True)
        targets = _npz_rows(archive, "edge_index", self.chunk, e, e, flat=True)
        for source, target in zip(sources, targets):
            yield source.astype(np.int64), target.astype(np.int64)

    def directed_edges(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """What the store holds: the stored edges, plus their inverses where OGB adds them."""
        for source, target in self.edges():
            if self.inverse:
                yield np.concatenate([source, target]), np.concatenate([target, source])
            else:
                yield source, target

    def node_features(self) -> Iterator[np.ndarray]:
        """Feature rows in chunks of about ``chunk`` values (not rows: papers100M has 128 per row)."""
        if self.binary:
            columns = _npz_shape(self.raw / "data.npz", "node_feat")[1]
            return _npz_rows(self.raw / "data.npz", "node_feat", max(1, self.chunk // columns))
        with gzip.open(self.raw / "node-feat.csv.gz", "rt") as handle:
            columns = handle.readline().count(",") + 1
        return _csv_chunks(self.raw / "node-feat.csv.gz", max(1, self.chunk // columns), np.float32)

    def labels(self) -> Iterator[np.ndarray]:
        if self.binary:
            return _npz_rows(self.raw / "node-label.npz", "node_label", self.chunk)
        return _csv_chunks(self.raw / "node-label.csv.gz", self.chunk, np.float64)

    def splits(self) -> dict:
        folder = self.root / "split" / self.meta["split"]
        files = {name: folder / f"{_SPLIT_FILES[name]}.csv.gz" for name in SPLITS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise DatasetNotFoundError(f"OGB split files missing: {', '.join(missing)}")
        return {name: _csv_column(f, np.int64) for name, f in files.items()}


def _mean_incoming_edge_features(raw: _Raw) -> np.ndarray:
    """ogbn-proteins' node features: the mean over each node's incoming edges (inverses included)."""
    sums = counts = None
    edge_feats = _csv_chunks(raw.raw / "edge-feat.csv.gz", raw.chunk, np.float64)
    for (source, target), feats in zip(raw.edges(), edge_feats):
        if sums is None:
            sums = np.zeros((raw.num_nodes, feats.shape[1]))
            counts = np.zeros(raw.num_nodes)
        ends = [target, source] if raw.inverse else [target]
        for end in ends:
            for column in range(feats.shape[1]):  # bincount with weights: far faster than np.add.at
                sums[:, column] += np.bincount(end, weights=feats[:, column], minlength=raw.num_nodes)
            counts += np.bincount(end, minlength=raw.num_nodes)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def write_store_from_ogb(name: str, out: Union[str, Path], root: Optional[Union[str, Path]] = None,
                         meta_dict: Optional[dict] = None, undirected: Optional[bool] = None,
                         feature_dtype=np.float16, chunk: int = 1 << 22, overwrite: bool = False) -> Path:
    """Converts an OGB node dataset into a graph store at ``out``.

    ``root`` is the dataset folder (holding ``raw/`` and ``split/``), by default
    ``$DIFFORMER_DATA/<download name>``; it is downloaded there when missing. ``meta_dict``
    replaces OGB's master-table entry (as for ``PygNodePropPredDataset``), for datasets in OGB's
    layout that OGB does not list. Labels: multi-class becomes int32 with ``-1`` for missing
    (NaN) labels; several binary tasks (ogbn-proteins) become a uint8 ``[N, T]`` multi-label
    target. Edges are stored with their inverses where OGB adds them (``add_inverse_edge``);
    ``undirected`` overrides that (``True`` symmetrises ogbn-papers100M's citation edges).
    ``chunk`` bounds the edges, labels or feature values read at once.
    """
    from .base import data_root

    meta = dict(meta_dict) if meta_dict is not None else ogb_meta(name)
    if undirected is not None:
        meta["add_inverse_edge"] = str(bool(undirected))
    root = Path(root) if root is not None else data_root(None) / meta["download_name"]
    if not (root / "raw").is_dir():
        _download(name, meta, root)
    raw = _Raw(root, meta, chunk)
    num_tasks = int(meta["num tasks"])
    multilabel = num_tasks > 1
    labels = np.concatenate([_label_values(values, multilabel) for values in raw.labels()])
    if name == "ogbn-proteins":
        features = iter([_mean_incoming_edge_features(raw)])
    else:
        features = raw.node_features()
    first = next(features)
    with StoreWriter(out, overwrite=overwrite) as writer:
        edges = raw.num_edges * (2 if raw.inverse else 1) if raw.binary else None
        write_csr(writer, raw.num_nodes, raw.directed_edges, edges)
        write_nodes(writer, chain([first], features), raw.num_nodes, first.shape[1], feature_dtype, labels,
                    raw.splits())
        classes = num_tasks if multilabel else int(meta["num classes"])
        return writer.commit(classes, multilabel, source=f"ogb:{name}")


def _label_values(values: np.ndarray, multilabel: bool) -> np.ndarray:
    if multilabel:
        return values.astype(np.uint8)
    flat = values.reshape(-1)
    return np.where(np.isnan(flat), -1, flat).astype(np.int32)


class OGBDataModule(RandomPartitionDataModule):
    """An OGB node-property dataset (``ogbn-arxiv``, ``ogbn-products``, ``ogbn-proteins``,
    ``ogbn-papers100M``) by name, trained on its official split and scored by ``ogb.nodeproppred.Evaluator``.

    ``prepare_data`` (one process per machine, as Lightning calls it) downloads OGB's archive into
    ``<root>/<download name>`` where the network allows (or finds it there) and converts it once into a
    graph store, ``<root>/stores/<name>`` (``store`` overrides it): with a lock, so that a second process
    preparing the same dataset waits and reuses the store, and through a temporary folder, so that an
    interrupted conversion is redone rather than half-used. Training is then by random partition (or seed
    + neighbour batches with ``fanout``); ``batch_size`` at least N trains full batch. Evaluation is exact
    by default (:class:`~datamodules.RandomPartitionDataModule`). ``meta_dict`` replaces OGB's master-table
    entry for datasets in OGB's layout that OGB does not list (as ``PygNodePropPredDataset`` takes it).
    ``undirected`` overrides OGB's ``add_inverse_edge`` (``True`` symmetrises papers100M's citations);
    ``feature_dtype`` is the store's (``float16`` halves papers100M's 57 GB of features).
    """

    def __init__(self, name: str = "ogbn-arxiv", root: Optional[str] = None, store: Optional[str] = None,
                 batch_size: int = 10_000, eval_batch_size: Optional[int] = None, seed: int = 0,
                 num_workers: int = 2, fanout: int = 0, evaluation: Optional[str] = None,
                 scratch_dir: Optional[str] = None, undirected: Optional[bool] = None,
                 feature_dtype: str = "float32", meta_dict: Optional[dict] = None,
                 predict_nodes: Optional[str] = None, store_check: str = "once") -> None:
        from .base import data_root

        self.name, self.meta = name, dict(meta_dict) if meta_dict is not None else ogb_meta(name)
        self.data_folder = data_root(root)
        self.raw_root = self.data_folder / self.meta["download_name"] if meta_dict is None \
            else Path(self.meta.get("dir_path", self.data_folder / name))
        self.undirected, self.feature_dtype = undirected, np.dtype(feature_dtype)
        store_path = Path(store) if store is not None else self.data_folder / "stores" / name
        super().__init__(str(store_path), batch_size, eval_batch_size, seed, num_workers, fanout, evaluation,
                         scratch_dir, predict_nodes=predict_nodes, store_check=store_check)

    def prepare_data(self) -> None:
        from .prepare import prepare_store_once

        prepare_store_once(self.path, lambda path: write_store_from_ogb(
            self.name, path, root=self.raw_root, meta_dict=self.meta, undirected=self.undirected,
            feature_dtype=self.feature_dtype, overwrite=True), sources=self._raw_files)

    def _raw_files(self):
        """OGB's raw files (``raw/``, ``split/``) the store is converted from, for its source record."""
        files = [file for part in ("raw", "split") for file in (self.raw_root / part).rglob("*") if file.is_file()]
        return self.raw_root, files

    @property
    def store(self):
        """The converted store; converted first when it is not there yet or OGB's raw files changed since
        (its sizes are what the model is built from, before Lightning calls ``prepare_data``; the lock makes
        concurrent calls safe)."""
        if self._store is None:
            self.prepare_data()
        return super().store

    @property
    def metric(self) -> str:
        """OGB's Evaluator for listed datasets; the same rules (accuracy, ROC-AUC over tasks) otherwise."""
        listed = self.name in _master_table().columns
        if listed:
            return f"ogb:{self.name}"
        return "rocauc" if self.meta.get("eval metric") == "rocauc" else "accuracy"

    def describe(self):
        described = super().describe()
        described["dataset"] = f"{type(self).__name__}:{self.name}"
        return described


def _master_table() -> pd.DataFrame:
    import ogb.nodeproppred

    return pd.read_csv(Path(ogb.nodeproppred.__file__).parent / "master.csv", index_col=0, keep_default_na=False)
