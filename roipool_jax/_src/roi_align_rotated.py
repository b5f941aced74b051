"""``roi_align_rotated``: RoIAlign on rotated boxes (detectron2 / mmcv ``RoIAlignRotated``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import rotated, scaffold, validation


def roi_align_rotated(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  sampling_ratio: int = -1,
  aligned: bool = True,
  clockwise: bool = False,
  box_indices: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""RoIAlign on rotated boxes: bilinear samples on a grid rotated about the box centre.

  Boxes are ``(cx, cy, w, h, angle)`` in input-image pixels, ``angle`` in
  degrees, counter-clockwise as drawn on an image whose y axis points down
  (detectron2's convention); ``clockwise=True`` flips its sign (mmcv's
  option). The defaults reproduce detectron2's ``ROIAlignRotated``;
  ``aligned`` and ``clockwise`` reproduce mmcv's ``RoIAlignRotated`` (whose
  angles are in radians: multiply them by ``180 / pi``). In the compute
  dtype, with ``s = spatial_scale``::

      offset = 0.5 if aligned else 0
      cy' = cy * s - offset      cx' = cx * s - offset
      h' = h * s                 w' = w * s          # not aligned: max(h', 1), max(w', 1)
      theta = angle * pi / 180   (negated if clockwise)
      bin_h = h' / oh            bin_w = w' / ow     # correctly rounded
      g_h = sampling_ratio if sampling_ratio > 0 else ceil(bin_h)   (g_w alike)
      sample (a, b) of bin (i, j), in box coordinates:
        yy = -h' / 2 + i * bin_h + (a + 0.5) * bin_h / g_h
        xx = -w' / 2 + j * bin_w + (b + 0.5) * bin_w / g_w
      on the map:
        y = yy * cos(theta) - xx * sin(theta) + cy'
        x = yy * sin(theta) + xx * cos(theta) + cx'

  Each sample is bilinearly interpolated with ``roi_align``'s rule (0
  outside ``[-1, H] x [-1, W]``, clamped at the last row and column) and a
  bin outputs the sum of its samples divided by ``max(g_h * g_w, 1)``. With
  ``angle = 0`` this is ``roi_align`` of the box ``(cx - w / 2, cy - h / 2,
  cx + w / 2, cy + h / 2)`` (with the same ``aligned``), to float rounding.

  Degenerate boxes: with ``aligned=True``, a negative ``w`` or ``h`` gives
  zeros (detectron2 and mmcv raise); a zero one has no adaptive sample and
  gives zeros. Boxes with a non-finite number, or (under ``jit``) an
  out-of-range ``box_indices`` entry, give zeros. No box affects another.

  Gradients (hand-written ``custom_vjp``):

  * features: each sample sends ``cotangent * weight / max(g_h * g_w, 1)`` to
    its four neighbour cells, accumulated in the compute dtype in a fixed
    order (bitwise reproducible on CPU);
  * boxes: the exact derivative with respect to ``cx, cy, w, h`` and the
    angle, through the sample positions, with the integer grid held constant
    (0 where a sample is clamped or dropped); zero for degenerate boxes.

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Cost: each bin visits only the samples that can land on the map (the
  window of its sample grid that the map's preimage bounds), four cells of
  ``C`` values per sample. A bin off the map costs nothing; a box much larger
  than the map costs about one sample per map cell it covers, not ``g_h *
  g_w`` per bin. Nothing of size ``K * H * W * C`` is built.

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 5]`` (with ``box_indices``) or ``[N, R, 5]`` (per image)
      rotated boxes ``(cx, cy, w, h, angle_degrees)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    sampling_ratio: static samples per bin along each axis; ``<= 0`` means
      adaptive, ``ceil(size / output_size)`` per box and axis.
    aligned: static; the half-pixel offset (detectron2 always applies it).
    clockwise: static; the angle turns clockwise (mmcv's option).
    box_indices: ``[K]`` integer image index of each box for ``[K, 5]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 5]`` boxes.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes)
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes`` (detectron2's
      ``[K, 6]`` rois are named as such), a non-positive ``output_size`` or
      ``spatial_scale``, or ``box_indices`` of the wrong length or (when
      concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import roi_align_rotated
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)   # x[0, h, w, 0] = 4 h + w
    >>> # the 2x2 box centred on the map, turned 90 degrees counter-clockwise:
    >>> # its top-left bin lands on the map's cell (2, 1)
    >>> box = jnp.array([[2.0, 2.0, 2.0, 2.0, 90.0]])
    >>> roi_align_rotated(x, box, 2)[0, :, :, 0]
    Array([[ 9.,  5.],
           [10.,  6.]], dtype=float32)

  References:
    Ma et al., "Arbitrary-Oriented Scene Text Detection via Rotation
    Proposals", IEEE TMM 2018. https://arxiv.org/abs/1703.01086
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  aligned = validation.check_bool("aligned", aligned)
  clockwise = validation.check_bool("clockwise", clockwise)
  options = dict(size=size, scale=scale, ratio=ratio, aligned=aligned, clockwise=clockwise)
  return scaffold.run(
    _roi_align_rotated, jnp.asarray(features), boxes, box_indices, size, coords=5, **options
  )


def rotated_geometry(flat, map_shape, size, scale, ratio, aligned, clockwise):
  """:class:`rotated.Geometry` of flat ``[K, 5]`` boxes (see ``roi_align_rotated``)."""
  boxes, image_index, valid = flat
  _, height, width, _ = map_shape
  oh, ow = size
  dtype = boxes.dtype
  offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
  cx, cy, w, h = boxes_lib.scale_coords(tuple(boxes[:, i] for i in range(4)), scale)
  cx, cy = cx - offset, cy - offset
  if aligned:
    valid = valid & (w >= 0) & (h >= 0)
  else:
    w, h = jnp.maximum(w, 1.0), jnp.maximum(h, 1.0)
  limit = boxes_lib.COORD_LIMIT
  w, h = jnp.clip(w, 0.0, limit), jnp.clip(h, 0.0, limit)
  cx, cy = jnp.clip(cx, -limit, limit), jnp.clip(cy, -limit, limit)
  theta = boxes[:, 4] * jnp.asarray(math.pi / 180, dtype)
  if clockwise:
    theta = -theta
  bin_h, bin_w = boxes_lib.exact_div(h, oh), boxes_lib.exact_div(w, ow)
  if ratio > 0:
    grid = jnp.full((boxes.shape[0], 2), ratio, jnp.int32)
  else:
    grid = jnp.stack([boxes_lib.to_int(jnp.ceil(bin_h)), boxes_lib.to_int(jnp.ceil(bin_w))], 1)
  grid = jnp.where(valid[:, None], grid, 0)
  floats = jnp.stack([cy, cx, jnp.cos(theta), jnp.sin(theta), -h / 2, -w / 2, bin_h, bin_w], axis=1)
  floats = jnp.where(valid[:, None], floats, 0.0)
  origin = image_index * (height * width)
  return rotated.Geometry(*boxes_lib.materialize((floats, grid, origin)))


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "ratio", "aligned", "clockwise"))
def _roi_align_rotated(features, flat, *, size, scale, ratio, aligned, clockwise):
  geometry = rotated_geometry(flat, features.shape, size, scale, ratio, aligned, clockwise)
  table = features.reshape(-1, features.shape[3])
  return rotated.rotated_sum(
    table, geometry.floats, geometry.grid, geometry.origin, size, features.shape[1:3]
  )
