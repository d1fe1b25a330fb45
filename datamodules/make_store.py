"""``python -m datamodules.make_store --out PATH --nodes N [...]``: a synthetic graph store from the command line.

Its own module (not ``datamodules.synthetic``): ``python -m`` on a module the package already imports warns."""
from typing import Optional

from datamodules.synthetic import write_synthetic_store


def main(argv: Optional[list] = None) -> None:
    """``python -m datamodules.make_store --out PATH --nodes N [...]``: :func:`write_synthetic_store` from the
    command line (the store ``configs/synthetic_partition.yaml`` trains on: ``--out runs/stores/csbm-1m
    --nodes 1000000``)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m datamodules.make_store",
                                     description="Writes a contextual-SBM graph store (write_synthetic_store).")
    parser.add_argument("--out", required=True, help="the store's folder (e.g. runs/stores/csbm-1m)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--avg-degree", type=float, default=10.0)
    parser.add_argument("--homophily", type=float, default=0.6)
    parser.add_argument("--degree-exponent", type=float, help="power-law degrees with this exponent (> 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    args = parser.parse_args(argv)
    path = write_synthetic_store(args.out, args.nodes, num_classes=args.classes, num_features=args.features,
                                 avg_degree=args.avg_degree, homophily=args.homophily,
                                 degree_exponent=args.degree_exponent, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
