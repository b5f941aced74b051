"""``crop_and_resize``: one interpolated sample per output cell (``tf.image.crop_and_resize``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from roipool_jax._src import backends, sampling, scaffold, validation
from roipool_jax._src import boxes as boxes_lib

BOX_FORMATS = ("xyxy", "tf")
METHODS = ("bilinear", "nearest")


def _pixel_positions(lo, hi, valid, num, spatial_scale, aligned):
  """Bin centres of a pixel box along one axis: RoIAlign's one-sample grid, flips allowed."""
  axis = sampling.axis_geometry(lo, hi, valid, num, spatial_scale, 1, aligned, flip=True)
  bins = jnp.arange(num, dtype=jnp.int32)[None, :, None]
  return sampling.sample_position(axis, bins, jnp.zeros((1, 1, 1), jnp.int32))[:, :, 0]


def _tf_positions(lo, hi, num, length):
  """TensorFlow's corner-aligned points along one axis, for normalized coordinates."""
  extent = length - 1
  if num == 1:
    return (0.5 * (lo + hi) * extent)[:, None]
  step = boxes_lib.exact_div((hi - lo) * extent, num - 1)
  index = jnp.arange(num, dtype=lo.dtype)
  # Both products rounded on their own, as TensorFlow's kernel computes them: fused
  # into the sum, XLA:CPU may contract one into an FMA, and a point on the map's
  # edge (0 or H - 1) then lands 1e-9 off the map.
  first = boxes_lib.materialize(lo * extent)
  offset = boxes_lib.materialize(index[None, :] * step[:, None])
  return first[:, None] + offset


def crop_and_resize(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  crop_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  aligned: bool = True,
  box_indices: jax.typing.ArrayLike | None = None,
  box_format: Literal["xyxy", "tf"] = "xyxy",
  method: Literal["bilinear", "nearest"] = "bilinear",
  extrapolation_value: float | None = None,
  impl: Literal["auto", "gather", "einsum"] = "auto",
) -> jax.Array:
  r"""Crops every box and resizes it to ``ch x cw``: one interpolated sample per output cell.

  The sample points are set by ``box_format`` (y shown; x is the same with
  ``W``, ``cw`` and the x coordinates):

  * ``"xyxy"`` (default): pixel boxes ``(x1, y1, x2, y2)``; the samples sit at
    the centres of a ``ch x cw`` grid laid over the box (RoIAlign with one
    sample per bin). With ``s = spatial_scale`` and ``offset = 0.5 if aligned
    else 0``::

        y0 = y1 * s - offset        roi_h = (y2 * s - offset) - y0
        roi_h = sign(roi_h) * max(|roi_h|, 1)      # only when not aligned
        bin_h = roi_h / ch                         # correctly rounded
        y_i = y0 + i * bin_h + 0.5 * bin_h

  * ``"tf"``: TensorFlow's normalized boxes ``(y1, x1, y2, x2)``, where 0 and
    1 are the centres of the first and last rows, and its corner-aligned
    points::

        y_i = y1 * (H - 1) + i * ((y2 - y1) * (H - 1) / (ch - 1))   # ch > 1
        y_0 = 0.5 * (y1 + y2) * (H - 1)                               # ch == 1

    ``spatial_scale`` and ``aligned`` do not apply to normalized boxes.

  In both formats a box with ``y1 > y2`` (or ``x1 > x2``) gives an up-down
  (left-right) flipped crop, as in TensorFlow. (``roi_align`` gives such boxes
  zeros instead.)

  The value at a point ``(y, x)`` is, with ``method``:

  * ``"bilinear"``: ``sum wy * wx * F`` over the two neighbouring rows
    ``floor(y), floor(y) + 1`` with weights ``1 - frac(y), frac(y)`` (the same
    for columns);
  * ``"nearest"``: ``F[round(y), round(x)]``, rounding halves away from zero
    (C ``roundf``, as TensorFlow).

  and at the map's edges, with ``extrapolation_value``:

  * ``None`` (default for ``"xyxy"``): RoIAlign's rule. A point with ``y < -1``
    or ``y > H`` (or the same for ``x``) gives 0; within one cell outside the
    map it reads the border cell (``y`` clamped to ``[0, H - 1]``).
  * a number ``v`` (``"tf"`` takes ``0.0`` for ``None``, TensorFlow's
    default): TensorFlow's rule. A point with ``y`` outside ``[0, H - 1]`` or
    ``x`` outside ``[0, W - 1]`` gives ``v``.

  With ``box_format="tf"``, ``extrapolation_value`` and ``method`` this is
  ``tf.image.crop_and_resize(image, boxes, box_indices, crop_size, method,
  extrapolation_value)`` on NHWC maps, gradients included, with these
  differences:

  * floating maps keep their dtype (TensorFlow returns float32 for every
    dtype; integer maps give float32 here too), and float64 maps are sampled
    at float64 points;
  * a box with a non-finite coordinate gives zeros (TensorFlow raises an
    error);
  * ``nearest`` crops have no box gradient (TensorFlow gives them its bilinear
    box gradient, as an approximation);
  * TensorFlow's box-gradient kernel recomputes the points with the step
    rounded as ``(y2 - y1) * ((H - 1) / (ch - 1))``. Where that moves a point
    onto a whole cell or off it, its box gradient is not the derivative of
    its own output; here it is.

  Boxes with a non-finite coordinate, or (under ``jit``) an out-of-range
  ``box_indices`` entry, give zeros and zero gradients, and never affect
  other boxes.

  Dtypes: float64 features are computed in float64, all others in float32
  (boxes too); outputs keep the features' dtype. Empty inputs (``K = 0``
  boxes, ``N = 0`` images) give empty outputs and zero gradients.
  Integer maps are computed in float32.

  Gradients (bilinear): to the features, each sample's cotangent times its
  weights on its cells (``custom_vjp``, as :func:`roi_align`); to the box
  coordinates, the exact derivative of the sample points through the weights
  (0 where a point does not count). Where a point lies on a whole row, the
  derivative along ``y`` is one-sided, ``F[y + 1] - F[y]``, under RoIAlign's
  edge rule, and 0 under TensorFlow's, whose two rows are ``floor(y)`` and
  ``ceil(y)``, the same row there (columns alike). Nearest: the feature
  gradient goes to the chosen cell, and the box gradient is 0 (piecewise
  constant). The extrapolated value has no gradient. Integer maps have no
  gradient.

  Args:
    features: ``[N, H, W, C]`` feature map or image, floating or integer.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      in ``box_format``.
    crop_size: ``ch`` (square) or ``(ch, cw)``; static.
    spatial_scale: static feature cells per image pixel (pixel boxes only).
    aligned: static; pixel-centre model (-0.5 shift), the default here
      (pixel boxes only).
    box_indices: ``[K]`` integer image index per box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``.
    box_format: ``"xyxy"`` (pixel ``(x1, y1, x2, y2)``) or ``"tf"``
      (normalized ``(y1, x1, y2, x2)``); static.
    method: ``"bilinear"`` or ``"nearest"``; static.
    extrapolation_value: static value of points outside the map under
      TensorFlow's edge rule, or ``None`` (see above).
    impl: ``"auto"``, ``"gather"`` or ``"einsum"``; static (see :func:`roi_align`).

  Returns:
    ``[K, ch, cw, C]`` or ``[N, R, ch, cw, C]``, in the dtype of floating
    ``features``; float32 for integer ``features``.

  Raises:
    TypeError: as :func:`roi_align` (integer ``features`` are allowed); a
      non-numeric ``extrapolation_value``; ``box_format``/``method`` not a str.
    ValueError: as :func:`roi_align`; an unknown ``box_format`` or ``method``;
      ``spatial_scale != 1`` or ``aligned=False`` with ``box_format="tf"``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import crop_and_resize
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> crop_and_resize(x, jnp.array([[0.0, 0.0, 4.0, 4.0]]), 2)[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    >>> image = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    >>> tf_box = jnp.array([[-1.0, -1.0, 1.0, 1.0]])  # (y1, x1, y2, x2), normalized
    >>> crop_and_resize(image, tf_box, 3, box_format="tf", extrapolation_value=-1.0)[0, :, :, 0]
    Array([[-1., -1., -1.],
           [-1.,  1.,  2.],
           [-1.,  3.,  4.]], dtype=float32)
  """
  validation.check_features(features, allow_integer=True)
  size = validation.normalize_size(crop_size, "crop_size")
  scale = validation.check_spatial_scale(spatial_scale)
  aligned = validation.check_bool("aligned", aligned)
  validation.check_choice("box_format", box_format, BOX_FORMATS)
  validation.check_choice("method", method, METHODS)
  if extrapolation_value is not None:
    extrapolation_value = validation.check_real("extrapolation_value", extrapolation_value)
  if box_format == "tf":
    if scale != 1.0 or not aligned:
      raise ValueError(
        "`spatial_scale` and `aligned` apply to pixel boxes only; with box_format='tf' (boxes "
        f"normalized to the map) leave them at 1.0 and True; got spatial_scale={spatial_scale!r}, "
        f"aligned={aligned!r}."
      )
    if extrapolation_value is None:
      extrapolation_value = 0.0
    validation.check_boxes(boxes, layout="(y1, x1, y2, x2) normalized to the map")
  impl = backends.resolve(impl)
  features = jnp.asarray(features)
  if not jnp.issubdtype(features.dtype, jnp.floating):
    features = features.astype(jnp.float32)  # TensorFlow: integer images give float32
  options = dict(
    size=size,
    scale=scale,
    aligned=aligned,
    box_format=box_format,
    nearest=method == "nearest",
    extrapolation_value=extrapolation_value,
    impl=impl,
  )
  return scaffold.run(_crop_and_resize, features, boxes, box_indices, size, **options)


@partial(
  jax.jit,
  static_argnames=(
    "size",
    "scale",
    "aligned",
    "box_format",
    "nearest",
    "extrapolation_value",
    "impl",
  ),
)
def _crop_and_resize(
  features,
  flat,
  *,
  size,
  scale,
  aligned,
  box_format,
  nearest,
  extrapolation_value,
  impl,
):
  (ch, cw), (height, width) = size, features.shape[1:3]
  boxes, image_index, valid = flat
  if box_format == "tf":
    ys = _tf_positions(boxes[:, 0], boxes[:, 2], ch, height)
    xs = _tf_positions(boxes[:, 1], boxes[:, 3], cw, width)
  else:
    ys = _pixel_positions(boxes[:, 1], boxes[:, 3], valid, ch, scale, aligned)
    xs = _pixel_positions(boxes[:, 0], boxes[:, 2], valid, cw, scale, aligned)
  extrapolate = extrapolation_value is not None
  ty, inside_y = sampling.point_taps(ys, valid, height, nearest, extrapolate)
  tx, inside_x = sampling.point_taps(xs, valid, width, nearest, extrapolate)
  out = backends.sum_taps(features, ty, tx, image_index, impl)
  if extrapolate and extrapolation_value != 0:
    outside = valid[:, None, None] & ~(inside_y[:, :, None] & inside_x[:, None, :])
    fill = jnp.where(outside, np.asarray(extrapolation_value, out.dtype), 0)
    out = out + fill[..., None].astype(out.dtype)
  return out
