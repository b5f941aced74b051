"""Box forms shared by every RoI op: parsing, validity and C-style rounding.

Two box forms are accepted (see :func:`flatten_boxes`):

* flat, torchvision style: ``boxes [K, 4]`` with ``box_indices [K]`` naming the
  image of each box (may be omitted when ``N == 1``); ops return ``[K, ...]``;
* per image, padded: ``boxes [N, R, 4]``; ops return ``[N, R, ...]``.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels. A box is *valid* when its
four coordinates are finite and its image index lies in ``[0, N)``; an invalid
box (NaN/inf coordinates, or an out-of-range index under ``jit``) produces an
all-zero output and zero gradients, and never affects other boxes.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from roipool_jax._src import validation

# Scaled coordinates are clamped to +-COORD_LIMIT feature cells before any
# integer conversion, so int32 arithmetic on bin edges can never overflow.
# Any box reaching that far covers the whole map anyway.
COORD_LIMIT = float(2**22)


class FlatBoxes(NamedTuple):
  """Boxes in flat form, ready for an op.

  Attributes:
    boxes: ``[K, 4]`` float32 ``(x1, y1, x2, y2)`` in image pixels; invalid
      boxes have their coordinates replaced by zeros.
    image_index: ``[K]`` int32 image of each box, clipped into ``[0, N)``.
    valid: ``[K]`` bool, False for boxes that must produce zeros.
    batch_shape: leading output dims, ``(K,)`` or ``(N, R)``.
  """

  boxes: jax.Array
  image_index: jax.Array
  valid: jax.Array
  batch_shape: tuple[int, ...]


def flatten_boxes(
  boxes: jax.typing.ArrayLike,
  box_indices: jax.typing.ArrayLike | None,
  num_images: int,
) -> FlatBoxes:
  """Validates either box form and returns it flat.

  Args:
    boxes: ``[K, 4]`` or ``[N, R, 4]`` box corners in image pixels.
    box_indices: ``[K]`` integer image index per box for the flat form, or
      None (allowed for the flat form only when ``num_images == 1``).
    num_images: N, the batch size of the features.

  Returns:
    A :class:`FlatBoxes`.

  Raises:
    ValueError: on a wrong rank or last dimension, a per-image form whose
      leading dim is not N, or ``box_indices`` of the wrong shape or range.
    TypeError: on non-numeric boxes or non-integer ``box_indices``.
  """
  validation.check_boxes_dtype(boxes)
  shape = np.shape(boxes)
  if len(shape) not in (2, 3) or shape[-1] != 4:
    raise ValueError(
      "`boxes` must be [K, 4] (with `box_indices`) or [N, R, 4] (per image), as "
      f"(x1, y1, x2, y2); got shape {shape}."
    )
  boxes = jnp.asarray(boxes)
  if len(shape) == 3:
    if box_indices is not None:
      raise ValueError(
        f"`box_indices` must be None when `boxes` is per image [N, R, 4]; got boxes {shape} "
        f"and box_indices {np.shape(box_indices)}."
      )
    if shape[0] != num_images:
      raise ValueError(
        f"Per-image `boxes` [N, R, 4] must have N = features.shape[0] = {num_images}; got {shape}."
      )
    batch_shape = shape[:2]
    flat = boxes.reshape(-1, 4)
    index = jnp.repeat(jnp.arange(num_images, dtype=jnp.int32), shape[1])
  else:
    batch_shape = shape[:1]
    flat = boxes
    if box_indices is None:
      if num_images != 1:
        raise ValueError(
          f"`box_indices` [K] is required with flat `boxes` [K, 4] when N > 1; got boxes "
          f"{shape} and N = {num_images}."
        )
      index = jnp.zeros(shape[:1], jnp.int32)
    else:
      validation.check_box_indices(box_indices, shape[0], num_images)
      index = jnp.asarray(box_indices).astype(jnp.int32)
  flat = flat.astype(jnp.float32)
  valid = jnp.all(jnp.isfinite(flat), axis=-1) & (index >= 0) & (index < num_images)
  flat = jnp.where(valid[:, None], flat, 0.0)
  index = jnp.clip(index, 0, num_images - 1)
  return FlatBoxes(flat, index, valid, batch_shape)


def scale_coords(coords: jax.Array, spatial_scale: float) -> jax.Array:
  """``coords * spatial_scale`` in float32 (one IEEE multiply, as the C kernels do)."""
  return coords * jnp.float32(spatial_scale)


def round_half_away(x: jax.Array) -> jax.Array:
  """C ``round``: nearest integer, halves away from zero (``jnp.round`` rounds half to even)."""
  return lax.round(x, lax.RoundingMethod.AWAY_FROM_ZERO)


def to_int(x: jax.Array) -> jax.Array:
  """Float cells to int32, after clamping to ``+-COORD_LIMIT`` (no overflow, no UB)."""
  return jnp.clip(x, -COORD_LIMIT, COORD_LIMIT).astype(jnp.int32)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def exact_div(x: jax.Array, divisor: int) -> jax.Array:
  """Correctly rounded IEEE float32 ``x / divisor`` for a static positive int ``divisor``.

  The C kernels compute bin sizes as ``float(roi) / pooled``; their bin edges
  (``floor``/``ceil`` of multiples of it) flip when the quotient is one ulp
  off. XLA does not promise a correctly rounded division (it rewrites division
  by a constant into a reciprocal multiply, and vectorized CPU division is
  approximate), so the quotient is built here with integer long division on
  the 24-bit significand, rounded to nearest-even, and reassembled bit-exactly.

  Args:
    x: float32 array; finite non-negative values (negative ones keep their sign).
    divisor: Python int in ``[1, 2**22]``.

  Returns:
    float32 array, ``x / divisor`` rounded as IEEE-754 would. Its derivative
    is ``1 / divisor`` (a ``custom_jvp``: the bit manipulation has none).
  """
  if not 1 <= divisor <= 2**22:
    raise ValueError(f"divisor must be in [1, 2**22]; got {divisor}.")
  x = jnp.asarray(x, jnp.float32)
  bits = lax.bitcast_convert_type(x, jnp.int32)
  sign = bits & jnp.int32(-(2**31))
  biased = (bits >> 23) & 0xFF
  significand = (bits & 0x7FFFFF) | 0x800000  # in [2**23, 2**24) for normal x
  # Quotient significand / divisor lies in [2**k, 2**(k+1)) for k = shift or shift - 1.
  shift = 23 - (divisor.bit_length() - 1)
  big = significand >= (divisor << shift)
  k = jnp.where(big, shift, shift - 1)
  denominator = jnp.left_shift(jnp.int32(divisor), k)
  remainder = significand - denominator  # leading quotient bit is 1
  quotient = jnp.ones_like(significand)
  for _ in range(23):
    remainder = remainder * 2
    bit = remainder >= denominator
    remainder = jnp.where(bit, remainder - denominator, remainder)
    quotient = quotient * 2 + bit.astype(jnp.int32)
  remainder = remainder * 2
  guard = remainder >= denominator
  sticky = jnp.where(guard, remainder - denominator, remainder) > 0
  quotient = quotient + (guard & (sticky | ((quotient & 1) == 1))).astype(jnp.int32)
  carry = quotient >> 24  # rounding up to 2**24 bumps the exponent
  exponent = biased + k - 23 + carry
  out_bits = sign | (exponent << 23) | ((quotient >> carry) & 0x7FFFFF)
  out = lax.bitcast_convert_type(out_bits, jnp.float32)
  # Zeros, subnormals (never produced by box geometry) and inf/nan pass through x / d.
  regular = (biased > 0) & (biased < 255) & (exponent > 0)
  return jnp.where(regular, out, jnp.where(biased == 255, x, jnp.zeros_like(x)))


@exact_div.defjvp
def _exact_div_jvp(divisor, primals, tangents):
  (x,), (dx,) = primals, tangents
  return exact_div(x, divisor), jnp.asarray(dx, jnp.float32) / jnp.float32(divisor)
