"""Tiny particle sets made in code for the I/O tests."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from cryosip.data.mrc import MrcsWriter
from cryosip.data.particles import ParticleStack


def random_stack(
    seed: int = 0,
    n: int = 6,
    box: int = 16,
    pixel_size: float = 1.5,
    *,
    bfactor: bool = True,
    voltage=300.0,
) -> ParticleStack:
    """Random poses, shifts, astigmatic CTF and random images (in memory)."""
    rng = np.random.default_rng(seed)
    rot = Rotation.random(n, random_state=seed).as_matrix()
    shift = rng.normal(0, 3.0, (n, 2))
    nu = ParticleStack.make_nuisance(
        rot,
        shift,
        defocus_u_in_angstroms=rng.uniform(8e3, 2.5e4, n),
        defocus_v_in_angstroms=rng.uniform(8e3, 2.5e4, n),
        defocus_angle_in_degrees=rng.uniform(-90, 180, n),
        voltage_in_kilovolts=voltage,
        spherical_aberration_in_mm=2.7,
        amplitude_contrast=0.07,
        phase_shift_in_degrees=rng.uniform(0, 30, n),
        bfactor_in_angstroms2=rng.uniform(0, 80, n) if bfactor else 0.0,
        scale=rng.uniform(0.5, 1.5, n) if bfactor else 1.0,
    )
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    return ParticleStack(images, nu, pixel_size)


def save_images(path, stack: ParticleStack) -> list[str]:
    """Write the stack's images with MrcsWriter (two chunks); return RELION image names."""
    n = len(stack)
    with MrcsWriter(path, n, stack.box_size, stack.pixel_size) as w:
        w.write(np.asarray(stack.images[: n // 2]))
        w.write(np.asarray(stack.images[n // 2 :]))
    return [f"{i + 1:06d}@{path.name}" for i in range(n)]


def assert_same_particles(
    a: ParticleStack, b: ParticleStack, *, images: bool = True, ctf_b_and_scale: bool = True
):
    """Poses (matrices), shifts, CTF (and images) equal to float32 tolerance."""
    np.testing.assert_allclose(
        np.asarray(b.nuisance.rotation), np.asarray(a.nuisance.rotation), rtol=0, atol=2e-6
    )
    np.testing.assert_allclose(
        np.asarray(b.nuisance.shift_in_angstroms),
        np.asarray(a.nuisance.shift_in_angstroms),
        rtol=1e-6,
        atol=2e-5,
    )
    fields = [
        "defocus_u_in_angstroms",
        "defocus_v_in_angstroms",
        "defocus_angle_in_degrees",
        "voltage_in_kilovolts",
        "spherical_aberration_in_mm",
        "amplitude_contrast",
        "phase_shift_in_degrees",
    ]
    if ctf_b_and_scale:
        fields += ["bfactor_in_angstroms2", "scale"]
    for f in fields:
        np.testing.assert_allclose(
            np.asarray(getattr(b.nuisance.ctf, f)),
            np.asarray(getattr(a.nuisance.ctf, f)),
            rtol=1e-6,
            atol=2e-5,
            err_msg=f,
        )
    np.testing.assert_allclose(b.pixel_size, a.pixel_size, rtol=1e-6)
    assert b.box_size == a.box_size
    if images:
        np.testing.assert_allclose(np.asarray(b.images), np.asarray(a.images), rtol=0, atol=0)
