"""Run the DIFFormer authors' spatio-temporal code (qitianwu/DIFFormer, spatial-temporal/)
on CPU for the chickenpox and covid configurations of their run.sh.

The oracle behind docs/temporal.md's "authors' code" column (results/temporal/authors_code.json):

    git clone --bare https://github.com/qitianwu/DIFFormer /tmp/DIFFormer.git
    AUTHORS_TEMPORAL_REPO=/tmp/DIFFormer.git nice -n 10 python benchmarks/authors_temporal.py [--only chickenpox/s_graph ...]

Environment: ``AUTHORS_TEMPORAL_REPO`` (a git directory of qitianwu/DIFFormer; its HEAD is used),
``AUTHORS_TEMPORAL_WORKDIR`` (default /tmp/authors_temporal: the extracted code, the torch_sparse shim,
torch-geometric-temporal installed with --no-deps, logs, the JSON), ``AUTHORS_TEMPORAL_DATA`` (the folder of
chickenpox.json and england_covid.json; default ``$DIFFORMER_DATA/temporal``). Needs pip access once (the
package) and about 83 CPU minutes for the 8 configurations x 5 runs.

Parent mode (default): extracts spatial-temporal/ from the mirror (HEAD), checks it is
byte-identical to HEAD, writes the torch_sparse shim, makes sure torch-geometric-temporal
is installed under site/, parses run.sh, runs each configuration in a fresh child process
(cwd = work/, `nice -n 10`, one at a time), and writes authors_temporal.json + a table.

Child mode (`--child OUT.json <main.py flags>`): imports torch_geometric first (so its
optional-dependency probe never sees the shim), puts shim/ site/ spatial-temporal/ on
sys.path, makes the two loaders read the local JSON, wraps the authors' `eval.evaluate`
with a read-only recorder, and executes the authors' unmodified main.py with runpy.
"""
import json
import os
import re
import resource
import subprocess
import sys
import time

ROOT = os.environ.get('AUTHORS_TEMPORAL_WORKDIR', '/tmp/authors_temporal')
SRC = os.path.join(ROOT, 'spatial-temporal')
WORK = os.path.join(ROOT, 'work')
SHIM = os.path.join(ROOT, 'shim')
SITE = os.path.join(ROOT, 'site')
LOGS = os.path.join(ROOT, 'logs')
DATA = os.environ.get('AUTHORS_TEMPORAL_DATA') or os.path.join(os.environ.get('DIFFORMER_DATA', 'data'), 'temporal')
MIRROR = os.environ.get('AUTHORS_TEMPORAL_REPO', '')
PY = sys.executable
OUT_JSON = os.path.join(ROOT, 'authors_temporal.json')
# Latest on PyPI. The authors pin 0.54.0, but 0.54.0 does not import with torch_geometric 2.8.1
# (torch_geometric.utils.to_dense_adj module path); its chickenpox/encovid loaders and temporal_signal_split
# are identical to 0.56.2 apart from the download call (verified by diff).
TGT_VERSION = '0.56.2'

LOCAL_JSON = {'ChickenpoxDatasetLoader': 'chickenpox.json',
              'EnglandCovidDatasetLoader': 'england_covid.json'}

SHIM_SRC = '''"""Minimal stand-in for torch_sparse (not installable here), covering exactly what the
DIFFormer authors' code calls: SparseTensor(row=, col=, value=, sparse_sizes=), matmul(adj, dense)
and SparseTensor.to_torch_sparse_coo_tensor() (gnns.py).

torch_sparse semantics reproduced: entry k sits at (row[k], col[k]) with value[k] (ones if None);
duplicate (row, col) entries are summed by matmul; matmul(adj, x)[i] = sum_k[row_k == i] value_k * x[col_k],
i.e. adj @ x. Implemented with a coalesced torch.sparse COO tensor and torch.sparse.mm (gradient flows
to the dense operand, as in torch_sparse). No SparseStorage is defined on purpose.
"""
import torch

__version__ = '0.0.0-shim'


class SparseTensor(object):
    def __init__(self, row=None, rowptr=None, col=None, value=None, sparse_sizes=None,
                 is_sorted=False, trust_data=False):
        if rowptr is not None or row is None or col is None:
            raise NotImplementedError('torch_sparse shim: only SparseTensor(row=, col=, value=, sparse_sizes=)')
        row = row.long()
        col = col.long()
        if sparse_sizes is None:
            sparse_sizes = (int(row.max()) + 1, int(col.max()) + 1)
        M = int(sparse_sizes[0]) if sparse_sizes[0] is not None else int(row.max()) + 1
        N = int(sparse_sizes[1]) if sparse_sizes[1] is not None else int(col.max()) + 1
        if value is None:
            value = torch.ones(row.numel(), device=row.device)
        self._coo = torch.sparse_coo_tensor(torch.stack([row, col], 0), value, (M, N),
                                            check_invariants=False).coalesce()

    def sizes(self):
        return list(self._coo.shape)

    def to_torch_sparse_coo_tensor(self):
        return self._coo

    def to_dense(self):
        return self._coo.to_dense()


def matmul(src, other, reduce='sum'):
    if reduce not in ('sum', 'add'):
        raise NotImplementedError('torch_sparse shim: only reduce="sum"')
    if not isinstance(src, SparseTensor) or not isinstance(other, torch.Tensor) or other.is_sparse:
        raise NotImplementedError('torch_sparse shim: only matmul(SparseTensor, dense Tensor)')
    A = src._coo
    if other.dim() == 1:
        return torch.sparse.mm(A, other.unsqueeze(-1)).squeeze(-1)
    return torch.sparse.mm(A, other)
'''


# ----------------------------------------------------------------------------- child
def child(out_path, flags):
    import torch_geometric  # noqa: F401  (probe optional deps before the shim is importable)
    import torch_geometric.typing as pyg_typing
    assert not pyg_typing.WITH_TORCH_SPARSE and not pyg_typing.WITH_TORCH_SCATTER
    for p in (SRC, SITE, SHIM):
        sys.path.insert(0, p)
    import numpy as np
    import torch
    import torch_geometric_temporal
    import torch_geometric_temporal.dataset as tgt_dataset

    # Local data instead of the GitHub download; feature/target construction untouched.
    def make_reader(fname):
        def _read_web_data(self):
            with open(os.path.join(DATA, fname)) as f:
                self._dataset = json.load(f)
        return _read_web_data
    for cls_name, fname in LOCAL_JSON.items():
        getattr(tgt_dataset, cls_name)._read_web_data = make_reader(fname)

    # Read-only recorder around the authors' evaluate (same call, same return value).
    import eval as authors_eval
    orig_evaluate = authors_eval.evaluate
    rec = {'calls': [], 'val_id': None}

    @torch.no_grad()
    def per_node_mse(model, dataset, device):
        # Same model state (already in eval mode, no dropout -> no RNG use), same aggregation
        # as the authors (mean over snapshots of the per-snapshot mean), but y_hat [N,1] is
        # squeezed to [N] so the error is per node instead of the [N,N] broadcast.
        model.eval()
        tot, nsnap = 0.0, 0
        for snapshot in dataset:
            snapshot = snapshot.to(device)
            y_hat = model(snapshot.x, snapshot.edge_index, snapshot.edge_attr)
            tot += torch.mean((y_hat.reshape(-1) - snapshot.y.reshape(-1)) ** 2).item()
            nsnap += 1
        return tot / nsnap

    def evaluate(model, dataset, device, args):
        cost = orig_evaluate(model, dataset, device, args)
        if rec['val_id'] is None:  # main.py's first evaluate call is always on val_dataset
            rec['val_id'] = id(dataset)
        is_test = id(dataset) != rec['val_id']
        c = {'split': 'test' if is_test else 'val', 'n_snap': dataset.snapshot_count, 'cost': cost}
        if is_test:
            c['per_node_mse'] = per_node_mse(model, dataset, device)
        rec['calls'].append(c)
        return cost
    if os.environ.get('AUTHORS_NO_HOOK') != '1':  # set to 1 to check the hook does not change results
        authors_eval.evaluate = evaluate

    import runpy
    sys.argv = [os.path.join(SRC, 'main.py')] + flags
    torch.set_num_threads(1)
    runpy.run_path(os.path.join(SRC, 'main.py'), run_name='__main__')

    if os.environ.get('AUTHORS_NO_HOOK') == '1':
        return
    runs, vals = [], []
    for c in rec['calls']:
        if c['split'] == 'val':
            vals.append(c['cost'])
        else:
            runs.append({'test_mse_all_pairs': c['cost'], 'test_mse': c['per_node_mse'],
                         'epochs': len(vals), 'best_epoch': int(np.argmin(vals)) + 1,
                         'best_val_all_pairs': float(np.min(vals)), 'n_test_snapshots': c['n_snap']})
            vals = []
    with open(out_path, 'w') as f:
        json.dump({'runs': runs, 'tgt_version_attr': torch_geometric_temporal.__version__,
                   'tgt_file': torch_geometric_temporal.__file__}, f)


# ----------------------------------------------------------------------------- parent
def git(*a):
    if not MIRROR:
        raise SystemExit("set AUTHORS_TEMPORAL_REPO to a git directory of qitianwu/DIFFormer "
                         "(git clone --bare https://github.com/qitianwu/DIFFormer /tmp/DIFFormer.git)")
    return subprocess.check_output(['git', '--git-dir=' + MIRROR] + list(a)).decode()


def setup():
    commit = git('rev-parse', 'HEAD').strip()
    if not os.path.isdir(SRC):
        os.makedirs(ROOT, exist_ok=True)
        subprocess.check_call('git --git-dir=%s archive HEAD spatial-temporal | tar -x -C %s' % (MIRROR, ROOT),
                              shell=True)
    # verify the authors' files are byte-identical to HEAD
    for line in git('ls-tree', '-r', 'HEAD', 'spatial-temporal/').splitlines():
        meta, path = line.split('\t')
        blob = meta.split()[2]
        local = subprocess.check_output(['git', 'hash-object', os.path.join(ROOT, path)]).decode().strip()
        if local != blob:
            sys.exit('modified authors file: ' + path)
    os.makedirs(os.path.join(SHIM, 'torch_sparse'), exist_ok=True)
    with open(os.path.join(SHIM, 'torch_sparse', '__init__.py'), 'w') as f:
        f.write(SHIM_SRC)
    if not os.path.isdir(os.path.join(SITE, 'torch_geometric_temporal-%s.dist-info' % TGT_VERSION)):
        subprocess.check_call([PY, '-m', 'pip', 'install', '--no-deps', '--target', SITE,
                               'torch-geometric-temporal==' + TGT_VERSION])
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(LOGS, exist_ok=True)
    return commit


def parse_run_sh():
    text = open(os.path.join(SRC, 'run.sh')).read().replace('\\\n', ' ')
    configs, label = [], None
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r'# DIFFormer-(s|a) (w/|w/o) graph', line)
        if m:
            label = m.group(1) + ('_graph' if m.group(2) == 'w/' else '')
        elif line.startswith('python main.py'):
            flags = line.split()[2:]
            ds = flags[flags.index('--dataset') + 1]
            if ds in ('chickenpox', 'covid'):
                configs.append((ds, label, flags))
    assert len(configs) == 8, configs
    return configs


def flag(flags, name):
    return float(flags[flags.index(name) + 1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == '--child':
        return child(sys.argv[2], sys.argv[3:])
    only = sys.argv[sys.argv.index('--only') + 1:] if '--only' in sys.argv else None
    commit = setup()
    configs = parse_run_sh()
    result = {'how': None, 'commit': commit, 'configs': {}}
    if os.path.exists(OUT_JSON) and only:
        result = json.load(open(OUT_JSON))
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
    env.pop('PYTHONPATH', None)
    total_cpu = 0.0
    for ds, label, flags in configs:
        key = 'england_covid' if ds == 'covid' else ds
        if only and '%s/%s' % (key, label) not in only:
            continue
        argv = flags + ['--cpu']
        tag = '%s_%s' % (key, label)
        out = os.path.join(LOGS, tag + '.json')
        log = os.path.join(LOGS, tag + '.log')
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        with open(log, 'w') as lf:
            rc = subprocess.call(['nice', '-n', '10', PY, os.path.abspath(__file__), '--child', out] + argv,
                                 cwd=WORK, env=env, stdout=lf, stderr=subprocess.STDOUT)
        wall = time.time() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        total_cpu += cpu
        if rc != 0:
            sys.exit('%s failed (rc=%d), see %s' % (tag, rc, log))
        child_res = json.load(open(out))
        logtxt = open(log).read()
        printed = [float(x) for x in re.findall(r'^Test Cost: (\S+)', logtxt, re.M)]
        final = re.findall(r'^Final Test: (.*)$', logtxt, re.M)
        runs = child_res['runs']
        assert len(runs) == len(printed) == 5
        assert all(abs(r['test_mse_all_pairs'] - p) < 6e-5 for r, p in zip(runs, printed))
        result['configs'].setdefault(key, {})[label] = {
            'lr': flag(flags, '--lr'), 'weight_decay': flag(flags, '--weight_decay'),
            'dropout': flag(flags, '--dropout'),
            'test_mse_all_pairs': [r['test_mse_all_pairs'] for r in runs],
            'test_mse': [r['test_mse'] for r in runs],
            'epochs': [r['epochs'] for r in runs],
            'best_epoch': [r['best_epoch'] for r in runs],
            'authors_printed_final': final[0] if final else None,
            'argv': ['main.py'] + argv,
            'cpu_seconds': round(cpu, 1), 'wall_seconds': round(wall, 1),
        }
        result['tgt_version'] = TGT_VERSION
        print('%-28s done: cpu %.0fs wall %.0fs, authors print: Final Test: %s' % (tag, cpu, wall, final[0]),
              flush=True)
    import numpy as np
    result['how'] = (
        "Authors' spatial-temporal/ code from qitianwu/DIFFormer HEAD (%s), extracted with git archive and "
        "verified byte-identical, run unmodified via runpy in a fresh process per configuration "
        "(cwd <workdir>/work, nice -n 10, 1 torch thread, CPU only), flags exactly as in run.sh plus "
        "--cpu (the --device 1 flag is kept but ignored by --cpu; defaults --runs 5, --epochs 200, "
        "--early_stopping 20, --train_ratio 0.2; seed 123). Environment: torch 2.13 CPU, torch_geometric 2.8.1, "
        "torch-geometric-temporal %s installed with --no-deps into <workdir>/site (authors pin 0.54.0, "
        "which does not import with PyG 2.8.1; its loaders and temporal_signal_split are identical to 0.56.2 except "
        "for the download call). torch_sparse is absent, so a shim provides SparseTensor(row,col,value,sparse_sizes) and "
        "matmul(adj,x)=adj@x via a coalesced torch.sparse COO tensor (only used by the graph term gcn_conv); "
        "torch_geometric is imported before the shim is on sys.path so PyG does not think torch_sparse exists. "
        "ChickenpoxDatasetLoader/EnglandCovidDatasetLoader._read_web_data are replaced by json.load of the local "
        "copies in AUTHORS_TEMPORAL_DATA (feature/target construction unchanged; splits from the package's "
        "temporal_signal_split as called by main.py: 20%% train / 20%% val / 60%% test). wikimath skipped (no data). "
        "test_mse_all_pairs is the authors' own reported 'Test Cost': their loss mean((y_hat - y)**2) broadcasts "
        "y_hat [N,1] against y [N] to an [N,N] matrix (all node pairs); it is used for training, model selection "
        "and test. test_mse is the per-node MSE (y_hat squeezed to [N]) of the same selected model on the same "
        "test snapshots, averaged over snapshots like theirs, computed by a read-only wrapper around their "
        "eval.evaluate (extra no-grad forward in eval mode, no RNG use, so training is unaffected). epochs = "
        "epochs run before early stopping; best_epoch = epoch whose checkpoint was reloaded. Stats use np.std (ddof 0)."
        % (commit, result.get('tgt_version')))
    with open(OUT_JSON, 'w') as f:
        json.dump(result, f, indent=1)
    print('\ntotal child CPU time this invocation: %.0f s' % total_cpu)
    print('\n%-14s %-8s %-22s %-22s %s' % ('dataset', 'config', 'test_mse_all_pairs', 'test_mse (per node)',
                                          'epochs'))
    for key, d in result['configs'].items():
        for label in ('s_graph', 's', 'a_graph', 'a'):
            if label not in d:
                continue
            c = d[label]
            ap, pn = np.array(c['test_mse_all_pairs']), np.array(c['test_mse'])
            print('%-14s %-8s %.4f ± %.4f        %.4f ± %.4f        %s' % (
                key, label, ap.mean(), ap.std(), pn.mean(), pn.std(), c['epochs']))


if __name__ == '__main__':
    main()
