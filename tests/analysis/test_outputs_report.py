"""What `cryosip reconstruct` writes for the next tool: per-image tables (STAR and .cs), latents,
the posterior for `select`, the ensemble, the trajectory, the maps, the ChimeraX script and the
report (its static content; the browser test is test_report_browser.py)."""

import glob
import json
import os
import pickle

import gemmi
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from reconstructed_runs import N_IMAGES, reconstructed_runs

from cryosip.analysis.clusters import cluster_particles, weighted_kmeans
from cryosip.analysis.interactive import write_interactive_report
from cryosip.analysis.posterior import read_posterior_npz
from cryosip.analysis.structures import cv_line, weighted_quantile
from cryosip.cli.main import main
from cryosip.data.outputs import read_ensemble_weights
from cryosip.sip.smoothing import POINTS_PER_CV


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return reconstructed_runs(tmp_path_factory)


def test_distribution_files(runs):
    rec = runs["star"]
    parts = pd.read_csv(rec / "distribution_particles.csv")
    summary = json.loads((rec / "summary.json").read_text())
    # the regularised flow's distribution: 32 particles, each spread over 17 kernel points
    # (distribution_particles.csv); the particles themselves in flow_particles.csv
    assert summary["regularisation"]["bandwidth_relative"] > 0
    assert list(parts.columns) == ["s", "weight"] and len(parts) == POINTS_PER_CV[1] * 32
    np.testing.assert_allclose(parts["weight"].sum(), 1.0, rtol=1e-5)
    flow = pd.read_csv(rec / "flow_particles.csv")
    assert len(flow) == 32
    np.testing.assert_allclose(flow["weight"].sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(  # the kernel keeps each particle's mean
        np.average(parts["s"], weights=parts["weight"]),
        np.average(flow["s"], weights=flow["weight"]),
        atol=2e-3,  # up to the reflection of kernel points at the domain walls
    )
    assert not (rec / "particles.csv").exists()
    dist = pd.read_csv(rec / "distribution.csv")
    np.testing.assert_allclose(np.trapezoid(dist["density"], dist["s"]), 1.0, rtol=1e-3)
    fe = pd.read_csv(rec / "free_energy.csv")
    np.testing.assert_allclose(fe["free_energy_kT"].min(), 0.0, atol=1e-12)
    for f in ("report.html", "particles_cv.star", "z.pkl", "posterior.npz", "ensemble.cif"):
        assert f in summary["outputs"], f


def test_per_image_star(runs):
    rec, sim = runs["star"], runs["sim"]
    inp = starfile.read(sim / "particles.star", always_dict=True)
    out = starfile.read(rec / "particles_cv.star", always_dict=True)
    assert set(out) == set(inp)
    pin, pout = inp["particles"], out["particles"]
    assert list(pout.columns) == list(pin.columns) + ["cryosipCvMean", "cryosipCvSd"]
    for c in pin.columns:
        if c != "rlnImageName":
            np.testing.assert_allclose(pout[c].to_numpy(), pin[c].to_numpy(), rtol=1e-6, atol=0)
    # image names resolve from anywhere: absolute paths to the same stacks and indices
    for a, b in zip(pin["rlnImageName"], pout["rlnImageName"]):
        ia, pa = a.split("@")
        ib, pb = b.split("@")
        assert int(ia) == int(ib) and os.path.isabs(pb) and os.path.isfile(pb)
        assert os.path.samefile(pb, sim / pa)
    mean = pout["cryosipCvMean"].to_numpy()
    sd = pout["cryosipCvSd"].to_numpy()
    assert ((mean >= 0) & (mean <= 1)).all() and (sd >= 0).all()
    # images that the truth puts at the two ends get CV estimates at the two ends
    truth = pd.read_csv(sim / "truth.csv")["s"].to_numpy()
    assert np.corrcoef(mean, truth)[0, 1] > 0.8
    with open(rec / "z.pkl", "rb") as f:
        z = pickle.load(f)
    assert z.dtype == np.float32 and z.shape == (N_IMAGES, 1)
    np.testing.assert_allclose(z[:, 0], mean, rtol=1e-6, atol=1e-7)
    post = read_posterior_npz(rec / "posterior.npz")
    assert post["table"] == "particles_cv.star" and post["cv_names"] == ["s"]
    r = post["responsibilities"]
    assert (
        r.shape == (N_IMAGES, POINTS_PER_CV[1] * 32) == (N_IMAGES, len(post["positions"]))
    )  # over rho_h's points
    np.testing.assert_allclose(r.sum(1), 1.0, atol=5e-3)
    np.testing.assert_allclose(r @ post["positions"][:, 0], mean, atol=5e-3)
    np.testing.assert_allclose(post["mean"][:, 0], mean, rtol=1e-6, atol=1e-8)


def test_inspect_opens_the_per_image_star_from_another_folder(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(runs["star"] / "particles_cv.star"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_particles"] == N_IMAGES and info["box_size"] == 32
    np.testing.assert_allclose(info["pixel_size"], 3.0, rtol=1e-6)


def test_per_image_cs(runs):
    rec, sim = runs["cs"], runs["sim"]
    src = np.load(sim / "particles.cs")
    out = np.load(rec / "particles_cv.cs")
    assert list(out.dtype.names) == list(src.dtype.names) + ["cryosip/cv_mean", "cryosip/cv_sd"]
    for name in src.dtype.names:
        if name != "blob/path":
            np.testing.assert_array_equal(out[name], src[name])
    for p_in, p_out in zip(src["blob/path"], out["blob/path"]):
        p_out = p_out.decode()
        assert os.path.isabs(p_out) and os.path.samefile(p_out, sim / p_in.decode().lstrip(">"))
    # the .cs and the STAR runs see the same images and give the same per-image CV
    star = starfile.read(runs["star"] / "particles_cv.star", always_dict=True)["particles"]
    np.testing.assert_allclose(out["cryosip/cv_mean"], star["cryosipCvMean"], atol=2e-3)
    assert read_posterior_npz(rec / "posterior.npz")["table"] == "particles_cv.cs"
    assert (rec / "z.pkl").exists() and (rec / "report.html").exists()


def test_volume_series(runs):
    rec = runs["star"]
    files = sorted(glob.glob(str(rec / "volumes" / "cv_*.mrc")))
    assert len(files) == 11
    maps = []
    for f in files:
        with mrcfile.open(f, permissive=False) as m:
            np.testing.assert_allclose(
                [m.voxel_size.x, m.voxel_size.y, m.voxel_size.z], 3.0, rtol=1e-6
            )
            assert m.data.shape == (32, 32, 32) and m.data.dtype == np.float32
            assert int(m.header.ispg) == 1
            np.testing.assert_allclose(
                [m.header.origin.x, m.header.origin.y, m.header.origin.z], -16 * 3.0, rtol=1e-6
            )
            maps.append(np.array(m.data))
    assert all(np.isfinite(v).all() and v.max() > 0 for v in maps)
    # the maps change along the CV (closed -> open)
    assert np.abs(maps[0] - maps[-1]).max() > 0.1 * maps[0].max()


def test_ensemble_and_trajectory(runs):
    rec = runs["star"]
    table = pd.read_csv(rec / "ensemble.csv")
    np.testing.assert_allclose(table["population"].sum(), 1.0, atol=1e-9)
    for name in ("ensemble.cif", "ensemble.pdb"):
        st = gemmi.read_structure(str(rec / name))
        assert len(st) == len(table)
        assert st[0].count_atom_sites() == 214  # C-alpha AdK
        w = read_ensemble_weights(rec / name)
        np.testing.assert_allclose(w.sum(), 1.0, atol=1e-6)
        np.testing.assert_allclose(w, table["population"], atol=1e-7)
    traj = gemmi.read_structure(str(rec / "trajectory.pdb"))
    assert len(traj) == 11
    tt = pd.read_csv(rec / "trajectory.csv")
    np.testing.assert_allclose(tt["population"].sum(), 1.0, atol=1e-9)
    parts = pd.read_csv(rec / "distribution_particles.csv")
    q = weighted_quantile(parts["s"], parts["weight"], [0.01, 0.99])
    np.testing.assert_allclose([tt["s"].iloc[0], tt["s"].iloc[-1]], q, atol=1e-6)
    # the first and last frames differ (closed vs open AdK)
    a = np.array([at.pos.tolist() for res in traj[0][0] for at in res])
    b = np.array([at.pos.tolist() for res in traj[10][0] for at in res])
    assert np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))) > 1.0


def test_chimerax_script_names_files_that_exist(runs):
    rec = runs["star"]
    text = (rec / "chimerax_series.cxc").read_text()
    assert "open volumes/cv_*.mrc vseries true" in text
    assert "open trajectory.pdb coordsets true" in text and "coordset slider" in text
    assert "vseries slider #1" in text and "2dlabels create" in text and "pop " in text
    for line in text.splitlines():
        if line.startswith("open "):
            target = line.split()[1]
            assert glob.glob(str(rec / target)), target


def _report(tmp_path, summary, png=None):
    frames = [{"t": t, "text": f"s = {t:.2f}"} for t in (0.2, 0.5, 0.8)]
    curve = {"x": [0.0, 0.5, 1.0], "y": [1.0, 2.0, 1.0], "ylabel": "density", "color": "#00f"}
    path = tmp_path / "report.html"
    write_interactive_report(
        path,
        title="t",
        summary=summary,
        frames_pdb="",
        frames=frames,
        start=1,
        xlabel="s",
        xrange=(0.0, 1.0),
        density=curve,
        free_energy=curve,
        representation="backbone",
        summary_rows=[("images", 10)],
        fit_check_png=png,
    )
    return path.read_text()


def test_report_fit_check_section(tmp_path, runs):
    page = _report(tmp_path, {})
    assert "Fit check: <b>not run</b>" in page
    fit = {"ok": False, "warnings": ["residual power <high>"], "statistics": {"chi2_z": 3.5}}
    page = _report(tmp_path, {"fit_check": fit}, png=str(runs["star"] / "density.png"))
    assert "FAILED" in page and "residual power &lt;high&gt;" in page and "chi2_z" in page
    assert "data:image/png;base64," in page
    page = _report(tmp_path, {"fit_check": {"ok": True, "warnings": [], "statistics": {}}})
    assert "<b>passed</b>" in page
    # the reconstruction's own report: NGL inlined, 21 frames, the fit check of the run
    page = (runs["star"] / "report.html").read_text()
    assert "NGL" in page and page.count("\nMODEL ") + page.startswith("MODEL ") >= 21
    summary = json.loads((runs["star"] / "summary.json").read_text())
    assert ("fit_check" in summary) == ("not run" not in page.split("<h2>")[0])
    # the chosen kernel and the held-out evidence for it (issue 17: shown in the report)
    reg = summary["regularisation"]
    assert f"{reg['bandwidth_relative']:g} of each CV" in page and "best total" in page
    assert page.count(": 0.0,") + page.count(": 0.0<") == 1  # the best candidate, once


def test_cv_line_and_clusters():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0.25, 0.04, 300), rng.normal(0.75, 0.04, 200)].clip(0, 1)
    w = np.full(x.size, 1.0 / x.size)
    pts, t = cv_line(x[:, None], w, [0.0], [1.0], 11)
    np.testing.assert_allclose(t[[0, -1]], np.quantile(x, [0.01, 0.99]), atol=0.01)
    labels, cuts = cluster_particles(x, w, 2, [0.0], [1.0])
    np.testing.assert_allclose(cuts, [0.5], atol=0.08)
    np.testing.assert_array_equal(labels, (x > cuts[0]).astype(int))
    np.testing.assert_allclose(np.mean(labels == 0), 0.6, atol=0.01)
    y = np.c_[x, rng.normal(0, 0.01, x.size)]
    lab2, centers = weighted_kmeans(y, w, 2, seed=0)
    assert len(centers) == 2
    agree = np.mean(lab2 == labels)
    assert agree > 0.99 or agree < 0.01
