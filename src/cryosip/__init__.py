"""cryosip: continuous conformational distributions from cryo-EM images (a stochastic inverse problem).

The generic engine (``cryosip.sip``) knows measures, random operators, discrepancies and flows;
the cryo-EM forward model (``cryosip.cryoem``) is one operator that plugs into it.
"""

__version__ = "0.1.0"

from .conformations.base import AbstractConformationModel as AbstractConformationModel
from .conformations.path import PathModel as PathModel
from .cryoem.atoms import AtomParameters as AtomParameters
from .cryoem.ctf import CTFParams as CTFParams
from .cryoem.image_model import CryoNuisance as CryoNuisance, ImageModel as ImageModel, NuisancePrior as NuisancePrior
from .cryoem.operator import CryoEMOperator as CryoEMOperator
from .cryoem.pose import euler_to_matrix as euler_to_matrix, matrix_to_euler as matrix_to_euler
from .cryoem.simulate import simulate_dataset as simulate_dataset
from .data.adk import adk_model as adk_model
from .data.errors import CryosipInputError as CryosipInputError
from .data.particles import ParticleStack as ParticleStack
from .reconstruction import prepare as prepare, run_method as run_method
from .sip.discrepancies import (
    KL as KL,
    MMD as MMD,
    Composite as Composite,
    EnergyKernel as EnergyKernel,
    GaussianKernel as GaussianKernel,
    InverseMultiquadricKernel as InverseMultiquadricKernel,
    PairedMMD as PairedMMD,
    kl as kl,
    mmd as mmd,
)
from .sip.flow import FlowResult as FlowResult, TqdmProgress as TqdmProgress, WassersteinGradientFlow as WassersteinGradientFlow
from .sip.measure import ParticleMeasure as ParticleMeasure, grid_measure as grid_measure, uniform_measure as uniform_measure
from .sip.noise import GaussianNoise as GaussianNoise
from .sip.operator import AbstractRandomOperator as AbstractRandomOperator, Observations as Observations
from .sip.table import TabulatedOperator as TabulatedOperator
