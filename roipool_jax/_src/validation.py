"""Trace-time checks of the arguments every RoI op shares.

Everything here inspects only static information (ranks, shapes, dtypes and
Python configuration values), so it runs identically under ``jit``, ``vmap``
and ``grad``. The one value check, ``box_indices`` in range, runs only when
the indices are concrete; traced indices out of range are handled by the ops
(the box is treated as invalid, see :mod:`roipool_jax._src.boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_features(features: jax.Array, name: str = "features") -> None:
  """Checks ``features`` is a floating ``[N, H, W, C]`` array with non-empty H, W."""
  shape = np.shape(features)
  if len(shape) != 4:
    raise ValueError(
      f"`{name}` must have rank 4 ([N, H, W, C], NHWC); got shape {shape} (rank {len(shape)})."
    )
  dtype = jnp.result_type(features)
  if not jnp.issubdtype(dtype, np.floating):
    raise TypeError(f"`{name}` must have a floating dtype; got {dtype} with shape {shape}.")
  if shape[1] < 1 or shape[2] < 1:
    raise ValueError(f"`{name}` must have H >= 1 and W >= 1; got shape {shape} ([N, H, W, C]).")


def check_boxes_dtype(boxes: jax.Array) -> None:
  dtype = jnp.result_type(boxes)
  if not (jnp.issubdtype(dtype, np.floating) or jnp.issubdtype(dtype, np.integer)):
    raise TypeError(
      f"`boxes` must have a floating (or integer) dtype; got {dtype} with shape {np.shape(boxes)}."
    )


def normalize_output_size(
  output_size: int | Sequence[int], name: str = "output_size"
) -> tuple[int, int]:
  """Returns ``(h, w)`` from an int or a pair, both positive Python ints.

  ``name`` is the argument named in errors (``output_size``, ``warp_size``, ...).
  """
  if isinstance(output_size, (int, np.integer)) and not isinstance(output_size, bool):
    size = (int(output_size), int(output_size))
  elif (
    isinstance(output_size, Sequence)
    and len(output_size) == 2
    and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in output_size)
  ):
    size = (int(output_size[0]), int(output_size[1]))
  else:
    raise ValueError(
      f"`{name}` must be a positive int or a pair of positive ints (h, w); got {output_size!r}."
    )
  if size[0] < 1 or size[1] < 1:
    raise ValueError(f"`{name}` must be positive; got {output_size!r}.")
  return size


def check_spatial_scale(spatial_scale: float) -> float:
  """Returns ``spatial_scale`` as a Python float after checking it is positive and finite."""
  if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float, np.number)):
    raise ValueError(
      f"`spatial_scale` must be a static positive finite Python float; got {spatial_scale!r} "
      f"of type {type(spatial_scale).__name__}."
    )
  scale = float(spatial_scale)
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"`spatial_scale` must be positive and finite; got {spatial_scale!r}.")
  return scale


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {value!r}.")


def check_box_indices(box_indices: jax.Array, num_boxes: int, num_images: int) -> None:
  """Checks ``box_indices`` is an integer ``[K]`` array, and in ``[0, N)`` when concrete."""
  shape = np.shape(box_indices)
  dtype = jnp.result_type(box_indices)
  if not jnp.issubdtype(dtype, np.integer):
    raise TypeError(f"`box_indices` must have an integer dtype; got {dtype} with shape {shape}.")
  if shape != (num_boxes,):
    raise ValueError(
      f"`box_indices` must have shape [K] = ({num_boxes},) to match `boxes`; got {shape}."
    )
  if isinstance(box_indices, jax.core.Tracer):
    return
  values = np.asarray(box_indices)
  if values.size and (values.min() < 0 or values.max() >= num_images):
    raise ValueError(
      f"`box_indices` must lie in [0, N) = [0, {num_images}); "
      f"got values in [{values.min()}, {values.max()}]."
    )


def check_sampling_ratio(sampling_ratio: int) -> int:
  """Returns ``sampling_ratio`` as an int: ``> 0`` fixed samples per bin, ``<= 0`` adaptive."""
  if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, (int, np.integer)):
    raise ValueError(
      f"`sampling_ratio` must be a static Python int (> 0: samples per bin axis, <= 0: "
      f"adaptive); got {sampling_ratio!r} of type {type(sampling_ratio).__name__}."
    )
  return int(sampling_ratio)


def check_bool(name: str, value: bool) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a static Python bool; got {value!r}.")
