"""Score a reconstruction against the true CVs (simulated data): W1, W2 and energy distance.

Examples:
  $ cryosip evaluate rec/ --truth sim/truth.csv
  $ cryosip evaluate rec/ --truth sim/truth.csv --json
"""

from __future__ import annotations

import os

import pandas as pd

from ..data.errors import CryosipInputError


def add_args(p):
    p.add_argument(
        "reconstruction",
        help="a folder written by `cryosip reconstruct` (its distribution_particles.csv)",
    )
    p.add_argument(
        "--truth",
        required=True,
        help="CSV with the true CV of every particle (truth.csv from `cryosip simulate`)",
    )
    p.add_argument("--json", action="store_true", help="print JSON only")


def main(args) -> int:
    from .. import _atomic
    from ..analysis.metrics import all_metrics
    from ..analysis.outputs import PARTICLES_CSV

    pfile = os.path.join(args.reconstruction, PARTICLES_CSV)
    if not os.path.exists(pfile):
        raise CryosipInputError(pfile, "missing: not a reconstruction folder")
    if not os.path.exists(args.truth):
        raise CryosipInputError(args.truth, "no such file")
    parts = pd.read_csv(pfile)
    truth = pd.read_csv(args.truth)
    cvs = [c for c in parts.columns if c != "weight"]
    missing = [c for c in cvs if c not in truth.columns]
    if missing:
        raise CryosipInputError(args.truth, f"missing CV column(s) {missing}")
    x = parts[cvs].to_numpy()
    met = all_metrics(
        x if x.shape[1] > 1 else x[:, 0],
        truth[cvs].to_numpy() if len(cvs) > 1 else truth[cvs[0]].to_numpy(),
        parts["weight"].to_numpy(),
    )
    met = {
        "w1": met["w1"],
        "w2": met["w2"],
        "energy_distance": met["energy"],
        "n_particles": int(len(parts)),
        "n_truth": int(len(truth)),
        "cv": cvs,
    }
    _atomic.write_json(os.path.join(args.reconstruction, "evaluation.json"), met)
    print(_atomic.json_text(met, indent=None if args.json else 2))  # noqa: T201
    return 0
