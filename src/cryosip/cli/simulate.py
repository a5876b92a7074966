"""Simulate a particle stack with a known conformational distribution (RELION 3.1 output).

Draws a CV for every particle from a ground-truth distribution, a uniform SO(3) pose, a
Gaussian in-plane shift and a per-particle defocus (uniform in [--defocus-min, --defocus-max]
with Gaussian astigmatism), renders the noise-free image with the CTF and adds white Gaussian
noise whose sigma gives the requested SNR (SNR = mean over images of var(clean) / sigma^2,
measured on a pilot batch of the first 256 particles). Images are simulated, noised and
written chunk by chunk, so 10^5-10^6 images never sit in memory at once.

Writes into --out:
  particles.star        RELION 3.1: data_optics + data_particles (ZYZ Euler angles in degrees,
                        rlnOriginX/YAngst in Angstrom, rlnDefocusU/V/Angle per particle)
  particles_NNN.mrcs    float32 stacks, --images-per-file images each, pixel size in the header
  truth.csv             the true CV of every particle (one row per STAR row, same order)
  config.json           every setting (seed included), the sigma used and the measured SNR
  montage.png           8 particles next to their noise-free versions
Same seed and settings give identical files; --config config.json regenerates a data set.

Datasets: adk (all-atom AdK closed->open path, s in [0, 1]), adk-ca (C-alpha only), dumbbell
(separation, Angstrom), hinge (angle, degrees), square (side, Angstrom), two-hinge (two angles).
Distributions: unimodal, bimodal, skewed, uniform, banana and ring (two-hinge only), or
samples:<file.csv> (resampled user samples); --distribution-params '{"mean": 0.4}' overrides
defaults (see cryosip.data.distributions).

Examples:
  $ cryosip simulate --dataset adk --distribution bimodal --n-images 10000 --box 64 \\
        --pixel-size 1.5 --snr 0.1 --seed 0 --out sim/
  $ cryosip simulate --dataset two-hinge --distribution ring --n-images 2000 --box 48 \\
        --pixel-size 2 --snr 0.05 --out sim2d/
  $ cryosip simulate --config sim/config.json --seed 1 --out sim_seed1/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
from pathlib import Path

import numpy as np

from .. import _atomic
from ..data.errors import CryosipInputError
from ..data.models import BUILTIN, builtin_model
from ._args import (
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    prepare_output_dir,
)

logger = logging.getLogger(__name__)

STAR_NAME = "particles.star"
TRUTH_NAME = "truth.csv"
CONFIG_NAME = "config.json"
MONTAGE_NAME = "montage.png"
N_MONTAGE = 8


DATA, IMAGING, OUTPUT = "data set", "imaging", "output"  # the --help groups of the flags


def setting(default, group: str, type, help: str, flag: str | None = None, **kw):
    """A :class:`SimulateConfig` field with its flag, ``add_argument(flag, type=type, help=help,
    **kw)`` in the --help ``group``. ``help`` may name the field's ``{default}``; ``flag`` is
    ``--field-name`` without a unit suffix (``_in_angstroms``) unless given."""
    meta = dict(group=group, flag=flag, type=type, help=help, **kw)
    if isinstance(default, dict):  # mutable: a fresh copy for every config
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class SimulateConfig:
    """The resolved settings of one simulation (written to config.json); the flags of
    ``cryosip simulate`` are generated from these fields."""

    dataset: str = setting(
        "adk", DATA, None, "conformation model (default {default})", choices=BUILTIN
    )
    distribution: str = setting(
        "bimodal", DATA, None, "ground-truth CV distribution (default {default})"
    )
    distribution_params: dict = setting(
        {}, DATA, json.loads, "JSON object of distribution parameters, in the CV's units"
    )
    n_images: int = setting(10000, DATA, positive_int, "default {default}")
    box_size: int = setting(
        64, IMAGING, positive_int, "box size in pixels (default {default})", "--box"
    )
    pixel_size: float = setting(
        1.5, IMAGING, positive_float, "Angstrom per pixel (default {default})"
    )
    snr: float | None = setting(
        0.1, IMAGING, positive_float, "signal-to-noise ratio (default {default})"
    )
    sigma: float | None = setting(
        None, IMAGING, positive_float, "noise standard deviation instead of --snr"
    )
    seed: int = setting(0, DATA, nonnegative_int, "random seed (default {default})")
    defocus_min_in_angstroms: float = setting(
        10000.0, IMAGING, positive_float, "Angstrom, underfocus positive (default {default:g})"
    )
    defocus_max_in_angstroms: float = setting(
        25000.0, IMAGING, positive_float, "Angstrom (default {default:g})"
    )
    astigmatism_sd_in_angstroms: float = setting(
        200.0,
        IMAGING,
        nonnegative_float,
        "sd of |defocusU - defocusV| in Angstrom (default {default:g})",
    )
    shift_sd_in_angstroms: float = setting(
        2.0,
        IMAGING,
        nonnegative_float,
        "sd of each in-plane shift component, Angstrom (default {default:g})",
    )
    voltage_in_kilovolts: float = setting(
        300.0, IMAGING, positive_float, "kV (default {default:g})"
    )
    spherical_aberration_in_mm: float = setting(
        2.7, IMAGING, nonnegative_float, "spherical aberration in mm (default {default:g})", "--cs"
    )
    amplitude_contrast: float = setting(0.1, IMAGING, fraction, "default {default:g}")
    bfactor_in_angstroms2: float = setting(
        0.0, IMAGING, nonnegative_float, "CTF B-factor in Angstrom^2 (default {default:g})"
    )
    pilot_size: int = 256  # no flag
    chunk_size: int = setting(
        1000, OUTPUT, positive_int, "images simulated at a time (default {default})", "--chunk"
    )
    images_per_file: int = setting(
        10000, OUTPUT, positive_int, "images per .mrcs stack (default {default})"
    )
    noise_spectrum: str = setting(
        "white",
        IMAGING,
        None,
        "noise colour: white (default), detector (3.9x more power at low than at high "
        "frequency), or a CSV with columns frequency_per_A and power (e.g. a reconstruction's "
        "noise_spectrum.csv); --snr/--sigma set the pixel sd",
    )

    def __post_init__(self):
        if self.dataset not in BUILTIN:
            raise CryosipInputError(
                None, f"unknown dataset {self.dataset!r}; choose from {', '.join(BUILTIN)}"
            )
        if (self.snr is None) == (self.sigma is None):
            raise CryosipInputError(None, "give exactly one of --snr and --sigma")
        for name in ("n_images", "pilot_size", "chunk_size", "images_per_file"):
            if int(getattr(self, name)) < 1:
                raise CryosipInputError(None, f"{name} must be >= 1, got {getattr(self, name)}")
        if self.box_size < 8 or self.box_size % 2:
            raise CryosipInputError(
                None, f"--box must be an even integer >= 8, got {self.box_size}"
            )
        positive = ("pixel_size", "voltage_in_kilovolts", "defocus_min_in_angstroms")
        for name in positive:
            if not getattr(self, name) > 0:
                raise CryosipInputError(None, f"{name} must be positive, got {getattr(self, name)}")
        if (self.snr is not None and not self.snr > 0) or (
            self.sigma is not None and not self.sigma > 0
        ):
            raise CryosipInputError(None, "the SNR / sigma must be positive")
        if self.defocus_max_in_angstroms < self.defocus_min_in_angstroms:
            raise CryosipInputError(None, "--defocus-max must be >= --defocus-min")
        if (
            min(
                self.shift_sd_in_angstroms,
                self.astigmatism_sd_in_angstroms,
                self.spherical_aberration_in_mm,
                self.bfactor_in_angstroms2,
            )
            < 0
        ):
            raise CryosipInputError(None, "shift sd, astigmatism sd, Cs and B-factor must be >= 0")
        if not 0 <= self.amplitude_contrast < 1:
            raise CryosipInputError(
                None, f"amplitude contrast must be in [0, 1), got {self.amplitude_contrast}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> SimulateConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------- library helpers


def build_operator(cfg: SimulateConfig, model=None):
    """The cryo-EM operator (noise sigma 1; the simulation sets its own) for a config."""
    from ..cryoem.image_model import ImageModel, NuisancePrior
    from ..pipeline.operator import CryoEMOperator

    model = builtin_model(cfg.dataset) if model is None else model
    prior = NuisancePrior(
        shift_sd_in_angstroms=cfg.shift_sd_in_angstroms,
        defocus_range_in_angstroms=(cfg.defocus_min_in_angstroms, cfg.defocus_max_in_angstroms),
        astigmatism_sd_in_angstroms=cfg.astigmatism_sd_in_angstroms,
        voltage_in_kilovolts=cfg.voltage_in_kilovolts,
        spherical_aberration_in_mm=cfg.spherical_aberration_in_mm,
        amplitude_contrast=cfg.amplitude_contrast,
        bfactor_in_angstroms2=cfg.bfactor_in_angstroms2,
    )
    image_model = ImageModel.for_atoms(cfg.box_size, cfg.pixel_size, model.atoms)
    return CryoEMOperator(model, image_model, 1.0, prior)


def build_distribution(cfg: SimulateConfig, model):
    """The ground-truth distribution of a config on the model's domain."""
    from ..data.distributions import make_distribution

    try:
        return make_distribution(
            cfg.distribution,
            np.asarray(model.lower),
            np.asarray(model.upper),
            names=model.cv_names,
            **cfg.distribution_params,
        )
    except (ValueError, TypeError) as e:
        if isinstance(e, CryosipInputError):
            raise
        raise CryosipInputError(None, f"distribution {cfg.distribution!r}: {e}") from None


def file_names(n_images: int, images_per_file: int) -> list[str]:
    n_files = -(-n_images // images_per_file)
    width = max(3, len(str(n_files - 1)))
    return [f"particles_{k:0{width}d}.mrcs" for k in range(n_files)]


# ---------------------------------------------------------------------------- command line


def _add_settings(group, name: str) -> None:
    """Add the flags of the :class:`SimulateConfig` fields in the --help group ``name``."""
    defaults = SimulateConfig()
    for f in dataclasses.fields(SimulateConfig):
        if f.metadata.get("group") == name:
            kw = {k: v for k, v in f.metadata.items() if k not in ("group", "flag")}
            kw["help"] = kw["help"].format(default=getattr(defaults, f.name))
            group.add_argument(_flag(f), dest=f.name, **kw)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + re.sub(r"_in_\w+$", "", f.name).replace("_", "-")


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(DATA)
    g.add_argument(
        "--config",
        type=Path,
        help="a config.json of an earlier run: its settings are the "
        "defaults, flags given here override them",
    )
    _add_settings(g, DATA)
    _add_settings(parser.add_argument_group(IMAGING), IMAGING)
    g = parser.add_argument_group(OUTPUT)
    g.add_argument("--out", type=Path, required=True, help="output folder")
    _add_settings(g, OUTPUT)
    g.add_argument(
        "--overwrite", action="store_true", help="replace an existing simulation in --out"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SimulateConfig:
    base: dict = {}
    if getattr(args, "config", None) is not None:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CryosipInputError(args.config, f"cannot read the config ({e})") from None
        if not isinstance(base, dict):
            raise CryosipInputError(args.config, "expected a JSON object")
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SimulateConfig)
        if getattr(args, f.name, None) is not None
    }
    merged = {**base, **given}
    if "sigma" in given and "snr" not in given:
        merged["snr"] = None  # --sigma replaces the (default or configured) SNR
    if "snr" in given and "sigma" not in given:
        merged["sigma"] = None
    return SimulateConfig.from_dict(merged)


def _mrcs_writer_class():
    from ..data.mrc import MrcsWriter

    class _LabelledWriter(MrcsWriter):
        """MrcsWriter with a fixed header label: mrcfile's default label carries the creation
        time, which would make two runs with the same seed differ."""

        def __init__(self, *args, label: str = "cryosip simulate", **kw):
            super().__init__(*args, **kw)
            self.label = label

        def open(self):
            out = super().open()
            self._mrc.header.label[0] = f"{self.label:<80s}"[:80]
            self._mrc.header.nlabl = 1
            return out

    return _LabelledWriter


def write_truth_csv(path: Path, theta: np.ndarray, names) -> None:
    """One row per particle, columns = CV names; float32 values written exactly (9 digits)."""
    lines = [",".join(names)]
    lines += [",".join(f"{v:.9g}" for v in row) for row in np.asarray(theta, np.float32)]
    _atomic.write_text(path, "\n".join(lines) + "\n")


def write_montage(
    path: Path, noisy: np.ndarray, clean: np.ndarray, theta: np.ndarray, names
) -> None:
    """A 2 x n grid: noisy particles on top, noise-free versions below (each panel scaled alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(noisy)
    fig = Figure(figsize=(1.6 * n, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        label = ", ".join(f"{nm}={v:.3g}" for nm, v in zip(names, theta[i]))
        for row, img in enumerate((noisy[i], clean[i])):
            ax = axes[row, i]
            ax.imshow(img, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, i].set_title(label, fontsize=7)
    axes[0, 0].set_ylabel("noisy", fontsize=8)
    axes[1, 0].set_ylabel("noise-free", fontsize=8)
    fig.tight_layout()
    with _atomic.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def noise_colour(cfg: SimulateConfig):
    """The noise spectrum's shape for ``--noise-spectrum`` (None: white)."""
    from ..cryoem.noise import RadialNoiseSpectrum

    spec = cfg.noise_spectrum
    if spec == "white":
        return None
    if spec == "detector":
        return RadialNoiseSpectrum.detector_like(cfg.box_size, cfg.pixel_size)
    import pandas as pd

    try:
        table = pd.read_csv(spec)
        power = [c for c in table.columns if c.startswith("power")][0]
        return RadialNoiseSpectrum.from_profile(
            table["frequency_per_A"], table[power], cfg.box_size, cfg.pixel_size
        )
    except (OSError, ValueError, KeyError, IndexError, pd.errors.ParserError) as e:
        raise CryosipInputError(
            spec,
            f"not a noise spectrum (white, detector, or a CSV with frequency_per_A and "
            f"power columns): {e}",
        ) from None


def _command_line(cfg: SimulateConfig) -> str:
    """The command that regenerates ``cfg`` (every flag explicit)."""
    parts = ["cryosip", "simulate"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "group" in f.metadata and value is not None and value != {}:  # snr or sigma is None
            parts += [_flag(f), json.dumps(value) if isinstance(value, dict) else value]
    return shlex.join(map(str, parts)) + " --out DIR"


def run_simulation(
    cfg: SimulateConfig, out: Path, *, overwrite: bool = False, progress: bool = True
) -> dict:
    """Simulate ``cfg`` into the folder ``out``; returns the config.json content."""
    import jax
    from tqdm import tqdm

    from .. import __version__
    from ..data.mrc import LazyImageStack
    from ..data.particles import ParticleStack
    from ..data.star import write_star
    from ..pipeline.simulate import iter_simulation, plan_simulation

    # an existing file, or a folder with earlier results, is refused unless --overwrite (which
    # removes the earlier simulation's files first: the STAR file marks a complete simulation)
    out = prepare_output_dir(out, overwrite=overwrite, command="simulate")

    model = builtin_model(cfg.dataset)
    operator = build_operator(cfg, model)
    distribution = build_distribution(cfg, model)
    key = jax.random.key(cfg.seed)
    logger.info(
        "simulating %d %s images (%d px, %.3g A/px), CV ~ %s",
        cfg.n_images,
        cfg.dataset,
        cfg.box_size,
        cfg.pixel_size,
        distribution.name,
    )
    plan = plan_simulation(
        key,
        operator,
        distribution,
        cfg.n_images,
        snr=cfg.snr,
        sigma=cfg.sigma,
        pilot_size=cfg.pilot_size,
        noise_colour=noise_colour(cfg),
    )
    logger.info(
        "noise sigma %.6g (SNR %.4g on a pilot of %d images)", plan.sigma, plan.snr, plan.pilot_size
    )

    names = file_names(cfg.n_images, cfg.images_per_file)
    writer_cls = _mrcs_writer_class()
    label = f"cryosip {__version__} simulate seed {cfg.seed}"
    D = cfg.box_size
    m = min(N_MONTAGE, cfg.n_images)
    montage_noisy, montage_clean = np.empty((m, D, D), np.float32), np.empty((m, D, D), np.float32)
    bar = tqdm(
        total=cfg.n_images, unit="img", desc="simulate", disable=not progress, dynamic_ncols=True
    )
    writer, file_k = None, -1
    try:
        for chunk in iter_simulation(
            operator, plan, chunk_size=cfg.chunk_size, progress=bar.update
        ):
            if chunk.start < m:
                k = min(m - chunk.start, len(chunk.images))
                montage_noisy[chunk.start : chunk.start + k] = chunk.images[:k]
                montage_clean[chunk.start : chunk.start + k] = chunk.clean[:k]
            pos = 0
            while pos < len(chunk.images):  # split the chunk across stack files
                i = chunk.start + pos
                if writer is None:
                    file_k = i // cfg.images_per_file
                    n_in_file = min(
                        cfg.images_per_file, cfg.n_images - file_k * cfg.images_per_file
                    )
                    path = out / names[file_k]
                    writer = writer_cls(path, n_in_file, D, cfg.pixel_size, label=label).open()
                take = min(len(chunk.images) - pos, writer.n_images - writer.n_written)
                writer.write(chunk.images[pos : pos + take])
                pos += take
                if writer.n_written == writer.n_images:
                    writer.close()
                    writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()

    idx = np.arange(cfg.n_images)
    file_index, image_index = idx // cfg.images_per_file, idx % cfg.images_per_file
    images = LazyImageStack([out / nm for nm in names], file_index, image_index, D)
    import pandas as pd

    meta = pd.DataFrame({"rlnRandomSubset": idx % 2 + 1})  # half sets, alternating
    stack = ParticleStack(
        images, plan.nuisance, cfg.pixel_size, metadata=meta, source=os.fspath(out / STAR_NAME)
    )
    image_names = [f"{j + 1:06d}@{names[k]}" for k, j in zip(file_index, image_index)]
    write_truth_csv(out / TRUTH_NAME, plan.theta, model.cv_names)
    write_montage(out / MONTAGE_NAME, montage_noisy, montage_clean, plan.theta[:m], model.cv_names)
    config = {
        **dataclasses.asdict(cfg),
        "derived": {
            "sigma": plan.sigma,
            "snr_measured_on_pilot": plan.snr,
            "pilot_size": plan.pilot_size,
            "snr_definition": "mean over images of var(clean image) / sigma^2",
            "cv_names": list(model.cv_names),
            "domain": {
                "lower": np.asarray(model.lower).tolist(),
                "upper": np.asarray(model.upper).tolist(),
            },
            "distribution": distribution.params(),
            "n_atoms": int(model.atoms.n_atoms),
            "files": {
                "star": STAR_NAME,
                "stacks": names,
                "truth": TRUTH_NAME,
                "montage": MONTAGE_NAME,
            },
            "key": "jax.random.key(seed), split into (conformations, nuisances, noise); "
            "image i's noise is normal(fold_in(noise_key, i))",
            "command": _command_line(cfg),
            "cryosip_version": __version__,
            "jax_version": jax.__version__,
        },
    }
    _atomic.write_json(out / CONFIG_NAME, config)
    write_star(
        out / STAR_NAME, stack, version="3.1", image_names=image_names
    )  # last: marks completion
    logger.info(
        "wrote %s (%d stacks), %s, %s, %s",
        out / STAR_NAME,
        len(names),
        TRUTH_NAME,
        CONFIG_NAME,
        MONTAGE_NAME,
    )
    return config


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_simulation(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
