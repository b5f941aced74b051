"""The dtype rule shared by every op.

* The *compute dtype* is float64 when the features are float64 (possible only
  with ``jax_enable_x64``), and float32 otherwise: float32 stays float32, and
  bfloat16/float16 features are accumulated in float32.
* Box geometry (scaled coordinates, bin sizes, sample positions, bilinear
  weights), every accumulation, and the backward pass run in the compute
  dtype. Boxes are cast to it first.
* Outputs and feature gradients have the dtype of the features; box gradients
  the dtype of the boxes.

So float64 inputs are computed in float64 end to end (``jax.test_util.check_grads``
and torch-style ``gradcheck`` work), and float32 results match the float32 C
kernels of torchvision bit for bit where their arithmetic is the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def compute_dtype(features_dtype) -> np.dtype:
  """float64 for float64 features, float32 for every other dtype (the module docstring)."""
  if jnp.dtype(features_dtype) == jnp.float64:
    return np.dtype(np.float64)
  return np.dtype(np.float32)


def row_dtype(table_dtype) -> np.dtype:
  """The dtype of the rows :func:`gather_rows` reads: the compute dtype (float32 for 16-bit
  tables)."""
  return compute_dtype(table_dtype)


def table_rows(table) -> int:
  """Rows of a table: ``M`` for ``[M, C]``, ``M * P`` for a lane table ``[M, C, P]``.

  A *lane table* ``[M, C, P]`` is read as the ``[M * P, C]`` table
  ``swapaxes(table, 1, 2)``: row ``r`` is ``table[r // P, :, r % P]``, ``C``
  values ``P`` apart. :func:`gather_rows` reads it in place, so the
  transpose is never materialized (XLA:CPU cannot fuse a transpose into a
  gather inside a loop: it copies the whole map on every call).
  """
  return table.shape[0] * (table.shape[2] if table.ndim == 3 else 1)


def _lane_index(table, flat: jax.Array) -> jax.Array:
  """``[R, 2]`` ``(r // P, r % P)`` start indices of lane-table rows ``flat``."""
  lanes = table.shape[2]
  return jnp.stack([flat // lanes, flat % lanes], axis=-1)


# Row r of a lane table [M, C, P]: the C values at (r // P, :, r % P).
_LANE_GATHER = lax.GatherDimensionNumbers(
  offset_dims=(1,), collapsed_slice_dims=(0, 2), start_index_map=(0, 2)
)


def _take_rows(table: jax.Array, flat: jax.Array) -> jax.Array:
  """``[R, C]`` rows ``flat`` ``[R]`` of an ``[M, C]`` or lane table, no bounds handling."""
  if table.ndim == 2:
    return table.at[flat].get(mode="promise_in_bounds")
  mode = lax.GatherScatterMode.PROMISE_IN_BOUNDS
  slice_sizes = (1, table.shape[1], 1)
  return lax.gather(table, _lane_index(table, flat), _LANE_GATHER, slice_sizes, mode=mode)


def gather_rows(table: jax.Array, cells: jax.Array) -> jax.Array:
  """``table[cells]``, ``cells.shape + (C,)``, as one gather indexed by a flat vector.

  ``table`` is ``[M, C]`` or a lane table ``[M, C, P]`` (:func:`table_rows`);
  ``cells`` must lie in ``[0, table_rows(table))``.

  XLA:CPU moves whole rows about twice as fast for a ``[M]`` index as for the
  same indices shaped ``[B, oh, ow]``. A bfloat16 table is read as its 16-bit
  patterns and widened to float32 by a shift (bfloat16 is float32's upper
  half, so this is exact): XLA:CPU gathers and converts bfloat16 element by
  element, 2x slower than float32, while the bits move as fast as any integer
  and a float32 copy of the whole map would cost a pass over fresh memory.
  float16 rows are converted after the gather (a vector instruction on x86).
  The rows come back in :func:`row_dtype`.
  """
  flat = cells.reshape(-1)
  if table.dtype == jnp.bfloat16:
    rows = widen_bits(_take_rows(lax.bitcast_convert_type(table, jnp.uint16), flat))
  else:
    rows = _take_rows(table, flat).astype(row_dtype(table.dtype))
  return rows.reshape(cells.shape + (table.shape[1],))


def widen_bits(bits: jax.Array) -> jax.Array:
  """The float32 values of bfloat16 bit patterns (uint16): a shift, exact."""
  return lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)


def narrow_bits(x: jax.Array, dtype) -> jax.Array:
  """:func:`narrow`, with bfloat16 results as their uint16 bit patterns (:func:`from_bits`).

  XLA:CPU scatters (and stores) 16-bit integers as fast as any integer but
  bfloat16 element by element: kernels that write their results chunk by chunk
  write the bits, and turn them into bfloat16 once at the end.
  """
  narrowed = narrow(x, dtype)
  if narrowed.dtype == jnp.bfloat16:
    return lax.bitcast_convert_type(narrowed, jnp.uint16)
  return narrowed


def from_bits(x: jax.Array, dtype) -> jax.Array:
  """Inverse of :func:`narrow_bits`."""
  if x.dtype == jnp.uint16 and jnp.dtype(dtype) == jnp.bfloat16:
    return lax.bitcast_convert_type(x, jnp.bfloat16)
  return x


def narrow(x: jax.Array, dtype) -> jax.Array:
  """``x.astype(dtype)``; float32 to bfloat16 by integer rounding (to nearest, ties to even,
  NaN stays NaN), which XLA:CPU runs vectorized where its own conversion does not.
  Differentiable as ``astype`` is."""
  if x.dtype != jnp.float32 or jnp.dtype(dtype) != jnp.bfloat16:
    return x.astype(dtype)
  return _round_to_bfloat16(x)


@jax.custom_jvp
def _round_to_bfloat16(x: jax.Array) -> jax.Array:
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
  rounded = jnp.where(jnp.isnan(x), (bits >> 16) | 0x40, rounded)
  return lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


@_round_to_bfloat16.defjvp
def _round_to_bfloat16_jvp(primals, tangents):
  # The bit manipulation has no derivative of its own: the conversion's is the identity.
  return _round_to_bfloat16(primals[0]), tangents[0].astype(jnp.bfloat16)
