"""How user data reaches a model: the one place that turns a stored per-sample shape into the
model's per-sample input shape.

The data must reach the model exactly as onnxruntime would receive it from the user. So, in
this order:

1. the data already has the model's per-sample shape: used as stored, nothing converted (this
   also settles every ambiguous case, e.g. ``(3, 3, 3)``);
2. images whose shape is the model's with the channel axis moved (HWC stored, CHW wanted, or
   the other way round): **transposed**, never reshaped (a reshape of differently ordered data
   scrambles the pixels of every colour image while leaving grey ones intact);
3. a pure re-view (same element order: unit axes added or dropped, consecutive axes merged or
   split, e.g. 28x28 images for a ``(784,)`` MLP input): reshaped in C order;
4. images whose shape is a channel-moved *re-view* of the model's (e.g. HWC data for a
   ``(C, H*W)`` input): transposed, then re-viewed.

Anything else is refused: the same number of values in another arrangement cannot be fitted
without guessing an order. Works on numpy arrays and torch tensors alike (shapes in, plan out).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["CHANNELS", "plan_layout", "apply_layout", "is_reshape_view", "looks_channels_last"]

#: channel counts the layout guess recognises (grey, RGB, RGBA)
CHANNELS = (1, 3, 4)

#: batch-axis permutations of 4-D images
TO_CHANNELS_FIRST = (0, 3, 1, 2)
TO_CHANNELS_LAST = (0, 2, 3, 1)

Step = tuple[str, tuple[int, ...]]


def looks_channels_last(sample_shape: Sequence[int]) -> bool:
    """A 3-D sample ``(H, W, C)`` with a channel-like last axis and a first axis that is not one."""
    s = tuple(int(d) for d in sample_shape)
    return len(s) == 3 and s[2] in CHANNELS and s[0] not in CHANNELS


def _squeeze(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if int(d) != 1)


def _merges(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    """Every axis of ``coarse`` is the product of a run of consecutive axes of ``fine``."""
    i = 0
    for c in coarse:
        p = 1
        while p < c and i < len(fine):
            p *= fine[i]
            i += 1
        if p != c:
            return False
    return i == len(fine)


def is_reshape_view(have: Sequence[int], want: Sequence[int]) -> bool:
    """True when reshaping ``have`` into ``want`` (C order) keeps every axis's meaning: unit
    axes added or dropped and consecutive axes merged (flattening) or split. ``(8, 8, 3)`` to
    ``(192,)`` or ``(64, 3)`` is one; ``(8, 8, 3)`` to ``(3, 8, 8)`` is not (that needs a transpose)."""
    a, b = _squeeze(have), _squeeze(want)
    prod_a = prod_b = 1
    for d in a:
        prod_a *= d
    for d in b:
        prod_b *= d
    if prod_a != prod_b:
        return False
    return a == b or _merges(a, b) or _merges(b, a)


def _moved(shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample shape after applying the batch-axis permutation ``perm`` to ``(N, *shape)``."""
    full = (0, *shape)
    return tuple(full[p] for p in perm[1:])


def _desc(perm: tuple[int, ...]) -> str:
    return "channels last to channels first" if perm == TO_CHANNELS_FIRST else "channels first to channels last"


def plan_layout(
    have: Sequence[int], want: Sequence[int], channels_last: bool | None = None
) -> tuple[list[Step], str] | None:
    """Steps that bring samples of shape ``have`` (as stored) to the model's ``want``, and a
    note saying what was done ("" when nothing), or None when no rule of the module docstring
    applies. ``channels_last`` says which transpose to try first in rule 4 (default: guessed)."""
    h = tuple(int(d) for d in have)
    w = tuple(int(d) for d in want)
    if h == w:
        return [], ""
    if len(h) == 3 and len(w) == 3:
        for perm in (TO_CHANNELS_FIRST, TO_CHANNELS_LAST):
            if _moved(h, perm) == w:
                return [("transpose", perm)], (f"data samples {list(h)} transposed ({_desc(perm)}) "
                                               f"to the model input {list(w)}")
    if is_reshape_view(h, w):
        return [("reshape", w)], f"data samples {list(h)} reshaped to the model input {list(w)} (same element order)"
    if len(h) == 3:
        cl = looks_channels_last(h) if channels_last is None else channels_last
        perms = (TO_CHANNELS_FIRST, TO_CHANNELS_LAST) if cl else (TO_CHANNELS_LAST, TO_CHANNELS_FIRST)
        for perm in perms:
            if is_reshape_view(_moved(h, perm), w):
                return [("transpose", perm), ("reshape", w)], (
                    f"data samples {list(h)} transposed ({_desc(perm)}) and reshaped to the model input {list(w)}")
    return None


def apply_layout(x: Any, steps: Sequence[Step]) -> Any:
    """Apply :func:`plan_layout`'s steps to a batch (numpy array or torch tensor)."""
    for op, arg in steps:
        if op == "transpose":
            x = x.permute(*arg) if hasattr(x, "permute") else x.transpose(arg)
        else:
            x = x.reshape(x.shape[0], *arg)
    return x
