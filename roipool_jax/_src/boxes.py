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
  """Boxes in flat form, ready for an op's kernel (arrays only).

  Attributes:
    boxes: ``[K, 4]`` ``(x1, y1, x2, y2)`` in image pixels, in the compute
      dtype (:mod:`roipool_jax._src.dtypes`); invalid boxes have their
      coordinates replaced by zeros.
    image_index: ``[K]`` int32 image of each box, clipped into ``[0, N)``.
    valid: ``[K]`` bool, False for boxes that must produce zeros.
  """

  boxes: jax.Array
  image_index: jax.Array
  valid: jax.Array


class BoxArgs(NamedTuple):
  """Validated boxes, not yet flat: what :func:`flat_arrays` takes.

  Attributes:
    boxes: ``[K, 4]`` or ``[N, R, 4]`` boxes, as given (or padded, flat).
    box_indices: ``[K]`` image indices, or None.
    batch_shape: leading output dims of the call, ``(K,)`` or ``(N, R)``.
  """

  boxes: jax.typing.ArrayLike
  box_indices: jax.typing.ArrayLike | None
  batch_shape: tuple[int, ...]


def prepare_boxes(
  boxes: jax.typing.ArrayLike,
  box_indices: jax.typing.ArrayLike | None,
  num_images: int,
  pad: bool = False,
  coords: int = 4,
) -> BoxArgs:
  """Validates either box form (at trace time; nothing is computed).

  Args:
    boxes: ``[K, 4]`` or ``[N, R, 4]`` box corners in image pixels.
    box_indices: ``[K]`` integer image index per box for the flat form, or
      None (allowed for the flat form only when ``num_images == 1``, or when
      there are no boxes).
    num_images: N, the batch size of the features.
    pad: for concrete (not traced) boxes only: the boxes become flat
      ``[bucket(K), coords]`` with NaN (invalid) boxes appended, built on the host,
      so that calls with nearby K share one compiled kernel (:func:`bucket`).
      ``batch_shape`` still names the boxes given.
    coords: numbers per box: 4 ``(x1, y1, x2, y2)``, or 5 for rotated boxes.

  Raises:
    ValueError: on a wrong rank or last dimension, a per-image form whose
      leading dim is not N, or ``box_indices`` of the wrong shape or range.
    TypeError: on non-numeric boxes or non-integer ``box_indices``.
  """
  validation.check_boxes(boxes, coords)
  shape = np.shape(boxes)
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
  elif box_indices is None:
    if num_images != 1 and shape[0]:
      raise ValueError(
        f"`box_indices` [K] is required with flat `boxes` [K, 4] unless N == 1; got boxes "
        f"{shape} and N = {num_images}."
      )
  else:
    validation.check_box_indices(box_indices, shape[0], num_images)
  k = int(np.prod(shape[:-1]))
  pad_to = bucket(k) if pad and k else k
  if pad_to > k or (pad and len(shape) == 3):  # eager: always flat, so a bucket is one program
    index = np.zeros((pad_to,), np.int32)
    if box_indices is not None:
      index[:k] = np.asarray(box_indices)
    elif len(shape) == 3:
      index[:k] = np.repeat(np.arange(num_images, dtype=np.int32), shape[1])
    padded = np.full((pad_to, coords), np.nan, np.asarray(boxes).dtype)
    padded[:k] = np.asarray(boxes).reshape(k, coords)
    boxes, box_indices = padded, index
  to_array = lambda x: x if x is None else to_device(x)  # noqa: E731
  return BoxArgs(to_array(boxes), to_array(box_indices), shape[:-1])


def flatten_boxes(
  boxes: jax.typing.ArrayLike,
  box_indices: jax.typing.ArrayLike | None,
  num_images: int,
  dtype=np.float32,
) -> FlatBoxes:
  """Validates either box form and returns it flat (:func:`prepare_boxes`, then
  :func:`flat_arrays`); ``dtype`` is the compute dtype of the coordinates."""
  args = prepare_boxes(boxes, box_indices, num_images)
  return _flat_arrays(args.boxes, args.box_indices, num_images=num_images, dtype=np.dtype(dtype))


def to_device(x: jax.typing.ArrayLike) -> jax.Array:
  """``x`` as a jax Array without compiling anything (``jnp.asarray`` of host data
  compiles a small program per shape; ``device_put`` only copies)."""
  if isinstance(x, jax.Array):
    return x
  x = np.asarray(x)
  return jax.device_put(x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False))


def unpad(out: jax.Array, batch_shape: tuple[int, ...]) -> jax.Array:
  """``[K', ...]`` results of flat boxes (padded by :func:`prepare_boxes` in an eager call)
  as ``batch_shape + [...]``: the first ``prod(batch_shape)`` rows, reshaped. A concrete
  result is sliced and reshaped on the host on CPU, so no program is compiled per K."""
  k = int(np.prod(batch_shape))
  shape = tuple(batch_shape) + out.shape[1:]
  if out.shape == shape:
    return out
  if jax.default_backend() == "cpu" and validation.is_concrete(out):
    return to_device(np.asarray(out)[:k].reshape(shape))
  return out[:k].reshape(shape)


def bucket(k: int) -> int:
  """The padded box count of an eager call with ``k`` boxes: 8 or more, at most 25% more.

  ``k`` is rounded up to a multiple of ``2 ** (floor(log2 k) - 2)``: four
  sizes per octave (..., 64, 80, 96, 112, 128, 160, ...).
  """
  if k <= 8:
    return 8
  step = 2 ** (k.bit_length() - 3)
  return -(-k // step) * step


def flat_arrays(boxes, box_indices, *, num_images, dtype) -> FlatBoxes:
  """``[K, 4]`` (or ``[K, 5]``) boxes in ``dtype`` (zeros where invalid), ``[K]`` image index,
  ``[K]`` validity."""
  if boxes.ndim == 3:  # per image: box r of image n
    index = jnp.repeat(jnp.arange(num_images, dtype=jnp.int32), boxes.shape[1])
  elif box_indices is None:
    index = jnp.zeros(boxes.shape[:1], jnp.int32)
  else:
    index = box_indices.astype(jnp.int32)
  flat = boxes.reshape(-1, boxes.shape[-1]).astype(dtype)
  valid = jnp.all(jnp.isfinite(flat), axis=-1) & (index >= 0) & (index < num_images)
  flat = jnp.where(valid[:, None], flat, 0.0)
  return FlatBoxes(flat, jnp.clip(index, 0, max(num_images - 1, 0)), valid)


# One compiled computation for the array part (eager calls would dispatch every op).
_flat_arrays = jax.jit(flat_arrays, static_argnames=("num_images", "dtype"))


def materialize(tree, key: jax.Array | None = None):
  """``tree`` (a pytree of arrays) computed once, into buffers of its own.

  XLA fuses a cheap-looking producer into each of its consumers and
  recomputes it there. For box geometry (C rounding, :func:`exact_div`'s long
  division) broadcast to ``[K, P, T]`` taps, that costs the geometry once per
  tap element (measured: 3x slower ops on small maps); and two fused copies
  can round differently (FMA contraction), which breaks consumers that
  compare values. XLA:CPU drops ``optimization_barrier`` before fusion, but
  keeps a conditional as a fusion boundary.

  Both branches of that conditional return ``tree`` unchanged (the second
  through an ``optimization_barrier``, so that XLA does not fold two equal
  branches away), so the result is ``tree`` whichever runs. The predicate
  reads one element of the first non-empty leaf: data-dependent, and one scalar
  kernel. Each kernel costs compile time (measured: this form compiles two
  fewer kernels per call than a reduced predicate and a zeros branch, and
  the box geometry of an op makes dozens of calls).

  Args:
    tree: the arrays to compute once.
    key: an array for the predicate to read instead of ``tree``'s first
      leaf. XLA recomputes the element it reads from that leaf's producers
      inside the predicate's kernel: a leaf behind a long chain (the
      :func:`exact_div` long division) compiles that chain once more. A key
      that is already in a buffer (the op's boxes) costs nothing. An empty key
      falls back to the first non-empty leaf.
  """
  filled = [x for x in jax.tree.leaves(tree) if x.size]
  if not filled:  # nothing to compute
    return tree
  source = key if key is not None and key.size else filled[0]
  predicate = _always_true(source.ravel()[:1])
  return lax.cond(predicate, lambda t: t, lax.optimization_barrier, tree)


def _always_true(x: jax.Array) -> jax.Array:
  """A predicate that is true, computed from ``x`` so that XLA cannot fold it."""
  # min(|x|, 0) is 0, or NaN when x is: "not > 0" is true either way.
  return ~(jnp.min(jnp.abs(x).astype(jnp.float32), initial=0.0) > 0.0)


def computed_once(compute, data):
  """``compute()`` evaluated inside a conditional, a fusion boundary as in :func:`materialize`.

  For a large result (an op's whole output) this writes it straight into the
  conditional's result, where ``materialize(compute())`` would pass a
  finished buffer through the conditional and copy it (measured: the P2 mask
  head's forward 50 -> 90 ms). ``data``: an array the predicate reduces (a
  one-element slice of it was measured slower: the P2 box head 11 -> 15 ms).
  """
  shapes = jax.eval_shape(compute)
  zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
  return lax.cond(_always_true(jax.tree.leaves(data)[0]), compute, zeros)


def divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """IEEE ``numerator / denominator`` (correctly rounded), broadcasting.

  XLA rewrites a division by a broadcast operand into a multiplication by
  its reciprocal, which is off by one ulp in about a fifth of the cases
  (measured); a sample position one ulp off can cross a cell edge or the
  map's border, where C kernels' positions do not. Dividing by the
  denominator materialized at the result's shape keeps a true division.
  """
  shape = jnp.broadcast_shapes(numerator.shape, denominator.shape)
  return numerator / materialize(jnp.broadcast_to(denominator, shape))


def scale_coords(coords, spatial_scale):
  """``coords * spatial_scale`` in the dtype of ``coords``, each product rounded on its own.

  One IEEE multiply per coordinate, as the C kernels compute it with ``T
  spatial_scale``. ``coords`` is an array or a pytree of arrays (scaled in one
  :func:`materialize`). The products are materialized because XLA:CPU
  contracts a product feeding an add or subtract of the same fusion into one
  FMA, which skips the product's rounding: ``x2 * s - x1 * s`` then differs
  from the C kernels' in the last bit whenever ``s`` is not a power of two
  (``56 * s - 44 * s`` at ``s = 1/3`` in float32: 4.0 instead of 4.000001),
  enough to change RoIAlign's adaptive sample count ``ceil(roi / bins)``.
  """
  scaled = jax.tree.map(lambda c: c * jnp.asarray(spatial_scale, c.dtype), coords)
  return materialize(scaled)


def row_col_edges(boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(lo, hi)``, each ``[K, 2]``: a box's first and second edge per axis, rows then columns
  (``(y1, x1)`` and ``(y2, x2)`` of ``[K, 4]`` boxes ``(x1, y1, x2, y2)``), so that square
  outputs compute both axes' geometry as one array."""
  return boxes[:, 1::-1], boxes[:, 3:1:-1]


def round_half_away(x: jax.Array) -> jax.Array:
  """C ``round``: nearest integer, halves away from zero (``jnp.round`` rounds half to even)."""
  return lax.round(x, lax.RoundingMethod.AWAY_FROM_ZERO)


def to_int(x: jax.Array) -> jax.Array:
  """Float cells to int32, after clamping to ``+-COORD_LIMIT`` (no overflow, no UB)."""
  return jnp.clip(x, -COORD_LIMIT, COORD_LIMIT).astype(jnp.int32)


class _Format(NamedTuple):
  """Bit layout of an IEEE binary floating-point format."""

  int_dtype: type
  fraction_bits: int  # explicit significand bits
  exponent_mask: int  # all-ones biased exponent (inf / NaN)


_FORMATS = {
  np.dtype(np.float32): _Format(jnp.int32, 23, 0xFF),
  np.dtype(np.float64): _Format(jnp.int64, 52, 0x7FF),
}


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def exact_div(x: jax.Array, divisor: int) -> jax.Array:
  """Correctly rounded IEEE ``x / divisor`` for a static positive int ``divisor``.

  The C kernels compute bin sizes as ``T(roi) / pooled`` (``T`` float or
  double); their bin edges (``floor``/``ceil`` of multiples of it) flip when
  the quotient is one ulp off. XLA does not promise a correctly rounded
  division (it rewrites division by a constant into a reciprocal multiply,
  and vectorized CPU division is approximate, in float32 and float64 alike),
  so the quotient is built here in integers: the significand (24 bits for
  float32, 53 for float64), shifted left, divided by the constant ``divisor``
  in one to four steps of integer division (as many as the bits to produce
  need without overflowing int32 or int64), rounded to nearest, and
  reassembled bit-exactly.

  Args:
    x: float32 or float64 array; finite values (negative ones keep their sign).
    divisor: Python int in ``[1, 2**22]``.

  Returns:
    ``x / divisor`` in the dtype of ``x``, rounded as IEEE-754 would. Its
    derivative is ``1 / divisor`` (a ``custom_jvp``: the bit manipulation has
    none).
  """
  if not 1 <= divisor <= 2**22:
    raise ValueError(f"divisor must be in [1, 2**22]; got {divisor}.")
  return _long_division(jnp.asarray(x), divisor)


# One compiled computation (also for eager calls, which would dispatch every step).
@partial(jax.jit, static_argnums=(1,))
def _long_division(x: jax.Array, divisor: int) -> jax.Array:
  fmt = _FORMATS[np.dtype(x.dtype)]
  bits_t, frac = fmt.int_dtype, fmt.fraction_bits
  width = 8 * np.dtype(bits_t).itemsize
  bits = lax.bitcast_convert_type(x, bits_t)
  sign = bits & bits_t(-(2 ** (width - 1)))
  biased = (bits >> frac) & fmt.exponent_mask
  significand = (bits & (2**frac - 1)) | 2**frac  # in [2**frac, 2**(frac+1)) for normal x
  # n = floor(significand * 2**extra / divisor) has frac + 2 or frac + 3 bits (at least the
  # significand's frac + 1 and a guard bit), built by integer division by the constant divisor
  # in as few steps as the integer width allows: each step appends `step` bits of quotient to
  # n, from the remainder (< divisor) shifted left without overflow.
  extra = divisor.bit_length() + 1
  step_max = width - 2 - divisor.bit_length()
  d = bits_t(divisor)
  n, remainder = lax.div(significand, d), lax.rem(significand, d)
  left = extra
  while left:
    step = min(step_max, left)
    shifted = remainder << step
    n = (n << step) + lax.div(shifted, d)
    remainder = lax.rem(shifted, d)
    left -= step
  # Keep frac + 1 bits and round to nearest on the next (guard) bit. No quotient is a tie:
  # with divisor = 2**j * odd, an exact quotient is (significand / odd) * 2**-j, at most
  # frac + 1 bits, and a tie needs frac + 2. So the remainder never decides the rounding.
  drop = jnp.where(n >= 2 ** (frac + 2), 2, 1).astype(bits_t)
  quotient = (n >> drop) + ((n >> (drop - 1)) & 1)
  carry = quotient >> (frac + 1)  # rounding up to 2**(frac+1) bumps the exponent
  exponent = biased + drop - extra + carry
  out_bits = sign | (exponent << frac) | ((quotient >> carry) & (2**frac - 1))
  out = lax.bitcast_convert_type(out_bits, x.dtype)
  # Zeros, subnormals (never produced by box geometry) and inf/nan pass through x / d.
  regular = (biased > 0) & (biased < fmt.exponent_mask) & (exponent > 0)
  return jnp.where(regular, out, jnp.where(biased == fmt.exponent_mask, x, jnp.zeros_like(x)))


@exact_div.defjvp
def _exact_div_jvp(divisor, primals, tangents):
  (x,), (dx,) = primals, tangents
  out = exact_div(x, divisor)
  return out, jnp.asarray(dx, out.dtype) / divisor
