"""``bezier_align``: RoIAlign over a region bounded by two cubic Bezier curves (ABCNet)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import roi_align as roi_align_lib
from roipool_jax._src import sampling, scaffold, validation

# Numbers per Bezier box: 8 control points (x, y).
COORDS = 16
# Control points of the bottom curve, left to right: the box stores them right to left.
_BOTTOM = (7, 6, 5, 4)


def bezier_align(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  sampling_ratio: int = 0,
  aligned: bool = True,
  box_indices: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""BezierAlign (ABCNet; mmcv ``BezierAlign``): RoIAlign along a curved text region.

  Each box is 8 control points ``(x, y)`` in input-image pixels: ``p0..p3``, the
  top cubic Bezier curve from left to right, then ``q0..q3``, the bottom curve
  from *right to left* (so the 8 points go round the region, mmcv's and
  AdelaiDet's order). Bin ``(i, j)`` of an ``oh x ow`` output sits at a
  point of the region, and averages a small axis-aligned grid of bilinear
  samples around it. In the compute dtype, with ``s = spatial_scale``::

      offset = 0.5 if aligned else 0
      B(c0, c1, c2, c3, t) = (1-t)^3 c0 + 3 t (1-t)^2 c1 + 3 t^2 (1-t) c2 + t^3 c3
      u = j / ow        v = i / oh                     # bin (i, j); not bin centres
      top = B(p0, p1, p2, p3, u) * s    bottom = B(q3, q2, q1, q0, u) * s
      centre = bottom * v + top * (1 - v) - offset     # (x, y) on the map
      roi_w = max(|p0.x - p3.x|, |q3.x - q0.x|) * s    # roi_h alike with y
      (not aligned: roi_w = max(roi_w, 1), roi_h = max(roi_h, 1))
      bin_h = roi_h / oh     bin_w = roi_w / ow          # correctly rounded
      g_h = sampling_ratio if sampling_ratio > 0 else ceil(bin_h)   (g_w alike)
      sample (a, b):  y = (centre.y - bin_h / 2) + ((a + 0.5) * bin_h) / g_h
                      x = (centre.x - bin_w / 2) + ((b + 0.5) * bin_w) / g_w

  Each sample is bilinearly interpolated with ``roi_align``'s rule (0 outside
  ``[-1, H] x [-1, W]``, clamped at the last row and column) and a bin outputs
  the sum of its samples divided by ``max(g_h * g_w, 1)``. (mmcv evaluates the
  curves and centres in double precision for float32 maps; here they are
  float32, which moves a sample by an ulp of its coordinate.)

  Degenerate boxes: a box with a non-finite number, or (under ``jit``) an
  out-of-range ``box_indices`` entry, gives zeros; with ``aligned=True`` a box
  of zero width (or height) has no adaptive sample and gives zeros too. No box
  affects another.

  Gradients (the tap-sum kernel's hand-written ``custom_vjp``, and autodiff of
  the sample positions):

  * features: each sample sends ``cotangent * weight / max(g_h * g_w, 1)`` to
    its four neighbour cells, accumulated in the compute dtype in a fixed order
    (bitwise reproducible on CPU), as mmcv's;
  * boxes: the exact derivative of the sample positions with respect to the 16
    coordinates, with the integer grid held constant; zero for degenerate
    boxes. mmcv gives no box gradient.

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Cost: every bin is a one-bin RoIAlign (two taps per sample and axis; with
  adaptive grids, merged per cell), so nothing of size ``K * H * W * C`` is
  built.

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 16]`` (with ``box_indices``) or ``[N, R, 16]`` (per image)
      control points ``(p0.x, p0.y, ..., p3.x, p3.y, q0.x, q0.y, ..., q3.x,
      q3.y)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    sampling_ratio: static samples per bin along each axis; ``<= 0`` means
      adaptive, ``ceil(bin size)`` per box and axis (mmcv's default 0).
    aligned: static; the half-pixel offset (mmcv's default ``True``).
    box_indices: ``[K]`` integer image index of each box for ``[K, 16]``
      boxes; may be omitted when ``N == 1``. Must be None for ``[N, R, 16]``.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes)
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes`` (mmcv's
      ``[K, 17]`` rois are named as such), a non-positive ``output_size`` or
      ``spatial_scale``, or ``box_indices`` of the wrong length or (when
      concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import bezier_align
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)   # x[0, h, w, 0] = 4 h + w
    >>> # straight "curves": the top edge y = 0 and the bottom edge y = 2, x in [0, 2]
    >>> box = jnp.array([[0.0, 0, 2 / 3, 0, 4 / 3, 0, 2, 0,  2, 2, 4 / 3, 2, 2 / 3, 2, 0, 2]])
    >>> # one sample per bin, at (u, v) = (j / 2, i / 2) of the region: cells (0, 0) to (1, 1)
    >>> bezier_align(x, box, 2, sampling_ratio=1, aligned=False)[0, :, :, 0]
    Array([[0., 1.],
           [4., 5.]], dtype=float32)

  References:
    Liu et al., "ABCNet: Real-time Scene Text Spotting with Adaptive Bezier-Curve
    Network", CVPR 2020. https://arxiv.org/abs/2002.10200
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  aligned = validation.check_bool("aligned", aligned)
  options = dict(size=size, scale=scale, ratio=ratio, aligned=aligned)
  return scaffold.run(
    _bezier_align, jnp.asarray(features), boxes, box_indices, size, coords=COORDS, **options
  )


def _bernstein(n: int) -> np.ndarray:
  """``[n, 4]`` cubic Bernstein weights at ``t = j / n`` (``j / n`` rounded to float32)."""
  t = (np.arange(n, dtype=np.float32) / np.float32(n)).astype(np.float64)[:, None]
  k = np.arange(4)
  return np.array([1, 3, 3, 1]) * t**k * (1 - t) ** (3 - k)


def _curve(points: jax.Array, n: int) -> jax.Array:
  """``[K, n, 2]``: the cubic Bezier curves of ``[K, 4, 2]`` control points at ``j / n``."""
  weights = jnp.asarray(_bernstein(n), points.dtype)[None, :, :, None]  # [1, n, 4, 1]
  terms = weights * points[:, None]  # [K, n, 4, 2]
  return ((terms[:, :, 0] + terms[:, :, 1]) + terms[:, :, 2]) + terms[:, :, 3]


def bezier_bin_axes(flat, size, scale, ratio, aligned):
  """``(rows, cols)``: one :class:`sampling.Axis` per bin, ``[K * oh * ow]`` (each a 1-bin box)."""
  (oh, ow), boxes = size, flat.boxes
  k, dtype = boxes.shape[0], boxes.dtype
  points = boxes_lib.scale_coords(boxes, scale).reshape(k, 8, 2)
  limit = boxes_lib.COORD_LIMIT  # far off the map, and finite
  points = jnp.clip(points, -limit, limit)
  top, bottom = points[:, :4], points[:, _BOTTOM, :]
  v = jnp.asarray(np.arange(oh, dtype=np.float32) / np.float32(oh), dtype)[None, :, None, None]
  offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
  centre = _curve(bottom, ow)[:, None] * v + _curve(top, ow)[:, None] * (1 - v) - offset
  extent = jnp.maximum(jnp.abs(top[:, 0] - top[:, 3]), jnp.abs(bottom[:, 0] - bottom[:, 3]))
  if not aligned:
    extent = jnp.maximum(extent, 1.0)
  if oh == ow:  # [K, 2]: (bin_w, bin_h); one division to compile
    bins = boxes_lib.exact_div(extent, ow)
  else:
    bins = jnp.stack(
      [boxes_lib.exact_div(extent[:, 0], ow), boxes_lib.exact_div(extent[:, 1], oh)], 1
    )
  if ratio > 0:
    grid = jnp.full((k, 2), ratio, jnp.int32)
  else:
    grid = boxes_lib.to_int(jnp.ceil(bins))
  grid = jnp.where(flat.valid[:, None], grid, 0)
  start = centre - bins[:, None, None] / 2  # [K, oh, ow, 2]
  tile = lambda x: jnp.broadcast_to(x[:, None], (k, oh * ow)).reshape(-1)  # noqa: E731

  def axis(d):
    return sampling.Axis(
      *boxes_lib.materialize((start[..., d].reshape(-1), tile(bins[:, d]), tile(grid[:, d])))
    )

  return axis(1), axis(0)


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "ratio", "aligned"))
def _bezier_align(features, flat, *, size, scale, ratio, aligned):
  rows, cols = bezier_bin_axes(flat, size, scale, ratio, aligned)
  return roi_align_lib.average_per_bin(features, rows, cols, flat.image_index, size, ratio)
