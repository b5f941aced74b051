"""Trace-time checks of the arguments the RoI ops share.

Everything here inspects only static information (ranks, shapes, dtypes and
Python configuration values), so it runs identically under ``jit``, ``vmap``
and ``grad``. One rule for every option: a value of the wrong *type* raises
``TypeError``, a value of the right type that is out of range raises
``ValueError``; both messages name the argument and show the value seen.

The one value check on an array, ``box_indices`` in range, runs only when the
indices are concrete; traced indices out of range are handled by the ops (the
box is treated as invalid, see :mod:`roipool_jax._src.boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# How to move from torchvision's conventions, quoted in errors where a shape
# gives the habit away.
ROTATED_ROIS_HINT = (
  "detectron2's and mmcv's rotated rois [K, 6] hold (batch_index, cx, cy, w, h, angle): pass "
  "`boxes=rois[:, 1:]` and `box_indices=rois[:, 0].astype(jnp.int32)` instead"
)
TORCHVISION_ROIS_HINT = (
  "torchvision's rois [K, 5] hold (batch_index, x1, y1, x2, y2): pass "
  "`boxes=rois[:, 1:]` and `box_indices=rois[:, 0].astype(jnp.int32)` instead, or call the "
  "same op from `roipool_jax.torchvision`, which takes torchvision's NCHW maps and rois"
)
BEZIER_ROIS_HINT = (
  "mmcv's Bezier rois [K, 17] hold (batch_index, 16 coordinates): pass `boxes=rois[:, 1:]` and "
  "`box_indices=rois[:, 0].astype(jnp.int32)` instead"
)
# What a box holds, by its numbers per box, and the hint for rois with a leading batch index.
BOX_LAYOUTS = {
  4: ("(x1, y1, x2, y2)", TORCHVISION_ROIS_HINT),
  5: ("(cx, cy, w, h, angle_degrees)", ROTATED_ROIS_HINT),
  16: (
    "8 Bezier control points (x, y), the top curve left to right, then the bottom one right "
    "to left",
    BEZIER_ROIS_HINT,
  ),
}
NCHW_HINT = (
  "features are NHWC; transpose NCHW maps with `x.transpose(0, 2, 3, 1)`, or use "
  "`roipool_jax.torchvision`, which takes NCHW"
)


def is_concrete(*arrays: object) -> bool:
  """Whether every array leaf of ``arrays`` holds values (none is a tracer), so
  that it can be inspected, or prepared, on the host."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(arrays))


def _describe(value: object) -> str:
  if isinstance(value, (jax.Array, np.ndarray)):
    return f"an array of shape {np.shape(value)} and dtype {value.dtype}"
  return f"{value!r} of type {type(value).__name__}"


def array_dtype(name: str, value: object) -> np.dtype:
  """The dtype of an array argument, or a TypeError naming it."""
  if isinstance(value, (list, tuple)):
    try:
      value = np.asarray(value)
    except ValueError:
      raise TypeError(
        f"`{name}` must be one array; got a ragged {type(value).__name__} (torchvision's list of "
        "per-image boxes: concatenate them into [K, 4] with `box_indices`, or pad them to "
        "[N, R, 4])."
      ) from None
  try:
    return jnp.result_type(value)
  except TypeError:
    raise TypeError(
      f"`{name}` must be an array (jax.Array, np.ndarray or a nested list of numbers); got "
      f"{type(value).__name__}: {str(value)[:80]}."
    ) from None


def check_features(features: object, name: str = "features", allow_integer: bool = False) -> None:
  """Checks ``features`` is a floating (or, if allowed, integer) ``[N, H, W, C]`` array."""
  dtype = array_dtype(name, features)
  shape = np.shape(features)
  if len(shape) != 4:
    raise ValueError(
      f"`{name}` must have rank 4 ([N, H, W, C], NHWC); got shape {shape} (rank {len(shape)})."
    )
  floating = jnp.issubdtype(dtype, np.floating)
  if not (floating or (allow_integer and jnp.issubdtype(dtype, np.integer))):
    kinds = "a floating or integer" if allow_integer else "a floating"
    raise TypeError(f"`{name}` must have {kinds} dtype; got {dtype} with shape {shape}.")
  if shape[1] < 1 or shape[2] < 1:
    raise ValueError(f"`{name}` must have H >= 1 and W >= 1; got shape {shape} ([N, H, W, C]).")


def check_boxes(boxes: object, coords: int = 4, layout: str | None = None) -> None:
  """Checks ``boxes`` is a numeric ``[K, coords]`` or ``[N, R, coords]`` array.

  ``layout`` names the coordinates in the error (by default those of
  :data:`BOX_LAYOUTS` for ``coords``).
  """
  dtype = array_dtype("boxes", boxes)
  shape = np.shape(boxes)
  if not (jnp.issubdtype(dtype, np.floating) or jnp.issubdtype(dtype, np.integer)):
    raise TypeError(
      f"`boxes` must have a floating (or integer) dtype; got {dtype} with shape {shape}."
    )
  if len(shape) not in (2, 3) or shape[-1] != coords:
    hint = ""
    if layout is None:
      layout, rois_hint = BOX_LAYOUTS.get(coords, (f"{coords} numbers per box", None))
      if rois_hint and len(shape) == 2 and shape[-1] == coords + 1:
        hint = f"; {rois_hint}"
    raise ValueError(
      f"`boxes` must be [K, {coords}] (with `box_indices`) or [N, R, {coords}] (per image), as "
      f"{layout}; got shape {shape}{hint}."
    )


def normalize_size(value: object, name: str = "output_size") -> tuple[int, int]:
  """Returns ``(h, w)`` from a positive int or a pair of positive ints.

  ``name`` is the argument named in errors (``output_size``, ``warp_size``, ...).
  """
  if _is_int(value):
    size = (int(value), int(value))
  elif isinstance(value, Sequence) and not isinstance(value, str):
    if len(value) != 2:
      raise ValueError(f"`{name}` must be an int or a pair (h, w); got {value!r}.")
    if not all(_is_int(s) for s in value):
      raise TypeError(f"`{name}` must hold Python ints; got {value!r}.")
    size = (int(value[0]), int(value[1]))
  else:
    raise TypeError(
      f"`{name}` must be a static positive int or a pair of them (h, w); got {_describe(value)}."
    )
  if size[0] < 1 or size[1] < 1:
    raise ValueError(f"`{name}` must be positive; got {value!r}.")
  return size


def _is_int(value: object) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: object) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
    value, (bool, np.bool_)
  )


def check_int(name: str, value: object) -> int:
  """Returns ``value`` as an int after checking it is a static Python (or NumPy) int."""
  if not _is_int(value):
    raise TypeError(f"`{name}` must be a static Python int; got {_describe(value)}.")
  return int(value)


def check_real(name: str, value: object) -> float:
  """Returns ``value`` as a float after checking it is a static real number."""
  if not _is_real(value):
    raise TypeError(f"`{name}` must be a static Python float; got {_describe(value)}.")
  return float(value)


def check_positive(name: str, value: object) -> float:
  """Returns ``value`` as a float after checking it is a static, positive, finite number."""
  number = check_real(name, value)
  if not (math.isfinite(number) and number > 0):
    raise ValueError(f"`{name}` must be positive and finite; got {value!r}.")
  return number


def check_spatial_scale(spatial_scale: object) -> float:
  """Returns ``spatial_scale`` as a Python float after checking it is positive and finite."""
  return check_positive("spatial_scale", spatial_scale)


def check_sampling_ratio(sampling_ratio: object) -> int:
  """Returns ``sampling_ratio`` as an int: ``> 0`` fixed samples per bin, ``<= 0`` adaptive."""
  return check_int("sampling_ratio", sampling_ratio)


def check_bool(name: str, value: object) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a static Python bool; got {_describe(value)}.")
  return bool(value)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
  if not isinstance(value, str):
    raise TypeError(f"`{name}` must be one of {tuple(choices)}; got {_describe(value)}.")
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")
  return value


def check_box_indices(box_indices: object, num_boxes: int, num_images: int) -> None:
  """Checks ``box_indices`` is an integer ``[K]`` array, and in ``[0, N)`` when concrete."""
  dtype = array_dtype("box_indices", box_indices)
  shape = np.shape(box_indices)
  if not jnp.issubdtype(dtype, np.integer):
    raise TypeError(
      f"`box_indices` must have an integer dtype; got {dtype} with shape {shape} (convert a "
      "float batch column with `.astype(jnp.int32)`)."
    )
  if shape != (num_boxes,):
    raise ValueError(
      f"`box_indices` must have shape [K] = ({num_boxes},) to match `boxes`; got {shape}."
    )
  if not is_concrete(box_indices):
    return
  values = np.asarray(box_indices)
  if values.size and (values.min() < 0 or values.max() >= num_images):
    raise ValueError(
      f"`box_indices` must lie in [0, N) = [0, {num_images}); "
      f"got values in [{values.min()}, {values.max()}]."
    )
