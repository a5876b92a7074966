"""The default command line on foreign data, one nuisance pushed at a time.

Every case is a set simulated by cryojax and written by cryospax (``tests/cli/cryojax_sets.py``:
C-alpha AdK on the line between its closed and open structures, per-image amplitude and
offset, coloured noise, inverted contrast, a B = 40 A^2 envelope, written poses / shifts /
defocus off by 1 degree per Euler angle / 0.7 A / 50 A, 128 px at 1.5 A/px, SNR 0.1) with one
thing changed from ``base``, and each is reconstructed by the plain
``cryosip reconstruct particles.star --model A.pdb B.pdb`` (nothing else). Cases:

- ``relion-normalised``: the images divided by the noise sd and shifted by 5 (a background
  normalised to sd 1 whose mean was not removed); ``tiny-units``: the images x 1e-4;
- ``amplitude-0.4-1.6``: per-image amplitude U(0.4, 1.6) (base: U(0.75, 1.25));
- ``pose-3deg``: pose errors of 3 degrees per Euler angle and 1.5 A per shift axis;
- ``defocus-300A``: defocus errors of 300 A; ``B150``: an envelope of 150 A^2;
- ``upright-white``: protein dark (not inverted), white noise;
- ``box64-2.5A``: 64 px at 2.5 A/px; ``uniform``: a flat truth on the line;
- ``snr0.01-n1000``: SNR 0.01, 1000 images; ``exact-poses``: no pose, shift or defocus errors.

W1 is against the images' own CVs (the truth sample). For scale: the truth of all bimodal
cases is 0.6 N(0.25, 0.07^2) + 0.4 N(0.72, 0.06^2), a moment-matched Gaussian is 0.082 from
it, and 300 images carry a finite-sample floor of about 0.006.

    python benchmarks/foreign_stress.py                    # every case, 300 images
    python benchmarks/foreign_stress.py --cases base,B150
Writes benchmarks/results/foreign_stress.json (cases merged into what is there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "cli"))

from cli_helpers import write_adk_ca_ends  # noqa: E402
from cryojax_sets import ForeignSpec, make_foreign_set  # noqa: E402
from foreign_data import recovered  # noqa: E402

from cryosip import _atomic  # noqa: E402
from cryosip.analysis.metrics import w1  # noqa: E402
from cryosip.cli.main import main as cli  # noqa: E402
from cryosip.data.models import load_model_with_description  # noqa: E402

N = 300
NO_ERRORS = dict(angle_error_deg=0.0, shift_error_A=0.0, defocus_error_A=0.0)
# name: (spec changes from base, image rewrite (scale in noise sds or absolute, offset) or None)
CASES = {
    "base": ({}, None),
    "relion-normalised": ({}, ("per-sigma", 1.0, 5.0)),
    "tiny-units": ({}, ("absolute", 1e-4, 0.0)),
    "amplitude-0.4-1.6": (dict(amplitude_range=(0.4, 1.6)), None),
    "pose-3deg": (dict(angle_error_deg=3.0, shift_error_A=1.5), None),
    "defocus-300A": (dict(defocus_error_A=300.0), None),
    "B150": (dict(bfactor=150.0), None),
    "upright-white": (dict(invert=False, coloured=False), None),
    "box64-2.5A": (dict(box=64, pixel_size=2.5), None),
    "uniform": (dict(distribution="uniform"), None),
    "snr0.01-n1000": (dict(snr=0.01, n_images=1000), None),
    "exact-poses": (NO_ERRORS, None),
}


def rewrite_images(folder: Path, sigma: float, rule) -> None:
    """Scale and shift every image in place: ``y * a + b`` (``a`` in noise sds or absolute)."""
    kind, a, b = rule
    scale = a / sigma if kind == "per-sigma" else a
    for f in sorted(folder.glob("*.mrcs")):
        with mrcfile.open(f, "r+") as m:
            m.data[:] = m.data * np.float32(scale) + np.float32(b)


def run_case(root: Path, ends, name: str, seed: int) -> dict:
    changes, rule = CASES[name]
    model, _ = load_model_with_description(ends, atoms="ca")
    spec = ForeignSpec(**{**dict(n_images=N, snr=0.1, seed=seed), **changes})
    t0 = time.perf_counter()
    data = make_foreign_set(root / "data", model, spec)
    if rule is not None:
        rewrite_images(root / "data", data["sigma"], rule)
    row = {"n_images": spec.n_images, "simulate_seconds": round(time.perf_counter() - t0, 1)}
    star, out = root / "data" / "particles.star", root / "rec"
    t0 = time.perf_counter()
    rc = cli(["reconstruct", str(star), "--model", *ends, "--out", str(out), "--no-progress"])
    row.update(rc=rc, seconds=round(time.perf_counter() - t0, 1))
    if rc == 0:
        pos, wts = recovered(out)
        s = json.loads((out / "summary.json").read_text())
        cal = s["calibration"]
        row.update(
            w1=float(w1(pos, data["s"][:, 0], wts)),
            bandwidth_relative=s["regularisation"]["bandwidth_relative"],
            envelope_bfactor_A2=cal["envelope_bfactor_A2"],
            working_box=cal["working_box"],
            contrast=cal["contrast"],
            pose_error_estimate=cal.get("pose_error_estimate"),
            fit_check_ok=s["fit_check"]["ok"],
            fit_check_warnings=s["fit_check"]["warnings"],
        )
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "foreign_stress.json"))
    a = p.parse_args(argv)
    names = a.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    results = json.loads(Path(a.out).read_text()) if os.path.exists(a.out) else {}
    results.update(
        benchmark="foreign_stress",
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        seed=a.seed,
    )
    results.setdefault("cases", {})
    with tempfile.TemporaryDirectory() as tmp:
        ends = write_adk_ca_ends(Path(tmp))
        for name in names:
            row = run_case(Path(tmp) / name, ends, name, a.seed)
            row["load_average"] = [round(x, 2) for x in os.getloadavg()]
            results["cases"][name] = row
            _atomic.write_json(a.out, results)
            print(name, {k: row.get(k) for k in ("w1", "bandwidth_relative", "seconds")})


if __name__ == "__main__":
    main()
