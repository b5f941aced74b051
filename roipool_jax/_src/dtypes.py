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
  tables) for floating tables; integer tables (bit patterns, :func:`order_keys`) as they are."""
  if not jnp.issubdtype(table_dtype, jnp.floating):
    return np.dtype(table_dtype)
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
  The rows come back in :func:`row_dtype`; integer tables are not converted.

  XLA:CPU has no bfloat16 gather of its own: it rewrites one as a float32
  gather from a float32 copy of the whole table (inside a loop, that copy is
  hoisted out and made once), even when the gathered rows are bit-cast
  right after. A bit-cast of the whole table is not free either: a loop that
  reads it gets a uint16 copy, one pass over the table (the map, or an
  output cotangent read chunk by chunk). Gathering bfloat16 rows directly
  was measured 1.6-1.7x the forward time of adaptive ``roi_align`` on large
  boxes (2-core AMD EPYC).
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
  """Inverse of :func:`narrow_bits`: uint16 bit patterns become ``dtype`` when it is a
  16-bit float (bfloat16 or float16); other arrays pass unchanged."""
  if x.dtype == jnp.uint16 and is_half(dtype):
    return lax.bitcast_convert_type(x, dtype)
  return x


# The bits of +inf: a 16-bit pattern with a larger magnitude than this is a NaN.
_INF_BITS = {np.dtype(jnp.bfloat16): 0x7F80, np.dtype(jnp.float16): 0x7C00}


def is_half(dtype) -> bool:
  """Whether ``dtype`` is a 16-bit float (bfloat16 or float16)."""
  return np.dtype(dtype) in _INF_BITS


def order_keys(bits: jax.Array, dtype) -> jax.Array:
  """uint16 keys of 16-bit floats (given as their bit patterns) that sort as the values do.

  A non-negative value's key is its pattern with the sign bit set, a negative
  value's the complement of its pattern, so that a larger value has a larger
  unsigned key: a maximum of keys is the key of the maximum, and equal keys
  are equal values. -0 gets +0's key (``0x8000``) and every NaN the largest
  key, ``0xFFFF``, so that NaN wins a maximum as XLA's ``max`` propagates it.
  No value has key 0 (``-inf``'s is ``0x7F`` or ``0x3FF``).

  Without native 16-bit float arithmetic, XLA:CPU compares 16-bit floats by
  converting each to float32 first; uint16 keys compare directly, 16 to an
  AVX2 instruction.

  Args:
    bits: uint16 bit patterns of ``dtype`` values, any shape.
    dtype: bfloat16 or float16.
  """
  key = jnp.where(bits > 0x8000, ~bits, bits | 0x8000)
  return jnp.where((bits & 0x7FFF) > _INF_BITS[np.dtype(dtype)], jnp.uint16(0xFFFF), key)


def key_bits(key: jax.Array) -> jax.Array:
  """The bit patterns of :func:`order_keys`' keys (a zero comes back +0, a NaN as ``0x7FFF``)."""
  return jnp.where(key >= 0x8000, key & 0x7FFF, ~key)


def to_bits(x: jax.Array) -> jax.Array:
  """The uint16 bit patterns of a 16-bit float array (uint16 arrays pass unchanged)."""
  return x if x.dtype == jnp.uint16 else lax.bitcast_convert_type(x, jnp.uint16)


def as_bits(rows: jax.Array, dtype) -> jax.Array:
  """The uint16 bit patterns of 16-bit ``dtype`` values as :func:`gather_rows` returns
  them: bit patterns (a bfloat16 result written by :func:`narrow_bits`) pass unchanged,
  float16 rows widened to float32 are narrowed back first (exact)."""
  return to_bits(rows if rows.dtype == jnp.uint16 else rows.astype(dtype))


def carry_bits(bits: jax.Array, dtype) -> jax.Array:
  """16-bit results given as bit patterns, in the form :func:`narrow_bits` writes them:
  bfloat16 as the bits, float16 as float16 (which XLA:CPU stores as fast as integers; a
  conversion of the whole result at the end would be a pass of its own)."""
  return lax.bitcast_convert_type(bits, dtype) if np.dtype(dtype) == np.float16 else bits


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
