from .base import AbstractDiscrepancy as AbstractDiscrepancy
from .composite import Composite as Composite, balance_weights as balance_weights
from .kernels import (
    AbstractKernel as AbstractKernel,
    EnergyKernel as EnergyKernel,
    GaussianKernel as GaussianKernel,
    InverseMultiquadricKernel as InverseMultiquadricKernel,
    median_distance as median_distance,
)
from .kl import KL as KL, kl as kl
from .mmd import (
    MMD as MMD,
    PairedMMD as PairedMMD,
    mmd as mmd,
    mmd_random_features as mmd_random_features,
    paired_kernel_score as paired_kernel_score,
)
