"""Gradient compressors, one per file, registered by name.

``get_compressor("topk", density=0.01)`` builds one; ``available_compressors()`` lists the names.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .._options import check_options, plain
from .base import (
    Compressor,
    Payload,
    SparseCompressor,
    TensorMeta,
    bucket_shape,
    bucketed,
    check_bucket_size,
    check_density,
    check_floating,
    check_int,
    index_dtype,
    k_for,
    pack_bits,
    seeded_generator,
    unpack_bits,
    work_dtype,
)

_REGISTRY: dict[str, type[Compressor]] = {}

# Modules that register compressors when imported; adding one is one line here and one file.
_MODULES = (
    "none",
    "fp16",
    "topk",
    "threshold",
    "randomk",
    "qsgd",
    "terngrad",
    "signsgd",
    "powersgd",
)


def register_compressor(name: str):
    """Class decorator: register a compressor under ``name``."""

    def wrap(cls: type[Compressor]) -> type[Compressor]:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(
                f"register_compressor({name!r}) takes a subclass of sparsetrain.compressors."
                f"Compressor, got {cls!r}"
            )
        if not cls.__module__.startswith(f"{__name__}."):
            # The built-ins load on first use: first, so a name of theirs is refused now, not
            # at that use (and every lookup after it).
            _load_all()
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"compressor name {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a module listed but not written yet
            if e.name != f"{__name__}.{mod}":
                raise


def available_compressors() -> list[str]:
    """Return the registered compressor names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def compressor_class(name: str) -> type[Compressor]:
    """Return the compressor class registered as ``name``; an unknown name raises a
    ``ValueError`` that lists the valid ones."""
    _load_all()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown compressor {name!r}; valid names are: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def option_names(name: str) -> list[str]:
    """Return the options a compressor accepts."""
    return [f.name for f in dataclasses.fields(compressor_class(name)) if f.init]


def get_compressor(name: str, **options: Any) -> Compressor:
    """Build the compressor registered as ``name`` with ``options``.

    Raises:
        ValueError: the name is unknown (the message lists valid names), an option is not one
            this compressor takes (the message lists the ones it does), or a value is out of range.
    """
    cls = compressor_class(name)
    check_options("compressor", name, options, option_names(name))
    return cls(**plain(options))  # NumPy numbers as Python's (np.float32 is no float)


__all__ = [
    "Compressor",
    "Payload",
    "SparseCompressor",
    "TensorMeta",
    "available_compressors",
    "bucket_shape",
    "bucketed",
    "check_bucket_size",
    "check_density",
    "check_floating",
    "check_int",
    "compressor_class",
    "get_compressor",
    "index_dtype",
    "k_for",
    "option_names",
    "pack_bits",
    "register_compressor",
    "seeded_generator",
    "unpack_bits",
    "work_dtype",
]
