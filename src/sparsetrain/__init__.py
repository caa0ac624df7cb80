"""sparsetrain: cheaper, safer data-parallel PyTorch training by sparsity."""

from .compressors import available_compressors, get_compressor, register_compressor

__version__ = "0.1.0"

__all__ = ["available_compressors", "get_compressor", "register_compressor"]
