"""rankdown: low-rank factorization of PyTorch layers, measured on real hardware."""

__version__ = "0.1.0"
