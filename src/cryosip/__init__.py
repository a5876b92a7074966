"""cryosip: continuous conformational distributions from cryo-EM images (a stochastic inverse problem)."""

__version__ = "0.1.0"
