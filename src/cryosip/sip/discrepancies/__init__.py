from .base import AbstractDiscrepancy as AbstractDiscrepancy
from .composite import Composite as Composite
from .composite import balance_weights as balance_weights
from .kernels import (
    AbstractKernel as AbstractKernel,
)
from .kernels import (
    EnergyKernel as EnergyKernel,
)
from .kernels import (
    GaussianKernel as GaussianKernel,
)
from .kernels import (
    InverseMultiquadricKernel as InverseMultiquadricKernel,
)
from .kernels import (
    median_distance as median_distance,
)
from .kl import KL as KL
from .kl import kl as kl
from .mmd import (
    MMD as MMD,
)
from .mmd import (
    PairedMMD as PairedMMD,
)
from .mmd import (
    UnpairedMMD as UnpairedMMD,
)
from .mmd import (
    mmd as mmd,
)
from .mmd import (
    mmd_random_features as mmd_random_features,
)
from .mmd import (
    paired_kernel_score as paired_kernel_score,
)
