"""Foreign data sets made the way a real pipeline hands them over: simulated by **cryojax**,
written by **cryospax** (cryojax's RELION writer), with the nuisances real data carry.

Used by the tests (small) and by ``benchmarks/foreign_data.py`` (full size). Nothing here calls
cryosip's simulator: the images come from cryojax's ``GaussianMixtureVolume`` +
``GaussianMixtureProjection`` in ``quantity_mode="contrast"`` with

- a per-image amplitude ``U(amplitude_range)`` and a per-image offset ``N(0, offset_sd * sigma)``
  that the STAR does not state (ice thickness, dose, normalisation);
- inverted contrast (white protein, as RELION extracts by default) when ``invert``;
- coloured noise (cryojax's ``GaussianColoredNoiseModel``) with the power spectrum
  :func:`noise_shape` (more power at low frequency, a flat floor), or white noise;
- an envelope ``exp(-B k^2 / 4)`` with ``bfactor`` that the STAR does not state;
- written poses off the true ones by ``N(0, angle_error_deg)`` per Euler angle (an RMS rotation
  error of about 1.6x that), shifts by ``N(0, shift_error_A)`` per axis and defocus by
  ``N(0, defocus_error_A)`` (the same offset on U and V), as a consensus refinement leaves them.

The SNR is the box-averaged variance of the (amplitude-scaled) clean images over the pixel
variance of the noise, cryosip's own definition. cryospax 0.2.1 writes cryojax's astigmatism
azimuth verbatim into ``rlnDefocusAngle``; RELION measures it from x, cryojax from y
(``tests/cli/test_cryojax_data.py``), so the STAR is mended to RELION's angle after writing,
as a RELION hand-over would carry it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import starfile


@dataclasses.dataclass(frozen=True)
class ForeignSpec:
    n_images: int = 300
    box: int = 128
    pixel_size: float = 1.5
    snr: float = 0.1
    distribution: str = "bimodal"
    amplitude_range: tuple[float, float] = (0.75, 1.25)
    offset_sd: float = 0.3  # in units of the noise sd
    invert: bool = True
    coloured: bool = True
    bfactor: float = 40.0  # A^2, not written to the STAR
    angle_error_deg: float = 1.0
    shift_error_A: float = 0.7
    defocus_error_A: float = 50.0
    shift_sd_in_angstroms: float = 2.0
    seed: int = 0


def noise_shape(k):
    """Relative noise power at spatial frequency ``k`` (1/A): a low-frequency excess over a floor."""
    k0 = 1.0 / 60.0
    return 0.35 + 1.0 / (1.0 + (k / k0) ** 2)


def _perturb_star(path: Path, written: dict) -> None:
    """Replace pose, shift, defocus and azimuth columns with the 'refined' (erroneous) values."""
    blocks = starfile.read(path, always_dict=True)
    p = blocks["particles"]
    for col, vals in written.items():
        p[col] = np.asarray(vals, np.float64)
    blocks["particles"] = p
    starfile.write(blocks, path, overwrite=True)


def make_foreign_set(root, model, spec: ForeignSpec = ForeignSpec()) -> dict:
    """Simulate ``spec.n_images`` images of ``model`` (a cryosip conformation model: CV -> atoms)
    with cryojax, write them with cryospax under ``root``; returns the truth and the nuisances."""
    import cryojax.ndimage as cxn
    import cryojax.simulator as cxs
    import cryospax as spx

    from cryosip.data.distributions import make_distribution

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n, rng = spec.n_images, np.random.default_rng(spec.seed)
    s = np.asarray(
        make_distribution(spec.distribution, model.lower, model.upper).sample(spec.seed, n)
    )
    coords = np.asarray(jax.jit(jax.vmap(model))(jnp.asarray(s, jnp.float32)))
    amplitudes, variances = np.asarray(model.atoms.amplitudes), np.asarray(model.atoms.variances)

    phi, psi = rng.uniform(-180, 180, n), rng.uniform(-180, 180, n)
    theta = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    offset = rng.normal(0.0, spec.shift_sd_in_angstroms, (n, 2))
    defocus, astig = rng.uniform(10000.0, 25000.0, n), rng.normal(0.0, 300.0, n)
    azimuth = rng.uniform(0.0, 180.0, n)
    amp = rng.uniform(*spec.amplitude_range, n)
    sign = -1.0 if spec.invert else 1.0

    def true_params(i=slice(None)):
        pose = cxs.EulerAnglePose(offset[i, 0], offset[i, 1], phi[i], theta[i], psi[i])
        ctf = cxs.AstigmaticCTF(
            defocus_in_angstroms=defocus[i],
            astigmatism_in_angstroms=astig[i],
            astigmatism_angle=azimuth[i],
            spherical_aberration_in_mm=np.full(n, 2.7)[i],
        )
        return pose, ctf

    pose, ctf = true_params()
    transfer = cxs.ContrastTransferTheory(
        ctf, amplitude_contrast_ratio=np.full(n, 0.1), phase_shift=np.zeros(n)
    )
    config = cxs.BasicImageConfig((spec.box, spec.box), spec.pixel_size, voltage_in_kilovolts=300.0)
    params = spx.RelionParticleParameterFile(root / "particles.star", mode="w")
    params.append(dict(pose=pose, transfer_theory=transfer, image_config=config))
    dataset = spx.RelionParticleDataset(
        params, root, mode="w", mrcfile_options=dict(prefix="stack")
    )
    envelope = cxn.FourierGaussian(amplitude=1.0, b_factor=spec.bfactor) if spec.bfactor else None

    def image_model(info, xyz):
        tt = info["transfer_theory"]
        tt = cxs.ContrastTransferTheory(
            tt.ctf, envelope=envelope, amplitude_contrast_ratio=tt.amplitude_contrast_ratio
        )
        return cxs.make_image_model(
            cxs.GaussianMixtureVolume(xyz, amplitudes, variances),
            info["image_config"],
            info["pose"],
            tt,
            cxs.GaussianMixtureProjection(),
            quantity_mode="contrast",
        )

    def simulate(info, xyz):
        # cryojax relies on implicit dtype promotion (complex64 * float32), which the strict
        # promotion of the test session (tests/conftest.py, issue 16) refuses: standard for it
        with jax.numpy_dtype_promotion("standard"):
            return image_model(info, xyz).simulate()

    render = eqx.filter_jit(eqx.filter_vmap(simulate, in_axes=(spx.get_in_axes(params), 0)))
    clean = np.concatenate(
        [
            np.asarray(render(params[np.arange(a, min(n, a + 256))], coords[a : a + 256]))
            for a in range(0, n, 256)
        ]
    )
    signal_var = float(np.mean(np.var(amp[:, None] * clean.reshape(n, -1), axis=1)))
    sigma = float(np.sqrt(signal_var / spec.snr))

    # noise power per Fourier mode: shape(k) normalised so that the pixel variance is sigma^2
    ky = np.fft.fftfreq(spec.box, spec.pixel_size)
    kx = np.fft.rfftfreq(spec.box, spec.pixel_size)
    kk = np.hypot(ky[:, None], kx[None, :])
    shape = noise_shape(kk) if spec.coloured else np.ones_like(kk)
    full = np.concatenate([shape, shape[:, 1 : spec.box // 2][:, ::-1]], axis=1)  # full grid mean
    norm = float(np.mean(full))
    variance = sigma**2 / norm
    colour = cxn.CustomFourierOperator(
        lambda f: (
            variance
            * jnp.asarray(noise_shape(jnp.linalg.norm(f, axis=-1)) if spec.coloured else 1.0)
            * jnp.ones(f.shape[:-1])
        )
    )
    offsets = rng.normal(0.0, spec.offset_sd * sigma, n)

    def simulate_fn(info, _, per_particle):
        xyz, key, a, b = per_particle
        with jax.numpy_dtype_promotion("standard"):  # cryojax: implicit promotion (issue 16)
            noisy = cxs.GaussianColoredNoiseModel(
                image_model(info, xyz), colour, signal_scale_factor=sign * a, signal_offset=b
            )
            return noisy.sample(key)

    keys = jax.random.split(jax.random.key(spec.seed + 1), n)
    spx.simulate_particle_stack(
        dataset,
        simulate_fn,
        per_particle_args=(coords, keys, jnp.asarray(amp), jnp.asarray(offsets)),
        batch_size=min(n, 256),
    )

    # what a consensus refinement writes: poses, shifts and defocus with errors; RELION's azimuth
    star = starfile.read(root / "particles.star", always_dict=True)["particles"]
    e = lambda sd: rng.normal(0.0, sd, n)  # noqa: E731
    dz = e(spec.defocus_error_A)
    written = {
        "rlnAngleRot": star["rlnAngleRot"] + e(spec.angle_error_deg),
        "rlnAngleTilt": star["rlnAngleTilt"] + e(spec.angle_error_deg),
        "rlnAnglePsi": star["rlnAnglePsi"] + e(spec.angle_error_deg),
        "rlnOriginXAngst": star["rlnOriginXAngst"] + e(spec.shift_error_A),
        "rlnOriginYAngst": star["rlnOriginYAngst"] + e(spec.shift_error_A),
        "rlnDefocusU": star["rlnDefocusU"] + dz,
        "rlnDefocusV": star["rlnDefocusV"] + dz,
        "rlnDefocusAngle": (90.0 - star["rlnDefocusAngle"]) % 180.0,
    }
    _perturb_star(root / "particles.star", written)
    pd.DataFrame({name: s[:, i] for i, name in enumerate(model.cv_names)}).to_csv(
        root / "truth.csv", index=False
    )
    true = dict(
        phi=phi, theta=theta, psi=psi, offset=offset, defocus=defocus, astig=astig,
        azimuth=azimuth, amplitude=sign * amp, image_offset=offsets, noise_variance=variance,
    )  # fmt: skip
    return dict(
        root=root, s=s, sigma=sigma, amplitude=amp, offset=offsets, clean=clean, spec=spec,
        true=true, model=model,
    )  # fmt: skip


def grid_em_oracle(data: dict, n_nodes: int = 33, *, knows_truth: bool, batch: int = 128):
    """Grid EM with exact physics written with cryojax: every image rendered at ``n_nodes`` CV
    nodes, the node weights by EM. Returns (nodes (G,), weights (G,)).

    ``knows_truth``: the true poses, CTF and envelope, the true per-image amplitude and offset,
    and the true coloured noise (the likelihood whitened by it) - the best any method can do.
    Otherwise only what the files say: the written (erroneous) poses, shifts and defocus, no
    envelope, a per-image scale and offset profiled by least squares (either sign), and white
    noise of the pooled residual variance - the obvious script a methods developer writes.
    """
    import cryojax.ndimage as cxn
    import cryojax.simulator as cxs
    import mrcfile

    spec, model, root = data["spec"], data["model"], Path(data["root"])
    n = spec.n_images
    nodes = np.linspace(float(model.lower[0]), float(model.upper[0]), n_nodes)
    coords = np.asarray(jax.vmap(model)(jnp.asarray(nodes[:, None], jnp.float32)))
    amplitudes, variances = np.asarray(model.atoms.amplitudes), np.asarray(model.atoms.variances)
    star = starfile.read(root / "particles.star", always_dict=True)["particles"]
    images = []
    for name in sorted(set(star["rlnImageName"].str.split("@").str[1])):
        with mrcfile.open(root / name, permissive=True) as f:
            images.append(np.asarray(f.data, np.float64))
    y = np.concatenate(images).reshape(n, -1)
    if knows_truth:
        t = data["true"]
        pose = (t["offset"][:, 0], t["offset"][:, 1], t["phi"], t["theta"], t["psi"])
        ctf = (t["defocus"], t["astig"], t["azimuth"])
        envelope = (
            cxn.FourierGaussian(amplitude=1.0, b_factor=spec.bfactor) if spec.bfactor else None
        )
    else:  # the files as cryospax reads them (its Euler and origin conventions)
        import cryospax as spx

        written = spx.RelionParticleParameterFile(root / "particles.star", mode="r")[np.arange(n)]
        p, c = written["pose"], written["transfer_theory"].ctf
        pose = tuple(
            np.asarray(a, np.float64)
            for a in (p.offset_x_in_angstroms, p.offset_y_in_angstroms, p.phi_angle,
                      p.theta_angle, p.psi_angle)
        )  # fmt: skip
        # the STAR carries RELION's azimuth (mended after writing); cryojax's is 90 - it
        ctf = (
            np.asarray(c.defocus_in_angstroms, np.float64),
            np.asarray(c.astigmatism_in_angstroms, np.float64),
            (90.0 - np.asarray(c.astigmatism_angle, np.float64)) % 180.0,
        )
        envelope = None
    config = cxs.BasicImageConfig((spec.box, spec.box), spec.pixel_size, voltage_in_kilovolts=300.0)

    def render(ox, oy, a, b, c, df, ast, az, xyz):
        tt = cxs.ContrastTransferTheory(
            cxs.AstigmaticCTF(
                defocus_in_angstroms=df, astigmatism_in_angstroms=ast, astigmatism_angle=az,
                spherical_aberration_in_mm=2.7,
            ),
            envelope=envelope, amplitude_contrast_ratio=0.1,
        )  # fmt: skip
        with jax.numpy_dtype_promotion("standard"):  # cryojax: implicit promotion (issue 16)
            return cxs.make_image_model(
                cxs.GaussianMixtureVolume(xyz, amplitudes, variances), config,
                cxs.EulerAnglePose(ox, oy, a, b, c), tt, cxs.GaussianMixtureProjection(),
                quantity_mode="contrast",
            ).simulate()  # fmt: skip

    per_node = jax.vmap(render, in_axes=(None,) * 8 + (0,))
    f = jax.jit(jax.vmap(per_node, in_axes=(0,) * 8 + (None,)))
    params = np.stack([*pose, *ctf], axis=1)
    L = np.empty((n, n_nodes))
    if knows_truth:
        ky = np.fft.fftfreq(spec.box, spec.pixel_size)
        kx = np.fft.rfftfreq(spec.box, spec.pixel_size)
        kk = np.hypot(ky[:, None], kx[None, :])
        w = 1.0 / np.sqrt(noise_shape(kk) if spec.coloured else np.ones_like(kk))
        whiten = lambda x: np.fft.irfft2(np.fft.rfft2(x) * w, s=(spec.box, spec.box))  # noqa: E731
        yw = whiten(y.reshape(n, spec.box, spec.box)).reshape(n, -1)
        var = data["true"]["noise_variance"]
    for s in range(0, n, batch):
        e = min(n, s + batch)
        idx = np.minimum(np.arange(s, s + batch), n - 1)
        m = np.asarray(f(*[jnp.asarray(params[idx, i]) for i in range(8)], jnp.asarray(coords)))
        m = m[: e - s].astype(np.float64).reshape(e - s, n_nodes, -1)
        if knows_truth:
            t = data["true"]
            mm = t["amplitude"][s:e, None, None] * m + t["image_offset"][s:e, None, None]
            mw = whiten(mm.reshape(-1, spec.box, spec.box)).reshape(e - s, n_nodes, -1)
            L[s:e] = -0.5 * ((yw[s:e, None, :] - mw) ** 2).sum(-1) / var
        else:
            yc = y[s:e, None, :] - y[s:e, None, :].mean(-1, keepdims=True)
            mc = m - m.mean(-1, keepdims=True)
            a = (yc * mc).sum(-1) / (mc * mc).sum(-1)
            L[s:e] = ((yc - a[..., None] * mc) ** 2).sum(-1)  # residual power, scaled below
    if not knows_truth:
        sigma2 = np.mean(L.min(axis=1)) / y.shape[1]
        L = -0.5 * L / sigma2
    wts = np.full(n_nodes, 1.0 / n_nodes)
    for _ in range(500):
        lp = L + np.log(np.maximum(wts, 1e-300))[None]
        r = np.exp(lp - lp.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        new = r.mean(0)
        if np.abs(new - wts).max() < 1e-8:
            wts = new
            break
        wts = new
    return nodes, wts
