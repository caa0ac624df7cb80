"""Compact checkpoints of pruned models (bitmask + non-zero values), and torch sparse formats.

A compact checkpoint stores every floating-point tensor that is sparse enough to gain as a
bitmask (one bit a weight, packed into bytes) plus its non-zero values in the original dtype;
other tensors are stored as they are. Loading it rebuilds the exact dense state dict, so an
identical dense model can load it with ``model.load_state_dict(load_compact(ckpt))``.
"""

from __future__ import annotations

import io
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._options import is_integer
from .metrics import refuse_meta

FORMAT = "sparsetrain.compact/1"
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Return a bool tensor's bits packed 8 to a ``uint8`` (first element in the high bit)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Invert :func:`pack_bits`: return ``numel`` bools (at most 8 for each packed byte)."""
    if not is_integer(numel, 0) or operator.index(numel) > 8 * packed.numel():
        raise ValueError(
            f"numel must be an integer in [0, {8 * packed.numel()}] for {packed.numel()} packed "
            f"bytes (8 bits a byte), got {numel!r}"
        )
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def _state(model_or_state: nn.Module | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    if not isinstance(model_or_state, Mapping):
        raise TypeError(
            "export_compact takes a torch.nn.Module or its state dict, got "
            f"{type(model_or_state).__name__}"
        )
    return model_or_state


def _signbit(t: Tensor) -> Tensor:
    """``torch.signbit``, also for the 1-byte float8 types it has no kernel for (their top bit;
    in the fnuz types, which have no -0.0, 0x80 is NaN, which ``t != 0`` keeps anyway)."""
    if t.element_size() == 1:
        return t.view(torch.uint8) >= 0x80
    return torch.signbit(t)


def export_compact(
    model_or_state: nn.Module | Mapping[str, Any], masks: Mapping[str, Tensor] | None = None
) -> dict[str, Any]:
    """Return a compact checkpoint of a (pruned) model's state dict.

    A floating-point tensor is stored as ``{"shape", "bits", "values"}`` when that is smaller
    than the dense tensor, which holds when its density is below about ``1 - 1/(8 * itemsize)``.
    The kept positions are those of ``masks`` where given (so kept weights that happen to be
    zero round-trip too), else the non-zero entries.

    Args:
        model_or_state: a module or a state dict.
        masks: optional name -> bool masks (True = kept) of some of its tensors.

    Returns:
        A dict that ``torch.save`` can write; :func:`load_compact` turns it back.

    Raises:
        TypeError, ValueError: a mask that is not a bool tensor of its tensor's shape, names no
            floating-point tensor of the state, or prunes a non-zero value (it would be lost).

    Example:
        >>> ckpt = export_compact(model)  # doctest: +SKIP
        >>> model.load_state_dict(load_compact(ckpt))  # doctest: +SKIP
    """
    state = _state(model_or_state)
    refuse_meta(state.items(), "export_compact")
    masks = {} if masks is None else masks
    _check_export_masks(state, masks)
    sparse, dense = {}, {}
    for name, t in state.items():
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.is_sparse:
            dense[name] = t
            continue
        # -0.0 is kept as a value: it equals 0, and would come back as +0.0.
        keep = masks[name].to(t.device) if name in masks else (t != 0) | _signbit(t)
        nnz = int(keep.sum())
        packed_bytes = (t.numel() + 7) // 8 + nnz * t.element_size()
        if packed_bytes >= t.numel() * t.element_size():
            dense[name] = t.detach().clone()
            continue
        sparse[name] = {
            "shape": tuple(t.shape),
            "bits": pack_bits(keep).cpu(),
            "values": t.detach().reshape(-1)[keep.reshape(-1)].cpu().clone(),
        }
    return {"format": FORMAT, "sparse": sparse, "dense": dense, "order": list(state)}


def _check_export_masks(state: Mapping[str, Any], masks: Any) -> None:
    """Refuse masks that are not bool tensors of their tensor's shape, or that would drop a
    non-zero value (it would not come back from the checkpoint)."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict of name -> bool tensor, got {type(masks).__name__}")
    unknown = sorted(set(masks) - set(state))
    if unknown:
        hint = (
            " (the state dict is a DDP wrapper's, whose names start with 'module.': export the "
            "wrapped module, ddp.module)"
            if all(f"module.{n}" in state for n in unknown)
            else ""
        )
        raise ValueError(f"masks name tensors not in the state dict: {unknown}{hint}")
    for name, m in masks.items():
        t = state[name]
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.is_sparse:
            what = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(
                f"mask {name!r} is for {what}; masks apply to dense floating-point tensors only"
            )
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"mask {name!r} must be a bool tensor (True = kept), got {got}")
        if m.shape != t.shape:
            raise ValueError(
                f"mask {name!r} has shape {tuple(m.shape)}, but the tensor has shape "
                f"{tuple(t.shape)}"
            )
        lost = int((t.detach() != 0).logical_and_(~m.to(t.device)).sum())
        if lost:
            raise ValueError(
                f"mask {name!r} prunes {lost} non-zero value(s) of the tensor, which the "
                "checkpoint would lose: apply the masks to the model first (pruner.apply() or "
                "finalize()), or leave masks out to keep every non-zero value"
            )


def load_compact(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Return the dense state dict a compact checkpoint was made from (exact values)."""
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != FORMAT:
        raise ValueError(f"not a compact checkpoint (expected format {FORMAT!r})")
    missing = [k for k in ("sparse", "dense", "order") if k not in ckpt]
    if missing:
        raise ValueError(
            f"this compact checkpoint lacks {', '.join(missing)}; export_compact() writes "
            "format, sparse, dense and order"
        )
    out: dict[str, Any] = {}
    for name in ckpt["order"]:
        if name in ckpt["dense"]:
            out[name] = ckpt["dense"][name]
            continue
        if name not in ckpt["sparse"]:
            raise ValueError(f"the compact checkpoint lists {name!r} but stores no tensor for it")
        entry = ckpt["sparse"][name]
        lacks = [k for k in ("shape", "bits", "values") if k not in entry]
        if lacks:
            raise ValueError(f"the compact checkpoint's entry {name!r} lacks {', '.join(lacks)}")
        shape = torch.Size(entry["shape"])
        bits, values = entry["bits"], entry["values"]
        if bits.numel() != (shape.numel() + 7) // 8:
            raise ValueError(
                f"the compact checkpoint's entry {name!r} has {bits.numel()} bytes of bits, "
                f"but shape {tuple(shape)} needs {(shape.numel() + 7) // 8}"
            )
        keep = unpack_bits(bits, shape.numel())
        if values.numel() != int(keep.sum()):
            raise ValueError(
                f"the compact checkpoint's entry {name!r} has {values.numel()} values for "
                f"{int(keep.sum())} kept positions"
            )
        t = torch.zeros(shape.numel(), dtype=values.dtype)
        t[keep] = values
        out[name] = t.view(shape)
    return out


def checkpoint_bytes(obj: Any) -> int:
    """Return how many bytes ``torch.save(obj)`` writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def compact_size_report(
    model_or_state: nn.Module | Mapping[str, Any], masks: Mapping[str, Tensor] | None = None
) -> dict[str, Any]:
    """Return the sizes of the dense and compact checkpoints, in bytes, and their ratio."""
    state = _state(model_or_state)
    dense = checkpoint_bytes(dict(state))
    compact = checkpoint_bytes(export_compact(state, masks))
    return {"dense_bytes": dense, "compact_bytes": compact, "compact_over_dense": compact / dense}


def to_torch_sparse(weight: Tensor, layout: str = "csr") -> Tensor:
    """Return a pruned weight in one of torch's sparse formats.

    Args:
        weight: a 2-D weight (conv weights are flattened to ``(out, -1)`` first).
        layout: ``"coo"``, ``"csr"`` (any device), or ``"semi_structured"`` (2:4 sparse tensor
            cores: CUDA devices of compute capability 8.0 or newer, fp16/bf16 weights).

    Returns:
        The sparse tensor; ``to_dense()`` gives back the (flattened) weight.

    Raises:
        ValueError: a weight with fewer than 2 dimensions, an unknown layout, or
            semi-structured asked for a weight that is not 2-D or where the device cannot run
            it.
    """
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        got = (
            f"shape {tuple(weight.shape)}"
            if isinstance(weight, Tensor)
            else f"a {type(weight).__name__}"
        )
        raise ValueError(
            f"to_torch_sparse takes a weight with 2 or more dimensions, got {got}; for a "
            "1-D tensor use tensor.to_sparse() (COO)"
        )
    w = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 2 else weight.detach()
    if layout == "coo":
        return w.to_sparse_coo()
    if layout == "csr":
        return w.to_sparse_csr()
    if layout == "semi_structured":
        if weight.dim() > 2:
            raise ValueError(
                f"semi_structured (2:4) takes a 2-D weight, got shape {tuple(weight.shape)}: a "
                "convolution's N:M groups run along its input channels, which flattening to "
                "(out, -1) does not keep consecutive; use layout='csr' or 'coo'"
            )
        if w.device.type != "cuda" or torch.cuda.get_device_capability(w.device)[0] < 8:
            raise ValueError(
                "semi_structured (2:4) sparse tensors need a CUDA device of compute capability "
                f"8.0 or newer; this weight is on {w.device}. Use layout='csr' or 'coo'"
            )
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"semi_structured needs float16 or bfloat16 weights, got {w.dtype}")
        return torch.sparse.to_sparse_semi_structured(w)
    raise ValueError(f"layout must be 'coo', 'csr' or 'semi_structured', got {layout!r}")
