"""Optics groups at different pixel sizes / boxes brought onto one working grid.

The reference is physics, not the code under test: the same AdK structure rendered directly on
the working grid. Atoms are 2 A Gaussians (band-limited well inside the coarser grid's Nyquist,
so sampling on either grid loses nothing), and the image model sizes its window for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryosip.cryoem.atoms import AtomParameters
from cryosip.cryoem.image_model import ImageModel
from cryosip.data.adk import adk_model
from cryosip.data.mrc import write_mrcs
from cryosip.data.particles import (
    GroupedImages,
    ParticleStack,
    read_particles,
    resampling_matrix,
    to_working_grid,
    working_grid,
    working_pixel_size,
)
from cryosip.data.star import read_star, write_star


def _gauss(x):
    return np.exp(-((x - 10.0) ** 2) / 8.0) + 0.5 * np.exp(-((x + 20.0) ** 2) / 8.0)


@pytest.mark.parametrize(
    "grids", [(64, 1.24, 64, 1.25), (64, 1.25, 64, 1.24), (80, 1.0, 64, 1.25), (65, 1.0, 80, 0.8)]
)
def test_resampling_matrix_is_exact_for_band_limited_signals(grids):
    d_in, p_in, d_out, p_out = grids
    x_in = (np.arange(d_in) - d_in // 2) * p_in
    x_out = (np.arange(d_out) - d_out // 2) * p_out
    R = resampling_matrix(d_in, p_in, d_out, p_out)
    assert R.shape == (d_out, d_in)
    np.testing.assert_allclose(R @ _gauss(x_in), _gauss(x_out), rtol=0, atol=2e-6)
    np.testing.assert_allclose(R.sum(axis=1), 1.0, rtol=0, atol=1e-12)  # constants kept
    np.testing.assert_allclose(resampling_matrix(d_in, p_in, d_in, p_in), np.eye(d_in), atol=1e-12)


def test_working_grid_rule():
    # largest pixel size, smallest even box whose field covers the smallest field (79.36 A)
    assert working_grid([64, 64], [1.24, 1.25]) == (64, 1.25)
    assert working_grid([64, 80], [1.25, 1.0]) == (64, 1.25)
    box, px = working_grid([64, 64], [1.24, 1.25], box_size=32)
    assert box == 32 and px == pytest.approx(64 * 1.24 / 32)
    assert px == working_pixel_size(64, 1.24, 32)
    assert working_grid([48], [1.7]) == (48, 1.7)  # one grid is kept
    assert working_grid([48], [1.7], box_size=24) == (24, pytest.approx(3.4))


def _render_groups(D, pixel_sizes, n_per_group, seed=0):
    """AdK (C-alpha) rendered with the same nuisances at each pixel size: {px: (n, D, D)}."""
    model = adk_model(ca_only=True)
    coords = jnp.asarray(model.coordinates(jnp.array([0.5])), jnp.float32)
    atoms = AtomParameters.single_gaussian(coords.shape[0], sigma_in_angstroms=2.0)
    rng = np.random.default_rng(seed)
    n = n_per_group
    nu = ParticleStack.make_nuisance(
        Rotation.random(n, random_state=seed).as_matrix(),
        rng.normal(0, 2.0, (n, 2)),
        # an (almost) flat CTF: a defocused CTF spreads signal beyond the box, and boxes of
        # different fields wrap it differently (a property of the data, not of the resampling)
        defocus_u_in_angstroms=rng.uniform(1.0, 10.0, n),
        amplitude_contrast=1.0,
        spherical_aberration_in_mm=0.0,
    )
    out = {}
    for p in pixel_sizes:
        m = ImageModel.for_atoms(D, p, atoms)
        out[p] = np.stack(
            [
                np.asarray(
                    m.render(coords, atoms, jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), nu))
                )
                for i in range(n)
            ]
        ).astype(np.float32)
    return nu, out


def write_two_group_star(root, D=64, pixel_sizes=(1.24, 1.25), n_per_group=3, seed=0):
    """A RELION 3.1 STAR whose two optics groups hold the same particles rendered at two pixel
    sizes (one stack per group); returns (path, nuisance of one group, rendered images)."""
    nu, imgs = _render_groups(D, pixel_sizes, n_per_group, seed)
    names = []
    for g, p in enumerate(pixel_sizes):
        write_mrcs(root / f"group{g + 1}.mrcs", imgs[p], p)
        names += [f"{i + 1:06d}@group{g + 1}.mrcs" for i in range(n_per_group)]
    both = jax.tree_util.tree_map(lambda a: np.concatenate([a, a]), nu)
    meta = pd.DataFrame({"rlnOpticsGroup": np.repeat([1, 2], n_per_group)})
    stack = ParticleStack(
        np.zeros((2 * n_per_group, D, D), np.float32), both, pixel_sizes[-1], metadata=meta
    )
    path = root / "two_groups.star"
    write_star(path, stack, image_names=names)
    blocks = starfile.read(path)
    blocks["optics"]["rlnImagePixelSize"] = list(pixel_sizes)
    starfile.write(blocks, path, overwrite=True)
    return path, nu, imgs


def _lowpass(images, pixel_size, k_max):
    f = np.fft.fft2(np.asarray(images, np.float64))
    D = f.shape[-1]
    k = np.fft.fftfreq(D, d=pixel_size)
    f[..., np.hypot(k[:, None], k[None, :]) > k_max] = 0
    return np.fft.ifft2(f).real


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def test_two_optics_groups_at_124_and_125_match_direct_rendering(tmp_path):
    path, _, imgs = write_two_group_star(tmp_path)
    s = read_star(path)
    assert s.box_size == 64 and s.pixel_size == pytest.approx(1.25)
    assert isinstance(s.images, GroupedImages)
    np.testing.assert_array_equal(s.group_ids(), [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(s.grids()[:, 1], [1.24] * 3 + [1.25] * 3, rtol=1e-7)
    got = np.asarray(s.images)
    direct = imgs[1.25]
    # the 1.25 group is read as it is; the 1.24 group resampled matches the direct rendering
    np.testing.assert_allclose(got[3:], direct, rtol=0, atol=0)
    assert _rel(imgs[1.24], direct) > 0.02  # not resampling is visibly wrong
    # all frequencies: the remaining difference is the two grids' pixel-averaging filters
    assert _rel(got[:3], direct) < 6e-3
    # below half the coarser Nyquist (0.2 1/A) the pixel filters agree to 0.1 %
    low = _rel(_lowpass(got[:3], 1.25, 0.2), _lowpass(direct, 1.25, 0.2))
    assert low < 2e-3, low
    # lazily: a chunk of particles gives the same as the whole
    np.testing.assert_allclose(s.images[np.array([4, 0])], got[[4, 0]], rtol=0, atol=0)
    part = s.take([2, 5])
    assert isinstance(part.images, GroupedImages)
    np.testing.assert_array_equal(part.group_ids(), [0, 1])
    np.testing.assert_allclose(np.asarray(part.images), got[[2, 5]], rtol=0, atol=0)


def test_requested_box_sets_the_pixel_size_over_the_smallest_field(tmp_path):
    path, _, imgs = write_two_group_star(tmp_path)
    s = read_particles(path, box_size=32)
    assert s.box_size == 32
    np.testing.assert_allclose(s.pixel_size, 64 * 1.24 / 32, rtol=1e-12)
    # to_working_grid always resamples from the native images (no double resampling)
    assert (again_box := to_working_grid(s).box_size) == 64, again_box
    again = to_working_grid(s)  # the default grid again: 64 px x 1.25 A
    np.testing.assert_allclose(
        np.asarray(again.images), np.asarray(read_star(path).images), atol=1e-6
    )
    # the 1.25 group at 32 px x 2.48 A equals the direct rendering resampled once
    R = resampling_matrix(64, 1.25, 32, 64 * 1.24 / 32)
    ref = np.einsum("ji,nik,lk->njl", R, imgs[1.25].astype(np.float64), R)
    np.testing.assert_allclose(np.asarray(s.images)[3:], ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    with pytest.raises(Exception, match="finer than the finest"):
        read_particles(path, box_size=128)


def test_different_boxes_and_pixel_sizes(tmp_path):
    """Groups 80 px x 1.0 A and 64 px x 1.25 A (same 80 A field): working grid 64 x 1.25."""
    nu, imgs = _render_groups(80, (1.0,), 2)
    _, imgs64 = _render_groups(64, (1.25,), 2)
    write_mrcs(tmp_path / "a.mrcs", imgs[1.0], 1.0)
    write_mrcs(tmp_path / "b.mrcs", imgs64[1.25], 1.25)
    both = jax.tree_util.tree_map(lambda a: np.concatenate([a, a]), nu)
    meta = pd.DataFrame({"rlnOpticsGroup": [1, 1, 2, 2]})
    st = ParticleStack(np.zeros((4, 64, 64), np.float32), both, 1.25, metadata=meta)
    path = tmp_path / "mixed.star"
    write_star(
        path, st, image_names=["000001@a.mrcs", "000002@a.mrcs", "000001@b.mrcs", "000002@b.mrcs"]
    )
    blocks = starfile.read(path)
    blocks["optics"]["rlnImagePixelSize"] = [1.0, 1.25]
    blocks["optics"]["rlnImageSize"] = [80, 64]
    starfile.write(blocks, path, overwrite=True)
    s = read_star(path)
    assert (s.box_size, s.pixel_size) == (64, 1.25)
    got = np.asarray(s.images)
    assert _rel(got[:2], imgs64[1.25]) < 1e-2
