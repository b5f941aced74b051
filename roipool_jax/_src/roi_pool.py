"""``roi_pool``: Fast R-CNN RoI max pooling (Girshick, 2015)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import backends, dense_max, dtypes, scaffold, validation
from roipool_jax._src import bin_max as bin_max_lib
from roipool_jax._src import boxes as boxes_lib

QUANTIZATIONS = ("round", "floor")


def quantized_edges(lo, hi, num_bins, extra, limit):
  """Caffe-style integer bin edges ``[first, last)`` ``[..., P]`` along one axis.

  ``start = round(lo)``, ``end = round(hi)`` (C round), ``roi = max(end - start
  + extra, 1)`` cells, ``bin = roi / P`` (correctly rounded); bin ``j`` is
  ``[floor(j * bin) + start, ceil((j + 1) * bin) + start)`` clipped to ``[0,
  limit]``. ``roi_pool`` uses ``extra = 1, limit = L``; ``ps_roi_pool``
  ``extra = 0, limit = L - 1``. ``lo`` and ``hi`` are ``[K]`` (one axis) or
  ``[K, A]`` (A axes with the same P; ``limit`` is then an int array ``[1, A, 1]``).
  """
  start = boxes_lib.to_int(boxes_lib.round_half_away(lo))
  end = boxes_lib.to_int(boxes_lib.round_half_away(hi))
  roi = jnp.maximum(end - start + extra, 1)
  # Computed once: both edges (and each predicate) would otherwise compile their own copy of
  # the long division. The predicates read ``lo``, which is one multiply from the boxes.
  bin_size = boxes_lib.materialize(boxes_lib.exact_div(roi.astype(lo.dtype), num_bins), key=lo)
  bin_size, start = bin_size[..., None], start[..., None]
  # Separate iotas for j and j + 1: no add that could be fused into an FMA.
  shape = (1,) * lo.ndim + (num_bins,)
  j = jnp.arange(num_bins, dtype=lo.dtype).reshape(shape)
  j_next = jnp.arange(1, num_bins + 1, dtype=lo.dtype).reshape(shape)
  first = boxes_lib.to_int(jnp.floor(j * bin_size)) + start
  last = boxes_lib.to_int(jnp.ceil(j_next * bin_size)) + start
  return boxes_lib.materialize((jnp.clip(first, 0, limit), jnp.clip(last, 0, limit)), key=lo)


def quantized_box_edges(scaled, output_size, extra, limits):
  """:func:`quantized_edges` of both axes: ``(row_first, row_last, col_first, col_last)``.

  Args:
    scaled: ``[K, 4]`` boxes ``(x1, y1, x2, y2)`` in feature cells.
    output_size: ``(oh, ow)``.
    extra: as in :func:`quantized_edges`.
    limits: ``(row_limit, col_limit)`` ints.

  Square outputs compute both axes as one ``[K, 2]`` array: one long division
  to compile instead of two, the same values.
  """
  (oh, ow), (row_limit, col_limit) = output_size, limits
  if oh != ow:
    rs, re = quantized_edges(scaled[:, 1], scaled[:, 3], oh, extra, row_limit)
    cs, ce = quantized_edges(scaled[:, 0], scaled[:, 2], ow, extra, col_limit)
    return rs, re, cs, ce
  limit = jnp.array([row_limit, col_limit], jnp.int32).reshape(1, 2, 1)
  first, last = quantized_edges(*boxes_lib.row_col_edges(scaled), oh, extra, limit)
  return first[:, 0], last[:, 0], first[:, 1], last[:, 1]


def _floor_mode_edges(lo, size, num_bins, extent):
  """The article's bin edges along one axis; see :func:`roi_pool`."""
  start = boxes_lib.to_int(jnp.floor(lo))
  length = boxes_lib.to_int(jnp.floor(size))
  bin_size = jnp.maximum(length // num_bins, 1)[:, None]
  first = start[:, None] + jnp.arange(num_bins, dtype=jnp.int32)[None] * bin_size
  return boxes_lib.materialize((jnp.clip(first, 0, extent), jnp.clip(first + bin_size, 0, extent)))


def pool_bins(
  flat: boxes_lib.FlatBoxes,
  output_size: tuple[int, int],
  spatial_scale: float,
  quantization: str,
  map_size: tuple[int, int],
) -> bin_max_lib.Bins:
  """Integer bin rectangles of ``roi_pool`` (exposed for the demo and tests)."""
  b = flat.boxes
  (oh, ow), (height, width) = output_size, map_size
  if quantization == "round":  # torchvision / Caffe
    scaled = boxes_lib.scale_coords(b, spatial_scale)
    rs, re, cs, ce = quantized_box_edges(scaled, output_size, 1, map_size)
  else:  # corners and sizes scaled together: one materialize
    scaled, size = boxes_lib.scale_coords((b, b[:, 2:] - b[:, :2]), spatial_scale)
    rs, re = _floor_mode_edges(scaled[:, 1], size[:, 1], oh, height)
    cs, ce = _floor_mode_edges(scaled[:, 0], size[:, 0], ow, width)
  re = jnp.where(flat.valid[:, None], re, rs)  # invalid boxes: empty bins
  return bin_max_lib.Bins(flat.image_index, rs, re, cs, ce)


@jax.custom_vjp
def _max_over_bins(features: jax.Array, bins: bin_max_lib.Bins) -> jax.Array:
  return bin_max_lib.bin_max(features, bins)[0]


def _max_over_bins_fwd(features, bins):
  values, written = bin_max_lib.bin_max(features, bins)
  return values, (features, bins, written)


def _max_over_bins_bwd(residuals, cotangent):
  features, bins, written = residuals
  grad = bin_max_lib.bin_max_grad(features, bins, written, cotangent)
  return dtypes.narrow(grad, features.dtype), None


_max_over_bins.defvjp(_max_over_bins_fwd, _max_over_bins_bwd)


def roi_pool(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  box_indices: jax.typing.ArrayLike | None = None,
  quantization: Literal["round", "floor"] = "round",
  impl: Literal["auto", "gather", "einsum"] = "auto",
) -> jax.Array:
  r"""RoI max pooling (Fast R-CNN): max over a quantized ``oh x ow`` grid per box.

  Each box is mapped onto the feature map with ``spatial_scale``, snapped to
  whole cells, split into ``oh x ow`` bins of whole cells, and each bin is
  max-pooled channel-wise. The arithmetic is the C kernels' (in the compute
  dtype, below, then int32). Let ``s = spatial_scale``; per axis (x shown; y
  is the same with rows, ``H`` and ``oh``):

  ``quantization="round"`` (default; bit-exact with ``torchvision.ops.roi_pool``
  and the original Caffe layer)::

      x1' = round(x1 * s)        x2' = round(x2 * s)   # C round: halves away from 0
      roi_w = max(x2' - x1' + 1, 1)                    # inverted boxes become 1 cell
      bin_w = roi_w / ow                               # correctly rounded
      bin j: columns [floor(j * bin_w) + x1', ceil((j + 1) * bin_w) + x1') clipped to [0, W]

  Neighbouring bins may share a row/column (floor/ceil) and, for boxes smaller
  than ``ow`` cells, several bins may read the same cell.

  ``quantization="floor"`` (the scheme of the article this library starts from:
  floor the position and the size separately, drop the leftovers)::

      x0 = floor(x1 * s)         width = floor((x2 - x1) * s)
      bin_w = max(floor(width / ow), 1)                # whole cells, at least 1
      bin j: columns [x0 + j * bin_w, x0 + (j + 1) * bin_w) clipped to [0, W]

  The ``width - ow * bin_w`` right-most columns (bottom rows for y) are lost.
  Boxes narrower than ``ow`` cells (zero-size and inverted ones included) get
  1-cell bins laid from ``x0``, which then extend past the box.

  In both modes a bin (or the part of it) that falls outside the map is
  clipped away; a bin left with no cell is *empty* and outputs 0. A box with a
  non-finite coordinate, or (under ``jit``) an out-of-range ``box_indices``
  entry, outputs zeros everywhere. Such boxes never affect other boxes.

  Gradient (hand-written ``custom_vjp``): each output cotangent goes entirely
  to the arg-max of its bin and channel, the *first* maximal cell in row-major
  (row, then column) order, exactly as torchvision (ties are not split);
  empty bins send nothing; cells read by several bins accumulate. A bin holding
  a NaN feature outputs NaN and sends no gradient. The gradient
  with respect to ``boxes`` is zero (the bins are quantized) and ``box_indices``
  has none.

  Dtypes: float64 features are computed in float64, all others in float32
  (boxes too); outputs keep the features' dtype. A maximum rounds nothing:
  bfloat16 and float16 maps are searched as they are (as 16-bit keys in the
  values' order), with the same maxima and arg-maxima as float32, except
  that a maximal zero comes out +0. Empty inputs (``K = 0``
  boxes, ``N = 0`` images) give empty outputs and zero gradients.

  Implementations (``impl``; both give the same values and gradients):

  * ``"gather"``: bins are the unit of work, sorted by pass count; each pass
    gathers a few cells of every bin (contiguous ``C`` vectors). The
    backward pass sweeps the same chunks of bins again, last cell first, to
    find each bin's arg-max against the forward's output, and adds the
    cotangents there (:mod:`roipool_jax._src.bin_max`); no arg-max is kept
    between the passes. Work is proportional to the cells the bins hold
    inside the map: bins outside the map cost nothing.
  * ``"einsum"``: masked separable maxima over broadcast operands, with no
    gather or scatter in the forward or backward HLO, and a backward that
    is bitwise deterministic on every backend
    (:mod:`roipool_jax._src.dense_max`); its work is dense in the map. For TPUs.
  * ``"auto"`` (default): ``"einsum"`` on TPU, ``"gather"`` elsewhere.

  Neither makes a per-box copy of the map.

  Args:
    features: ``[N, H, W, C]`` floating feature map.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static ``feature size / image size`` (1/16 for VGG16 conv5,
      1/32 in the article).
    box_indices: ``[K]`` integer image index of each box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 4]`` boxes.
    quantization: ``"round"`` (torchvision) or ``"floor"`` (the article).
    impl: ``"auto"``, ``"gather"`` or ``"einsum"`` (above); static.

  Returns:
    ``[K, oh, ow, C]`` (flat boxes) or ``[N, R, oh, ow, C]`` (per-image boxes),
    in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type (``output_size`` not ints,
      ``spatial_scale`` not a static number, ``quantization``/``impl`` not a str),
      non-floating ``features`` or non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes`` (a
      torchvision ``[K, 5]`` rois array is named as such), a non-positive
      ``output_size`` or ``spatial_scale``, an unknown ``quantization`` or ``impl``,
      ``box_indices`` of the wrong length or (when concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import roi_pool
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> roi_pool(x, jnp.array([[0.0, 0.0, 3.0, 3.0]]), 2)[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)

  References:
    Girshick, "Fast R-CNN", ICCV 2015. https://arxiv.org/abs/1504.08083
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  validation.check_choice("quantization", quantization, QUANTIZATIONS)
  impl = backends.resolve(impl, dense_backends=("tpu",))
  options = dict(size=size, scale=scale, quantization=quantization, impl=impl)
  return scaffold.run(_roi_pool, jnp.asarray(features), boxes, box_indices, size, **options)


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "quantization", "impl"))
def _roi_pool(features, flat, *, size, scale, quantization, impl):
  bins = pool_bins(flat, size, scale, quantization, features.shape[1:3])
  if impl == "einsum":
    return dense_max.dense_max(features, bins)
  return _max_over_bins(features, bins)
