"""cryosip: continuous conformational distributions from cryo-EM images (a stochastic inverse problem).

The generic engine (``cryosip.sip``) knows measures, random operators, discrepancies and flows;
the cryo-EM forward model (``cryosip.cryoem``) is one operator that plugs into it.
"""

__version__ = "0.1.0"

from .conformations.base import AbstractConformationModel as AbstractConformationModel
from .conformations.path import PathModel as PathModel
from .cryoem.atoms import AtomParameters as AtomParameters
from .cryoem.ctf import CTFParams as CTFParams
from .cryoem.image_model import (
    CryoNuisance as CryoNuisance,
)
from .cryoem.image_model import (
    ImageModel as ImageModel,
)
from .cryoem.image_model import (
    NuisancePrior as NuisancePrior,
)
from .cryoem.pose import euler_to_matrix as euler_to_matrix
from .cryoem.pose import matrix_to_euler as matrix_to_euler
from .data.adk import adk_model as adk_model
from .data.errors import CryosipInputError as CryosipInputError
from .data.particles import ParticleStack as ParticleStack
from .pipeline.operator import CryoEMOperator as CryoEMOperator
from .pipeline.simulate import simulate_dataset as simulate_dataset
from .reconstruction import prepare as prepare
from .reconstruction import run_method as run_method
from .sip.discrepancies import (
    KL as KL,
)
from .sip.discrepancies import (
    MMD as MMD,
)
from .sip.discrepancies import (
    Composite as Composite,
)
from .sip.discrepancies import (
    EnergyKernel as EnergyKernel,
)
from .sip.discrepancies import (
    GaussianKernel as GaussianKernel,
)
from .sip.discrepancies import (
    InverseMultiquadricKernel as InverseMultiquadricKernel,
)
from .sip.discrepancies import (
    PairedMMD as PairedMMD,
)
from .sip.discrepancies import (
    kl as kl,
)
from .sip.discrepancies import (
    mmd as mmd,
)
from .sip.flow import (
    FlowResult as FlowResult,
)
from .sip.flow import (
    TqdmProgress as TqdmProgress,
)
from .sip.flow import (
    WassersteinGradientFlow as WassersteinGradientFlow,
)
from .sip.measure import (
    ParticleMeasure as ParticleMeasure,
)
from .sip.measure import (
    grid_measure as grid_measure,
)
from .sip.measure import (
    uniform_measure as uniform_measure,
)
from .sip.noise import GaussianNoise as GaussianNoise
from .sip.operator import (
    AbstractRandomOperator as AbstractRandomOperator,
)
from .sip.operator import (
    Observations as Observations,
)
from .sip.table import TabulatedOperator as TabulatedOperator
