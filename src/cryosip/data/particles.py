"""ParticleStack: one type for real and simulated particle images with their nuisances."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..cryoem.ctf import CTFParams
from ..cryoem.image_model import CryoNuisance
from ..sip.operator import Observations


def nuisance_to_numpy(nu: CryoNuisance) -> CryoNuisance:
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), nu)


def take_nuisance(nu: CryoNuisance, idx) -> CryoNuisance:
    return jax.tree_util.tree_map(lambda a: a[idx], nu)


@dataclasses.dataclass
class ParticleStack:
    """Images (N, D, D) -- an array or a read-only memory map -- with per-particle nuisances.

    ``nuisance`` holds NumPy arrays (rotations in the RELION convention, shifts in Angstrom as
    the particle's displacement from the box centre, CTF parameters). ``metadata`` keeps the
    original per-particle table (e.g. the STAR rows) so that writers can preserve every column.

    ``images`` may also be a lazy accessor (:class:`cryosip.data.mrc.LazyImageStack`) that
    supports ``images[idx]`` with integer arrays and ``.shape``/``.ndim``; it reads from the
    stack files on demand. ``has_poses``/``has_shifts`` say whether the rotations/shifts came
    from the input (``False``: identity/zero placeholders). ``ctf_premultiplied`` and
    ``phase_flipped`` flag images the raw-data forward model does not describe.
    """

    images: np.ndarray
    nuisance: CryoNuisance
    pixel_size: float
    metadata: pd.DataFrame | None = None
    optics: pd.DataFrame | None = None
    source: str | None = None
    has_poses: bool = True
    has_shifts: bool = True
    ctf_premultiplied: bool = False
    phase_flipped: bool = False

    def __post_init__(self):
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (n, D, D), got {self.images.shape}")
        if len(self.nuisance.rotation) != self.images.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {len(self.nuisance.rotation)} nuisance rows"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def box_size(self) -> int:
        return int(self.images.shape[1])

    def subset(self, idx) -> ParticleStack:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        meta = None if self.metadata is None else self.metadata.iloc[idx].reset_index(drop=True)
        return dataclasses.replace(
            self,
            images=np.asarray(self.images[idx]),
            nuisance=take_nuisance(self.nuisance, idx),
            metadata=meta,
        )

    def take(self, idx) -> ParticleStack:
        """Like :meth:`subset` but keeps lazily read images lazy (nothing is loaded)."""
        from .mrc import LazyImageStack

        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        if not isinstance(self.images, LazyImageStack):
            return self.subset(idx)
        meta = None if self.metadata is None else self.metadata.iloc[idx].reset_index(drop=True)
        return dataclasses.replace(
            self,
            images=self.images.take(idx),
            nuisance=take_nuisance(self.nuisance, idx),
            metadata=meta,
        )

    def observations(self, idx=None) -> Observations:
        """The engine's view (JAX arrays): images with their known nuisances."""
        if idx is None:
            idx = np.arange(len(self))
        idx = np.asarray(idx)
        imgs = jnp.asarray(np.asarray(self.images[idx], np.float32))
        nu = jax.tree_util.tree_map(jnp.asarray, take_nuisance(self.nuisance, idx))
        return Observations(imgs, nu, jnp.asarray(idx, jnp.int32))

    @staticmethod
    def make_nuisance(rotation, shift_in_angstroms, **ctf_kwargs) -> CryoNuisance:
        """Build a NumPy-backed CryoNuisance from arrays (CTF keywords as in :meth:`CTFParams.make`)."""
        ctf = CTFParams.make(**ctf_kwargs)
        n = np.asarray(rotation).shape[0]
        ctf = jax.tree_util.tree_map(
            lambda a: np.broadcast_to(np.asarray(a, np.float32), (n,)).copy(), ctf
        )
        return CryoNuisance(
            np.asarray(rotation, np.float32), np.asarray(shift_in_angstroms, np.float32), ctf
        )


def downsample(stack: ParticleStack, box_size: int) -> ParticleStack:
    """Fourier-crop the images to ``box_size`` lazily (chunk by chunk as they are read).

    The pixel size is scaled by ``D / box_size``; shifts in Angstrom, poses and CTF are
    unchanged (a shift of ``t`` Angstrom is the same displacement in both boxes).
    """
    from .mrc import LazyImageStack, TransformedImages, fourier_crop

    D = stack.box_size
    box_size = int(box_size)
    if box_size == D:
        return stack
    if box_size > D:
        raise ValueError(f"cannot downsample a {D}-pixel box to {box_size} pixels (upsampling)")
    if box_size % 2 or box_size < 8:
        raise ValueError(f"working box must be an even number >= 8, got {box_size}")
    if isinstance(stack.images, LazyImageStack):
        src = stack.images
        images = LazyImageStack(
            src.files,
            src.file_index,
            src.image_index,
            box_size,
            file_boxes=src.file_boxes,
            check_finite=src.check_finite,
        )
    else:
        images = TransformedImages(stack.images, lambda x: fourier_crop(x, box_size), box_size)
    return dataclasses.replace(
        stack, images=images, pixel_size=float(stack.pixel_size) * D / box_size
    )


def read_particles(
    path,
    *,
    datadir=None,
    box_size: int | None = None,
    pose=None,
    ctf=None,
    ind=None,
    particles=None,
    require_poses: bool = True,
    allow_unsupported_contrast: bool = False,
) -> ParticleStack:
    """Read particles from any supported input, with optional cryoDRGN overrides.

    ``path`` is a RELION ``.star``, a cryoSPARC ``.cs``, an ``.mrcs``/``.mrc`` stack or ``.txt``
    list of stacks (needs ``ctf``, a cryoDRGN ``ctf.pkl``), or a cryoDRGN pickle (``ctf.pkl`` or
    ``pose.pkl``; images from ``particles`` if given, else the stack has no readable images).
    ``pose``/``ctf``/``ind`` override/select as in :func:`cryosip.data.cryodrgn.apply_cryodrgn`.
    ``box_size`` Fourier-crops to a working box (lazily).
    """
    from pathlib import Path

    from .cryodrgn import apply_cryodrgn, cryodrgn_pickle_kind, read_cryodrgn
    from .cryosparc import read_cs
    from .errors import CryosipInputError
    from .star import read_star

    path = Path(path)
    name = path.name.lower()
    if name.endswith(".star"):
        stack = read_star(
            path,
            datadir=datadir,
            box_size=box_size,
            allow_unsupported_contrast=allow_unsupported_contrast,
        )
    elif name.endswith(".cs"):
        stack = read_cs(path, datadir=datadir, box_size=box_size, require_poses=require_poses)
    elif name.endswith((".mrcs", ".mrc", ".mrcs.gz", ".mrc.gz", ".txt")):
        if ctf is None:
            raise CryosipInputError(
                path, "an image stack alone has no CTF or pixel metadata: pass a cryoDRGN ctf.pkl"
            )
        stack = read_cryodrgn(ctf=ctf, pose=pose, ind=ind, particles=path, datadir=datadir)
        pose = ctf = ind = None
    elif name.endswith(".pkl"):
        kind = cryodrgn_pickle_kind(path)
        if kind == "ctf":
            ctf = path
        elif kind == "pose":
            pose = path
        if ctf is None:
            raise CryosipInputError(
                path, "cryoDRGN input needs a ctf.pkl (box and pixel size): pass --ctf"
            )
        stack = read_cryodrgn(ctf=ctf, pose=pose, ind=ind, particles=particles, datadir=datadir)
        pose = ctf = ind = None
    else:
        raise CryosipInputError(
            path, "unknown particle file type (expected .star, .cs, .mrcs, .mrc, .txt or .pkl)"
        )
    if pose is not None or ctf is not None or ind is not None:
        stack = apply_cryodrgn(stack, pose=pose, ctf=ctf, ind=ind)
    if box_size is not None and stack.box_size != box_size:
        stack = downsample(stack, box_size)
    return stack


def estimate_noise_sigma(
    images, radius_fraction: float = 0.45, *, max_images: int = 2000, chunk_size: int = 256
) -> float:
    """Pixel noise standard deviation from the background outside a centred circular mask.

    Pixels farther than ``radius_fraction * D`` from the box centre (pixel ``D // 2``) are taken
    as background; each image's background mean is removed (per-image offsets do not count as
    noise) and the variances are pooled. ``images`` is an array, a lazy accessor or a
    :class:`ParticleStack`; at most ``max_images`` evenly spaced images are read.
    """
    if isinstance(images, ParticleStack):
        images = images.images
    n, D = images.shape[0], images.shape[-1]
    if not 0 < radius_fraction < 0.5 * np.sqrt(2):
        raise ValueError(f"radius_fraction must be in (0, 0.707), got {radius_fraction}")
    yy, xx = np.mgrid[:D, :D] - D // 2
    mask = np.hypot(yy, xx) > radius_fraction * D
    if mask.sum() < 2:
        raise ValueError(f"no background pixels outside radius {radius_fraction} * {D}")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
    total, count = 0.0, 0
    for s in range(0, len(idx), chunk_size):
        chunk = np.asarray(images[idx[s : s + chunk_size]], np.float64)
        bg = chunk[:, mask]
        bg = bg - bg.mean(axis=1, keepdims=True)
        total += float((bg * bg).sum())
        count += bg.size - bg.shape[0]
    return float(np.sqrt(total / max(count, 1)))
