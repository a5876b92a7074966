"""ParticleStack: one type for real and simulated particle images with their nuisances."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..cryoem.ctf import CTFParams
from ..cryoem.image_model import CryoNuisance
from ..sip.operator import Observations
from .errors import CryosipInputError
from .mrc import AbstractImages, MissingImages


def shared_once(a):
    """``a`` as a read-only broadcast view of its first row when every row is the same (the
    value held once, whatever the number of rows); anything else unchanged."""
    if isinstance(a, np.ndarray) and a.ndim and a.shape[0] > 1 and a.strides[0]:
        if np.all(a == a[:1]):
            return np.broadcast_to(a[:1], a.shape)
    return a


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

    ``optics_group`` is each particle's optics group, 0-based (``None``: one group; see
    :meth:`group_ids`). ``native_grid`` is each particle's ``(box size, pixel size)`` as stored
    in its file (``None``: the stack's own grid); optics groups with different grids are brought
    onto one working grid by :func:`to_working_grid`.
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
    optics_group: np.ndarray | None = None
    native_grid: np.ndarray | None = None

    def __post_init__(self):
        if self.images.ndim != 3 or self.images.shape[1] != self.images.shape[2]:
            raise ValueError(f"images must be (n, D, D), got {self.images.shape}")
        if len(self.nuisance.rotation) != self.images.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {len(self.nuisance.rotation)} nuisance rows"
            )

        n = self.images.shape[0]
        for name in ("optics_group", "native_grid"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{n} images but {len(v)} {name} rows")
        self._compact()

    def _compact(self) -> None:
        """Hold what every particle shares once: a streamed run keeps these arrays for all N
        images (about 120 bytes an image at 10^6 images), so a CTF field that is the same for
        every particle (voltage, Cs, amplitude contrast, ... within one optics group) becomes a
        read-only broadcast view of one value, and a native grid equal to the stack's own
        becomes ``None`` (what :meth:`grids` means by it). Values are unchanged."""
        if self.native_grid is not None and np.array_equal(
            np.unique(np.asarray(self.native_grid, np.float64), axis=0),
            [[float(self.box_size), float(self.pixel_size)]],
        ):
            self.native_grid = None

        ctf = jax.tree_util.tree_map(shared_once, self.nuisance.ctf)
        self.nuisance = dataclasses.replace(self.nuisance, ctf=ctf)

    def __len__(self) -> int:
        return self.images.shape[0]

    def group_ids(self) -> np.ndarray:
        """Each particle's optics group as an integer 0..G-1 (zeros when the input has none)."""
        if self.optics_group is None:
            return np.zeros(len(self), np.int64)
        return np.asarray(self.optics_group, np.int64)

    def grids(self, *, native: bool = True) -> np.ndarray:
        """Each particle's native ``(box size, pixel size)`` (float64, shape (n, 2)); with
        ``native=False`` the working grid for every particle (that of images written anew)."""
        if self.native_grid is None or not native:
            return np.tile([float(self.box_size), float(self.pixel_size)], (len(self), 1))
        return np.asarray(self.native_grid, np.float64)

    def _rows(self, idx) -> dict:
        """The per-particle fields other than images, restricted to ``idx``."""
        meta = None if self.metadata is None else self.metadata.iloc[idx].reset_index(drop=True)
        return dict(
            nuisance=take_nuisance(self.nuisance, idx),
            metadata=meta,
            optics_group=None if self.optics_group is None else self.optics_group[idx],
            native_grid=None if self.native_grid is None else self.native_grid[idx],
        )

    @property
    def box_size(self) -> int:
        """Image side in pixels."""
        return int(self.images.shape[1])

    def subset(self, idx) -> ParticleStack:
        """The particles at ``idx`` (indices or a boolean mask), images and metadata rows alike."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        return dataclasses.replace(self, images=np.asarray(self.images[idx]), **self._rows(idx))

    def read(self, idx) -> ParticleStack:
        """Like :meth:`subset`, the images read into memory this stack owns without leaving the
        files' pages in the process's RSS (:func:`cryosip.data.streaming.read_rows`): for
        samples spread over stacks larger than memory (calibration and streaming pilots)."""
        from .streaming import read_rows

        idx = np.asarray(idx)
        return dataclasses.replace(self, images=read_rows(self.images, idx), **self._rows(idx))

    def take(self, idx) -> ParticleStack:
        """Like :meth:`subset` but keeps lazily read images lazy (nothing is loaded)."""
        from .mrc import LazyImageStack

        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.nonzero(idx)[0]
        if isinstance(self.images, MissingImages):
            images = type(self.images).__new__(type(self.images))
            images.__dict__.update(self.images.__dict__)
            images.n = len(idx)
        elif isinstance(self.images, (LazyImageStack, GroupedImages)):
            images = self.images.take(idx)
        else:
            return self.subset(idx)
        return dataclasses.replace(self, images=images, **self._rows(idx))

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


class MissingStackImages(MissingImages):
    """Stand-in for the images of metadata whose stack files are not found (``inspect`` and
    ``convert`` work without them); reading raises a one-line error naming the missing files."""

    def __init__(self, n: int, box_size: int, source, missing_files, n_files: int):
        super().__init__(n, box_size, None if source is None else str(source))
        self.missing_files = [str(f) for f in missing_files]
        self.n_files = int(n_files)

    def describe(self, first: int = 3) -> str:
        names = ", ".join(self.missing_files[:first])
        more = len(self.missing_files) - first
        return (
            f"{len(self.missing_files)} of {self.n_files} stack file(s) not found ({names}"
            + (f", and {more} more" if more > 0 else "")
            + ")"
        )

    def _read(self, idx: np.ndarray) -> np.ndarray:
        raise CryosipInputError(self.source, self.describe() + "; use --datadir")


# ----------------------------------------------------------------------------------------------
# working grid: one box and one pixel size for every optics group


def working_pixel_size(box_size: int, pixel_size: float, new_box_size: int) -> float:
    """The pixel size after Fourier cropping/padding a ``box_size`` image to ``new_box_size``
    pixels over the same field of view: ``pixel_size * box_size / new_box_size``.

    The one place this rule lives (readers, :func:`downsample` and :func:`working_grid`).
    """
    return float(pixel_size) * int(box_size) / int(new_box_size)


def working_grid(
    boxes, pixel_sizes, *, box_size: int | None = None, pixel_size: float | None = None
) -> tuple[int, float]:
    """The common working grid ``(box, pixel size)`` for particles on the grids ``boxes`` x
    ``pixel_sizes`` (one entry per particle or per group).

    The pixel size is ``pixel_size`` if given; else the one implied by ``box_size`` over the
    smallest field of view (``min(D * p) / box_size``, :func:`working_pixel_size`); else the
    largest pixel size. The box is ``box_size`` if given, else the smallest even box whose field
    of view covers the smallest group's field of view (a single grid is kept as it is).
    """
    boxes = np.atleast_1d(np.asarray(boxes, np.float64))
    px = np.atleast_1d(np.asarray(pixel_sizes, np.float64))
    if boxes.size == 0 or px.size == 0:
        raise ValueError("no particles")
    fov = boxes * px
    smallest = int(np.argmin(fov))
    grids = {(int(b), round(float(p), 6)) for b, p in zip(boxes, px)}
    if pixel_size is not None:
        out_px = float(pixel_size)
    elif box_size is not None:
        out_px = working_pixel_size(int(boxes[smallest]), float(px[smallest]), int(box_size))
    else:
        out_px = float(px.max())
    if not out_px > 0:
        raise ValueError(f"pixel size must be positive, got {out_px}")
    if box_size is not None:
        out_box = int(box_size)
    elif len(grids) == 1 and abs(out_px - float(px[0])) <= 1e-9 * out_px:
        out_box = int(boxes[0])
    else:
        out_box = int(2 * np.ceil(float(fov[smallest]) / out_px / 2 - 1e-6))
    if out_box < 2:
        raise ValueError(f"working box of {out_box} pixels")
    return out_box, out_px


def resampling_matrix(box_in: int, pixel_in: float, box_out: int, pixel_out: float) -> np.ndarray:
    """``R`` (``box_out x box_in``, float64): exact band-limited 1-D resampling between grids.

    Row ``j`` evaluates the trigonometric (periodic sinc) interpolant of ``box_in`` samples at
    the physical position of output pixel ``j``; both grids have their centre at pixel
    ``D // 2`` (as RELION), so positions are ``(j - box_out // 2) * pixel_out``. Frequencies
    above the output Nyquist ``1 / (2 pixel_out)`` are removed first (no aliasing when the
    pixel grows); a frequency exactly at a Nyquist limit counts once, as the cosine, so that an
    integer Fourier crop (:func:`cryosip.data.mrc.fourier_crop`) and the identity are special
    cases. Images are resampled as ``R @ img @ R.T``; constants are kept (``R @ 1 = 1``).
    """
    box_in, box_out = int(box_in), int(box_out)
    u = (np.arange(box_out) - box_out // 2) * (float(pixel_out) / float(pixel_in)) + box_in // 2
    d = u[:, None] - np.arange(box_in)[None, :]  # output position minus input pixel, in pixels
    # the highest kept frequency index: the input's Nyquist or the output's, whichever is lower
    cutoff = min(box_in / 2.0, box_in * float(pixel_in) / (2.0 * float(pixel_out)))
    kmax = int(np.floor(cutoff + 1e-9))
    at_limit = abs(cutoff - kmax) <= 1e-9 and kmax > 0
    ks = np.arange(1, kmax + 1)
    weights = np.full(ks.shape, 2.0)
    if at_limit and ks.size:
        weights[-1] = 1.0  # the Nyquist pair counts once, as a cosine
    phase = 2.0 * np.pi * d[..., None] * ks / box_in
    return (1.0 + (np.cos(phase) * weights).sum(-1)) / box_in


class GroupedImages(AbstractImages):
    """Particles stored on several grids (e.g. optics groups at 1.24 and 1.25 A/px), brought to
    one working grid ``box_size`` x ``pixel_size`` as they are read, chunk by chunk.

    ``sources[g]`` holds the images of grid group ``g`` in their native box ``boxes[g]`` and
    pixel size ``pixel_sizes[g]`` (an array or a lazy accessor indexed by integer arrays);
    particle ``i`` is image ``index_in_group[i]`` of ``sources[group[i]]``. Each image is
    resampled by :func:`resampling_matrix` as ``R @ img @ R.T`` (nothing is done for a group
    already on the working grid).
    """

    def __init__(
        self,
        sources,
        boxes,
        pixel_sizes,
        group,
        index_in_group,
        box_size: int,
        pixel_size: float,
    ):
        self.sources = list(sources)
        self.boxes = [int(b) for b in boxes]
        self.pixel_sizes = [float(p) for p in pixel_sizes]
        self.group = np.asarray(group, np.int64)
        self.index_in_group = np.asarray(index_in_group, np.int64)
        self.box_size = int(box_size)
        self.pixel_size = float(pixel_size)
        self._mats = [
            None
            if (b == self.box_size and abs(p - self.pixel_size) <= 1e-9 * p)
            else resampling_matrix(b, p, self.box_size, self.pixel_size)
            for b, p in zip(self.boxes, self.pixel_sizes)
        ]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.group.shape[0]), self.box_size, self.box_size)

    def regrid(self, box_size: int, pixel_size: float) -> GroupedImages:
        """The same particles on another working grid (always from the native images)."""
        return GroupedImages(
            self.sources,
            self.boxes,
            self.pixel_sizes,
            self.group,
            self.index_in_group,
            box_size,
            pixel_size,
        )

    def take(self, idx) -> GroupedImages:
        idx = self._take_index(idx)
        out = self.regrid(self.box_size, self.pixel_size)
        out.group, out.index_in_group = self.group[idx], self.index_in_group[idx]
        return out

    def _read(self, idx: np.ndarray) -> np.ndarray:
        return self._read_by_group(idx, self.group[idx], self._read_group)

    def _read_group(self, g: int, idx: np.ndarray) -> tuple[slice, np.ndarray]:
        """The images ``idx`` (all in optics group ``g``) on the working grid, in ``idx``'s order."""
        chunk = np.asarray(self.sources[g][self.index_in_group[idx]], np.float32)
        R = self._mats[g]
        if R is not None:
            chunk = np.einsum("ji,nik,lk->njl", R, chunk.astype(np.float64), R, optimize=True)
        return slice(None), chunk

    def __repr__(self) -> str:
        return f"GroupedImages(shape={self.shape}, grids={list(zip(self.boxes, self.pixel_sizes))})"


def grouped_images(sources_by_particle, grids, box_size: int, pixel_size: float) -> GroupedImages:
    """A :class:`GroupedImages` from per-particle native ``grids`` ((n, 2): box, pixel size) and
    a function ``sources_by_particle(indices) -> images source`` for the particles of one grid."""
    grids = np.asarray(grids, np.float64)
    keys = [(int(b), round(float(p), 6)) for b, p in grids]
    uniq = sorted(set(keys))
    group = np.array([uniq.index(k) for k in keys], np.int64)
    index_in_group = np.empty(len(keys), np.int64)
    sources, boxes, pxs = [], [], []
    for g, (b, _) in enumerate(uniq):
        members = np.nonzero(group == g)[0]
        index_in_group[members] = np.arange(len(members))
        sources.append(sources_by_particle(members))
        boxes.append(b)
        pxs.append(float(grids[members[0], 1]))
    return GroupedImages(sources, boxes, pxs, group, index_in_group, box_size, pixel_size)


def to_working_grid(
    stack: ParticleStack, box_size: int | None = None, pixel_size: float | None = None
) -> ParticleStack:
    """Bring every particle of ``stack`` onto one working grid, lazily (chunk by chunk).

    The target is :func:`working_grid` of the particles' native grids (``stack.grids()``):
    by default the largest pixel size and a box covering the smallest field of view. Each
    native grid is resampled exactly in the band-limited sense (:func:`resampling_matrix`);
    a single grid cropped by an integer ratio is Fourier-cropped as it is read. Shifts stay in
    Angstrom, poses and per-particle CTFs are unchanged; ``optics_group`` is kept.
    """
    from .mrc import LazyImageStack, TransformedImages, fourier_crop

    grids = stack.grids()
    if box_size is not None and (int(box_size) < 8 or int(box_size) % 2):
        raise ValueError(f"working box must be an even number >= 8, got {box_size}")
    box, px = working_grid(grids[:, 0], grids[:, 1], box_size=box_size, pixel_size=pixel_size)
    finest = float(grids[:, 1].min())
    if px < finest * (1 - 1e-6):
        raise ValueError(
            f"working pixel size {px:.4g} A is finer than the finest data ({finest:.4g} A/px): "
            "choose a smaller --box"
        )
    same = np.allclose(grids[:, 0], box) and np.allclose(grids[:, 1], px, rtol=1e-9, atol=0)
    if same and box == stack.box_size and abs(px - stack.pixel_size) <= 1e-9 * px:
        return stack
    images = stack.images
    if isinstance(images, MissingImages):
        clone = type(images).__new__(type(images))
        clone.__dict__.update(images.__dict__)
        clone.box_size = box
        return dataclasses.replace(stack, images=clone, pixel_size=px)
    if isinstance(images, GroupedImages):
        return dataclasses.replace(stack, images=images.regrid(box, px), pixel_size=px)
    D = stack.box_size
    one_grid = stack.native_grid is None or len({tuple(r) for r in np.round(grids, 6)}) == 1
    integer_crop = (
        one_grid
        and box <= D
        and box % 2 == 0
        and D % 2 == 0
        and abs(px - working_pixel_size(D, stack.pixel_size, box)) <= 1e-9 * px
    )
    if integer_crop:
        if isinstance(images, LazyImageStack):
            cropped = LazyImageStack(
                images.files,
                images.file_index,
                images.image_index,
                box,
                file_boxes=images.file_boxes,
                check_finite=images.check_finite,
            )
        else:
            cropped = TransformedImages(images, lambda x: fourier_crop(x, box), box)
        return dataclasses.replace(stack, images=cropped, pixel_size=px)
    if not one_grid:
        raise ValueError("particles on several grids need their images as GroupedImages")
    gi = GroupedImages(
        [images], [D], [stack.pixel_size], np.zeros(len(stack)), np.arange(len(stack)), box, px
    )
    return dataclasses.replace(stack, images=gi, pixel_size=px)


def downsample(stack: ParticleStack, box_size: int) -> ParticleStack:
    """Fourier-crop the images to ``box_size`` lazily (chunk by chunk as they are read).

    The pixel size becomes :func:`working_pixel_size` (``p * D / box_size``); shifts in
    Angstrom, poses and CTF are unchanged (a shift of ``t`` Angstrom is the same displacement in
    both boxes). Stacks whose optics groups have different grids go through
    :func:`to_working_grid`.
    """
    D = stack.box_size
    box_size = int(box_size)
    if box_size == D:
        return stack
    if box_size > D:
        raise ValueError(f"cannot downsample a {D}-pixel box to {box_size} pixels (upsampling)")
    if box_size % 2 or box_size < 8:
        raise ValueError(f"working box must be an even number >= 8, got {box_size}")
    return to_working_grid(stack, box_size, working_pixel_size(D, stack.pixel_size, box_size))


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
    require_images: bool = True,
    allow_unsupported_contrast: bool = False,
) -> ParticleStack:
    """Read particles from any supported input, with optional cryoDRGN overrides.

    ``path`` is a RELION ``.star``, a cryoSPARC ``.cs``, an ``.mrcs``/``.mrc`` stack or ``.txt``
    list of stacks (needs ``ctf``, a cryoDRGN ``ctf.pkl``), or a cryoDRGN pickle (``ctf.pkl`` or
    ``pose.pkl``; images from ``particles`` if given, else the stack has no readable images).
    ``pose``/``ctf``/``ind`` override/select as in :func:`cryosip.data.cryodrgn.apply_cryodrgn`.
    Optics groups on different grids (pixel size, box) are brought onto one working grid
    (:func:`to_working_grid`); ``box_size`` chooses the working box (the pixel size follows
    from the smallest field of view), lazily.

    ``require_poses``: a file without poses (angles) is an error naming the missing columns
    (every reconstruction method needs poses); ``inspect``/``convert`` pass ``False``.
    ``require_images=False`` reads the metadata even when the stack files are missing (the
    images are then a :class:`MissingStackImages` that names them).
    """
    from pathlib import Path

    from .cryodrgn import apply_cryodrgn, cryodrgn_pickle_kind, read_cryodrgn
    from .cryosparc import read_cs
    from .star import read_star

    path = Path(path)
    name = path.name.lower()
    if name.endswith((".star", ".cs")):  # the two readers take the same keywords
        read = read_star if name.endswith(".star") else read_cs
        stack = read(
            path,
            datadir=datadir,
            box_size=box_size,
            require_poses=require_poses,
            require_images=require_images,
            allow_unsupported_contrast=allow_unsupported_contrast,
        )
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
    if require_poses and not stack.has_poses:
        raise CryosipInputError(
            path, "no poses in this particle set (pass a pose.pkl, or a refinement's output)"
        )
    return on_working_box(stack, box_size, path)


def on_working_box(stack: ParticleStack, box_size: int | None, path) -> ParticleStack:
    """``stack`` on a ``box_size``-pixel working grid (None or its own box: unchanged); a grid
    that cannot be made is a :class:`CryosipInputError` naming ``path``."""
    if box_size is None or stack.box_size == box_size:
        return stack
    try:
        return to_working_grid(stack, box_size=box_size)
    except ValueError as e:
        if isinstance(e, CryosipInputError):
            raise
        raise CryosipInputError(path, str(e)) from None


def checked_stack(path, box_size: int | None, rot, shift, ctf: dict, **fields) -> ParticleStack:
    """What a reader returns: the :class:`ParticleStack` of ``fields`` read from ``path``, its
    nuisance made from ``rot``, ``shift`` and the ``ctf`` keywords (:meth:`CTFParams.make`), on
    the ``box_size`` working grid (:func:`on_working_box`). A value that does not fit in float32
    is a :class:`CryosipInputError` naming ``path``."""
    with np.errstate(over="ignore", invalid="ignore"):
        nuisance = ParticleStack.make_nuisance(rot, shift, **ctf)
    for leaf in jax.tree_util.tree_leaves(nuisance):
        if not np.isfinite(leaf).all():
            raise CryosipInputError(path, "pose, shift or CTF values out of range (overflow)")
    stack = ParticleStack(nuisance=nuisance, source=os.fspath(path), **fields)
    return on_working_box(stack, box_size, path)


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
