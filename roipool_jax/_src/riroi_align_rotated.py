"""``riroi_align_rotated``: rotation-invariant RoIAlign (ReDet; mmcv ``RiRoIAlignRotated``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import dtypes, rotated, scaffold, validation
from roipool_jax._src.roi_align_rotated import rotated_geometry


def riroi_align_rotated(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  num_orientations: int = 8,
  spatial_scale: float = 1.0,
  sampling_ratio: int = 0,
  clockwise: bool = False,
  box_indices: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Rotation-invariant RoIAlign: rotated sampling, then orientation channels aligned to the box.

  For rotation-equivariant features (ReDet), whose ``C = C_g * O`` channels
  are ``C_g`` groups of ``O = num_orientations`` orientation channels
  (channel ``g * O + o`` is orientation ``o`` of group ``g``, with
  orientation ``o`` at ``o * 360 / O`` degrees). Each box is sampled as by
  :func:`roipool_jax.roi_align_rotated` with ``aligned=False`` (mmcv's
  kernel), giving ``A[k, i, j, g * O + o]``; then each group's orientations
  are turned by the box's angle, so that orientation 0 of the output is the
  box's own direction. In the compute dtype::

      u = angle * O / 360                  # angle in degrees, as in roi_align_rotated
      m = floor(u)    f = u - m            # 0 <= f < 1
      s = m mod O                          # in [0, O)
      out[k, i, j, g * O + o] = (1 - f) * A[k, i, j, g * O + (o - s) mod O]
                                    + f * A[k, i, j, g * O + (o - s + 1) mod O]

  As in mmcv's kernel, the mix jumps where ``u`` crosses a whole number
  ``m``: just below it, output orientation ``o`` is nearly ``A[..., g * O +
  (o - m + 2) mod O]``; from ``m`` on, it is ``A[..., g * O + (o - m) mod
  O]``. So the output is discontinuous in the angle at multiples of ``360 /
  O`` degrees (finite-difference gradient checks need angles away from them).

  ``u`` uses the angle as given: ``clockwise=True`` turns the sampling grid
  the other way (as in ``roi_align_rotated``) but not the orientation
  index, as mmcv's kernel does. mmcv's angles are in radians: multiply them
  by ``180 / pi``.

  The sampling, per axis (y shown), with ``s = spatial_scale``: centre
  ``cy * s``, size ``h' = max(h * s, 1)``, ``oh`` bins of ``h' / oh``, and
  ``g_h = sampling_ratio`` samples per bin, or ``ceil(h' / oh)`` when
  ``sampling_ratio <= 0`` (mmcv's default 0); samples are bilinear with
  ``roi_align``'s rule and each bin averages its ``g_h * g_w`` samples. See
  :func:`roipool_jax.roi_align_rotated` for the exact formulas.

  mmcv mixes the two orientations at every sample and then averages;
  averaging first and mixing after is the same linear map, rounded
  differently (float32 results agree to a few ulps). For 16-bit maps the
  averages are rounded to the map's dtype before the mix.

  Degenerate boxes: zero-size and inverted boxes are sampled as 1 cell
  wide, as in mmcv. Boxes with a non-finite number, or (under ``jit``) an
  out-of-range ``box_indices`` entry, give zeros. No box affects another.

  Gradients: features as ``roi_align_rotated``'s (hand-written
  ``custom_vjp``), each bin's cotangent first split between the two
  orientations by ``(1 - f, f)``; boxes: the exact derivative through the
  sample positions and through ``f`` (so the angle gets
  ``O / 360 * (A[(o - s + 1) mod O] - A[(o - s) mod O])`` per output on top
  of the positions' share; ``m`` is piecewise constant). mmcv returns no box
  gradient.

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Cost: one ``roi_align_rotated`` pass (nothing of size ``K * H * W * C``)
  plus two gathers along the orientation axis of the ``[K, oh, ow, C]``
  output and a blend, to turn its orientations (their transposes are gathers
  too). For 16-bit maps the blend is written in float32 and rounded in a
  pass of its own, which XLA:CPU runs faster than one kernel doing both, and
  the backward rolls the 16-bit cotangent before widening it.

  Args:
    features: ``[N, H, W, C_g * O]`` floating feature map, orientation
      channels innermost.
    boxes: ``[K, 5]`` (with ``box_indices``) or ``[N, R, 5]`` (per image)
      rotated boxes ``(cx, cy, w, h, angle_degrees)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    num_orientations: static ``O``, the orientation channels per group.
    spatial_scale: static feature cells per image pixel.
    sampling_ratio: static samples per bin along each axis; ``<= 0`` means
      adaptive, ``ceil(size / output_size)`` per box and axis.
    clockwise: static; the sampling grid turns clockwise (mmcv's option).
    box_indices: ``[K]`` integer image index of each box for ``[K, 5]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 5]`` boxes.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes)
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes``, a
      non-positive ``output_size``, ``spatial_scale`` or ``num_orientations``,
      ``C`` not a multiple of ``num_orientations``, or ``box_indices`` of the
      wrong length or (when concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import riroi_align_rotated
    >>> x = jnp.broadcast_to(jnp.arange(4.0), (1, 3, 3, 4))  # orientation o holds o
    >>> box = jnp.array([[1.0, 1.0, 2.0, 2.0, 90.0]])  # a quarter turn: s = 1
    >>> riroi_align_rotated(x, box, 1, num_orientations=4)[0, 0, 0]
    Array([3., 0., 1., 2.], dtype=float32)

  References:
    Han et al., "ReDet: A Rotation-equivariant Detector for Aerial Object
    Detection", CVPR 2021. https://arxiv.org/abs/2103.07733
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  orientations = validation.check_int("num_orientations", num_orientations)
  if orientations < 1:
    raise ValueError(f"`num_orientations` must be positive; got {num_orientations!r}.")
  channels = np.shape(features)[-1]
  if channels % orientations:
    raise ValueError(
      f"`features` channels C must be a multiple of `num_orientations` = {orientations} "
      f"(C = C_g * O); got features {np.shape(features)}."
    )
  scale = validation.check_spatial_scale(spatial_scale)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  clockwise = validation.check_bool("clockwise", clockwise)
  options = dict(
    size=size, scale=scale, ratio=ratio, clockwise=clockwise, orientations=orientations
  )
  return scaffold.run(
    _riroi_align_rotated, jnp.asarray(features), boxes, box_indices, size, coords=5, **options
  )


def turn_orientations(pooled: jax.Array, angle: jax.Array, valid: jax.Array) -> jax.Array:
  """``riroi_align_rotated``'s mix of ``[K, oh, ow, G, O]`` averages by each box's angle.

  ``out[..., o] = (1 - f) * pooled[..., (o - s) mod O] + f * pooled[..., (o - s + 1) mod O]``,
  the formula itself, from two gathers along the orientation axis. Invalid
  boxes get ``s = f = 0``, so their zero averages stay zero and a NaN angle
  reaches nothing. 16-bit averages are blended in float32 and rounded back
  to their dtype.
  """
  orientations = pooled.shape[-1]
  u = jnp.where(valid, angle, 0) * jnp.asarray(orientations / 360, angle.dtype)
  m = jnp.floor(u)
  s = jnp.mod(m, orientations).astype(jnp.int32)  # fmod of a whole number: exact
  f = (u - m).reshape(-1, 1, 1, 1, 1)
  if pooled.dtype.itemsize == 2:  # 16-bit averages; the angle is float32
    return _turn_16_bit(pooled, f, s)
  return _turn(pooled, f, s)


def _roll(x: jax.Array, shift: jax.Array) -> jax.Array:
  """``x[..., (o - shift) mod O]`` along the last axis, ``shift`` ``[K]`` per box (a gather)."""
  orientations = x.shape[-1]
  source = (jnp.arange(orientations, dtype=jnp.int32)[None] - shift[:, None]) % orientations
  return jnp.take_along_axis(x, source[:, None, None, None, :], -1, mode="promise_in_bounds")


@jax.custom_vjp
def _turn(pooled, f, s):
  return (1 - f) * _roll(pooled, s) + f * _roll(pooled, s - 1)


def _turn_fwd(pooled, f, s):
  return _turn(pooled, f, s), (pooled, f, s)


def _turn_grads(values, f, s, cot, wide=lambda x: x):
  """Gradients of ``_turn`` for ``pooled`` and ``f``; ``wide`` reads the (rolled) cotangent."""
  # Each roll is a permutation per box: its transpose is the inverse roll, another gather
  # (autodiff would scatter-add into zeros, several times slower on XLA:CPU).
  grad_pooled = (1 - f) * wide(_roll(cot, -s)) + f * wide(_roll(cot, 1 - s))
  difference = _roll(values, s - 1) - _roll(values, s)
  grad_f = jnp.sum(wide(cot) * difference, axis=(1, 2, 3, 4), keepdims=True)
  return grad_pooled, grad_f


def _turn_bwd(residuals, cotangent):
  pooled, f, s = residuals
  return (*_turn_grads(pooled, f, s, cotangent), None)


_turn.defvjp(_turn_fwd, _turn_bwd)


@jax.custom_vjp
def _turn_16_bit(pooled, f, s):
  """``_turn`` of 16-bit averages: blended in float32, rounded back to their dtype."""
  turned = _turn(pooled.astype(jnp.float32), f, s)
  # The blend fills a float32 buffer of its own (as [K, oh, ow, C]: a 5-D one got the gathers'
  # orientation-major layout and a copy), rounded in a second pass. Fused with the rounding,
  # XLA:CPU laid the gathers out orientation-major and transposed inside the kernel
  # (bfloat16 ReDet config: that kernel 14 ms; now 7 + 1).
  turned = boxes_lib.materialize(turned.reshape(turned.shape[:3] + (-1,)), s)
  return dtypes.narrow(turned, pooled.dtype).reshape(pooled.shape)


def _turn_16_bit_fwd(pooled, f, s):
  return _turn_16_bit(pooled, f, s), (pooled, f, s)


def _turn_16_bit_bwd(residuals, cotangent):
  # The 16-bit cotangent (bfloat16 as its bits) is rolled as it is and widened inside the
  # blend's kernel. Widened first, as autodiff's transpose of a conversion does, it cost a
  # pass writing a float32 copy (bfloat16 ReDet config: 6 ms).
  pooled, f, s = residuals
  bits = cotangent.dtype == jnp.bfloat16
  cot = lax.bitcast_convert_type(cotangent, jnp.uint16) if bits else cotangent
  wide = lambda x: dtypes.widen_bits(x) if bits else x.astype(jnp.float32)  # noqa: E731
  grad_pooled, grad_f = _turn_grads(pooled.astype(jnp.float32), f, s, cot, wide)
  return grad_pooled.astype(pooled.dtype), grad_f, None


_turn_16_bit.defvjp(_turn_16_bit_fwd, _turn_16_bit_bwd)


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "ratio", "clockwise", "orientations"))
def _riroi_align_rotated(features, flat, *, size, scale, ratio, clockwise, orientations):
  geometry = rotated_geometry(flat, features.shape, size, scale, ratio, False, clockwise)
  table = features.reshape(-1, features.shape[3])
  pooled = rotated.rotated_sum(
    table, geometry.floats, geometry.grid, geometry.origin, size, features.shape[1:3]
  )
  k, oh, ow, c = pooled.shape
  if orientations == 1:  # nothing to turn
    return pooled
  groups = pooled.reshape(k, oh, ow, c // orientations, orientations)
  return turn_orientations(groups, flat.boxes[:, 4], flat.valid).reshape(k, oh, ow, c)
