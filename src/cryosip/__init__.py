"""cryosip: continuous conformational distributions from cryo-EM images (a stochastic inverse problem).

The generic engine (``cryosip.sip``) knows measures, random operators, discrepancies and flows;
the cryo-EM forward model (``cryosip.cryoem``) is one operator that plugs into it. Everything
a user needs is exported here, flat:

- the engine: :class:`ParticleMeasure`, :class:`AbstractRandomOperator`, the discrepancies
  (:class:`KL`; :class:`PairedMMD`, the nuisance-paired kernel score that ``--objective mmd``
  means; :class:`UnpairedMMD`, the unconditional MMD between fresh model images and the data,
  which sees little more than the mean of rho on raw pixels; :class:`Composite`), kernels and
  :class:`WassersteinGradientFlow`;
- the cryo-EM model: :class:`ImageModel`, :class:`CTFParams`, poses, :class:`CryoEMOperator`;
- conformation models: :class:`PathModel`, :class:`LinearModes`, :func:`load_model`;
- data: :class:`ParticleStack`, the readers and writers of RELION STAR, cryoSPARC ``.cs``,
  cryoDRGN pickles and MRC stacks, the distributions of the CV (:func:`make_distribution`);
- the pipeline: :func:`simulate_dataset`, :func:`prepare` (a :class:`Problem`),
  :func:`run_method` and the methods :class:`WGF`, :class:`EMGrid`, :class:`PerImageMAP`,
  :class:`MAPClasses`, :class:`GMM` and :class:`Bootstrap`, each returning a
  :class:`MethodResult`.

``MMD`` is an alias of :class:`UnpairedMMD`, kept for code written before the rename.
"""

__version__ = "0.1.0"

from .conformations.base import AbstractConformationModel as AbstractConformationModel
from .conformations.modes import LinearModes as LinearModes
from .conformations.path import PathModel as PathModel
from .cryoem.atoms import AtomParameters as AtomParameters
from .cryoem.ctf import CTFParams as CTFParams
from .cryoem.image_model import CryoNuisance as CryoNuisance
from .cryoem.image_model import ImageModel as ImageModel
from .cryoem.image_model import NuisancePrior as NuisancePrior
from .cryoem.pose import euler_to_matrix as euler_to_matrix
from .cryoem.pose import matrix_to_euler as matrix_to_euler
from .data.adk import adk_model as adk_model
from .data.cryodrgn import read_cryodrgn as read_cryodrgn
from .data.cryodrgn import write_cryodrgn as write_cryodrgn
from .data.cryosparc import read_cs as read_cs
from .data.cryosparc import write_cs as write_cs
from .data.distributions import AbstractDistribution as AbstractDistribution
from .data.distributions import Banana as Banana
from .data.distributions import Beta as Beta
from .data.distributions import Gaussian as Gaussian
from .data.distributions import Ring as Ring
from .data.distributions import Samples as Samples
from .data.distributions import TwoModeMixture as TwoModeMixture
from .data.distributions import Uniform as Uniform
from .data.distributions import make_distribution as make_distribution
from .data.errors import CryosipInputError as CryosipInputError
from .data.models import load_model as load_model
from .data.mrc import read_mrcs as read_mrcs
from .data.mrc import read_volume_mrc as read_volume_mrc
from .data.mrc import write_mrcs as write_mrcs
from .data.mrc import write_volume_mrc as write_volume_mrc
from .data.particles import ParticleStack as ParticleStack
from .data.particles import read_particles as read_particles
from .data.star import read_star as read_star
from .data.star import write_star as write_star
from .pipeline.methods import GMM as GMM
from .pipeline.methods import WGF as WGF
from .pipeline.methods import Bootstrap as Bootstrap
from .pipeline.methods import EMGrid as EMGrid
from .pipeline.methods import MAPClasses as MAPClasses
from .pipeline.methods import MethodResult as MethodResult
from .pipeline.methods import PerImageMAP as PerImageMAP
from .pipeline.methods import method_from_name as method_from_name
from .pipeline.methods import run_method as run_method
from .pipeline.operator import CryoEMOperator as CryoEMOperator
from .pipeline.problem import Problem as Problem
from .pipeline.problem import prepare as prepare
from .pipeline.simulate import simulate_dataset as simulate_dataset
from .sip.discrepancies import KL as KL
from .sip.discrepancies import MMD as MMD
from .sip.discrepancies import Composite as Composite
from .sip.discrepancies import EnergyKernel as EnergyKernel
from .sip.discrepancies import GaussianKernel as GaussianKernel
from .sip.discrepancies import InverseMultiquadricKernel as InverseMultiquadricKernel
from .sip.discrepancies import PairedMMD as PairedMMD
from .sip.discrepancies import UnpairedMMD as UnpairedMMD  # noqa: E402  (MMD: its old name)
from .sip.discrepancies import kl as kl
from .sip.discrepancies import mmd as mmd
from .sip.flow import FlowResult as FlowResult
from .sip.flow import TqdmProgress as TqdmProgress
from .sip.flow import WassersteinGradientFlow as WassersteinGradientFlow
from .sip.measure import ParticleMeasure as ParticleMeasure
from .sip.measure import grid_measure as grid_measure
from .sip.measure import uniform_measure as uniform_measure
from .sip.noise import GaussianNoise as GaussianNoise
from .sip.operator import AbstractRandomOperator as AbstractRandomOperator
from .sip.operator import Observations as Observations
from .sip.table import TabulatedOperator as TabulatedOperator
