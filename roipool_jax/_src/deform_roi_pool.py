"""``deform_roi_pool``: deformable RoI pooling (Deformable ConvNets, mmcv's ``DeformRoIPool``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from roipool_jax._src import boxes as boxes_lib
from roipool_jax._src import roi_align as roi_align_lib
from roipool_jax._src import sampling, scaffold, validation


def check_offsets(offsets, boxes, output_size: tuple[int, int]) -> None:
  """Checks ``offsets`` is a floating ``boxes.shape[:-1] + (oh, ow, 2)`` array."""
  dtype = validation.array_dtype("offsets", offsets)
  want = tuple(np.shape(boxes)[:-1]) + tuple(output_size) + (2,)
  if not jnp.issubdtype(dtype, np.floating):
    raise TypeError(
      f"`offsets` must have a floating dtype; got {dtype} with shape {np.shape(offsets)}."
    )
  if tuple(np.shape(offsets)) != want:
    raise ValueError(
      f"`offsets` must have shape boxes.shape[:-1] + (oh, ow, 2) = {want} ((dx, dy) per bin); "
      f"got {tuple(np.shape(offsets))} with boxes {tuple(np.shape(boxes))}."
    )


def _bin_axes(flat, size, scale, ratio):
  """One :class:`sampling.Axis` per bin along y and x, ``[K * oh * ow]``: each bin a 1-bin box.

  Bin ``(i, j)`` of box ``k`` starts at ``(start + roi * (gamma * offset)) + i * bin``,
  each product rounded on its own, with the box's bin size and grid. (mmcv forms
  ``(gamma * roi) * offset``: the start may differ from its kernel's by an ulp.)
  """
  oh, ow = size
  rows, cols = roi_align_lib.align_geometry(flat, size, scale, ratio, aligned=True)
  b, shift = flat.boxes[:, :4], flat.boxes[:, 4:].reshape(-1, oh, ow, 2)
  k = b.shape[0]

  def per_bin(axis, hi, offset, bin_index):
    # mmcv: roi_start += gamma * roi_size * offset, then + p * bin_size, with
    # roi_size = (hi * s - 0.5) - roi_start.
    roi = (boxes_lib.scale_coords(hi, scale) - 0.5) - axis.start
    limit = boxes_lib.COORD_LIMIT  # far off the map, and finite: such bins read zeros
    shift = jnp.clip(roi[:, None, None] * offset, -limit, limit)
    moved = axis.start[:, None, None] + boxes_lib.materialize(shift)
    start = moved + boxes_lib.materialize(bin_index * axis.bin_size[:, None, None])
    tile = lambda x: jnp.broadcast_to(x[:, None, None], (k, oh, ow)).reshape(-1)  # noqa: E731
    return sampling.Axis(
      *boxes_lib.materialize((start.reshape(-1), tile(axis.bin_size), tile(axis.grid)))
    )

  i = jnp.arange(oh, dtype=b.dtype)[None, :, None]
  j = jnp.arange(ow, dtype=b.dtype)[None, None, :]
  y = per_bin(rows, b[:, 3], shift[..., 1], i)
  x = per_bin(cols, b[:, 2], shift[..., 0], j)
  return y, x


def deform_roi_pool(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  offsets: jax.typing.ArrayLike | None,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  sampling_ratio: int = 0,
  gamma: float = 0.1,
  box_indices: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Deformable RoI pooling: RoIAlign whose every bin is shifted by its own learned offset.

  Bin ``(i, j)`` of a box is :func:`roipool_jax.roi_align`'s bin (with
  ``aligned=True``) moved by ``gamma * offsets[k, i, j] * (roi_w, roi_h)``.
  Per axis (y shown; x is the same with ``dx = offsets[..., 0]``, ``ow``),
  with ``s = spatial_scale``, in the compute dtype::

      y0 = y1 * s - 0.5          roi_h = (y2 * s - 0.5) - y0       # no minimum size
      bin_h = roi_h / oh                                           # correctly rounded
      g = sampling_ratio if sampling_ratio > 0 else ceil(bin_h)    # per box
      start = (y0 + roi_h * (gamma * dy[i, j])) + i * bin_h
      sample q of bin (i, j):  y = start + (q + 0.5) * bin_h / g

  Each sample is bilinearly interpolated with ``roi_align``'s rule (zero
  outside ``[-1, H]``, clamped to the last row/column) and a bin outputs the
  mean of its ``g_y * g_x`` samples. These are the semantics of mmcv's
  ``deform_roi_pool`` (``offset`` ``[K, 2, oh, ow]`` there is
  ``offsets.transpose(0, 3, 1, 2)`` here; ``sampling_ratio=0`` is adaptive
  in both). With ``offsets`` zero (or None) the result equals
  ``roi_align(features, boxes, output_size, spatial_scale=spatial_scale,
  sampling_ratio=sampling_ratio if sampling_ratio > 0 else -1, aligned=True)``.

  Degenerate boxes: a zero-size box with adaptive sampling has no samples
  and outputs 0 (as mmcv); inverted boxes output 0 (as ``roi_align``; mmcv
  samples a mirrored box when ``sampling_ratio > 0``). A box with a
  non-finite coordinate or offset, or (under ``jit``) an out-of-range
  ``box_indices`` entry, outputs 0. No box affects another.

  Gradients (the tap-sum kernel's hand-written ``custom_vjp``, and autodiff
  of the sample positions):

  * features: each sample sends ``cotangent * weight / (g_y * g_x)`` to its
    four neighbour cells, accumulated in the compute dtype in a fixed order
    (bitwise reproducible on CPU);
  * offsets and boxes: the exact derivative of the sample positions, with the
    integer grid ``g`` held constant; zero for degenerate boxes. mmcv's
    offset gradient agrees except for samples in the clamped band
    ``[H - 1, H]`` (or ``[W - 1, W]``), where mmcv's formula gives 0 for the
    other axis; mmcv gives no box gradient.

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Cost: each bin is its own unit of work, reading only the cells its samples
  touch (as ``roi_align``'s gather path); nothing of size ``K * H * W * C``
  is built.

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    offsets: ``boxes.shape[:-1] + (oh, ow, 2)`` normalized ``(dx, dy)`` per
      bin, or None (no deformation).
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    sampling_ratio: static samples per bin along each axis; ``<= 0`` means
      adaptive, ``ceil(roi_size / output_size)`` per box and axis.
    gamma: static scale of the offsets.
    box_indices: ``[K]`` integer image index of each box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 4]`` boxes.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes)
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      ``offsets``, or non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes``,
      ``offsets`` of the wrong shape, a non-positive ``output_size`` or
      ``spatial_scale``, a non-finite ``gamma``, or ``box_indices`` of the wrong length or (when
      concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import deform_roi_pool
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> box = jnp.array([[0.0, 0.0, 2.0, 2.0]])
    >>> right = jnp.zeros((1, 2, 2, 2)).at[..., 0].set(5.0)  # 0.1 * 5 * roi_w = 1 cell
    >>> deform_roi_pool(x, box, right, 2)[0, :, :, 0]
    Array([[1., 2.],
           [5., 6.]], dtype=float32)

  References:
    Dai, Qi, Xiong, Li, Zhang, Hu, Wei, "Deformable Convolutional Networks",
    ICCV 2017. https://arxiv.org/abs/1703.06211
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  gamma = validation.check_real("gamma", gamma)
  if not math.isfinite(gamma):
    raise ValueError(f"`gamma` must be finite; got {gamma!r}.")
  validation.check_boxes(boxes)
  # Concrete boxes and offsets are joined on the host (NumPy rounds as XLA does), so that an
  # eager call compiles nothing per K; traced ones in the program.
  xp = np if validation.is_concrete(boxes, offsets) else jnp
  boxes = xp.asarray(boxes)
  if offsets is None:
    offsets = xp.zeros(boxes.shape[:-1] + size + (2,), jnp.result_type(boxes, jnp.float32))
  check_offsets(offsets, boxes, size)
  offsets = xp.asarray(offsets)
  dtype = jnp.result_type(boxes, offsets)
  # The offsets travel with their box (padding, flattening, validity) as extra coordinates.
  joined = xp.concatenate(
    [
      boxes.astype(dtype),
      (gamma * offsets.astype(dtype)).reshape(boxes.shape[:-1] + (2 * size[0] * size[1],)),
    ],
    -1,
  )
  options = dict(size=size, scale=scale, ratio=ratio)
  coords = 4 + 2 * size[0] * size[1]
  return scaffold.run(
    _deform_roi_pool, jnp.asarray(features), joined, box_indices, size, coords=coords, **options
  )


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "ratio"))
def _deform_roi_pool(features, flat, *, size, scale, ratio):
  rows, cols = _bin_axes(flat, size, scale, ratio)
  return roi_align_lib.average_per_bin(features, rows, cols, flat.image_index, size, ratio)
