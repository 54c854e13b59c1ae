"""The math: pure functions from tensors and parameters to a merged tensor. Importing this package registers
every method."""

from . import elementwise, interpolation, selection, spectral  # noqa: F401  (importing registers the methods)
from .registry import FirstPass, MethodSpec, Param, TensorContext, Work, all_methods, get_method

__all__ = ["FirstPass", "MethodSpec", "Param", "TensorContext", "Work", "all_methods", "get_method"]
