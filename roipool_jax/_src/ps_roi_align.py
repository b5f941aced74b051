"""``ps_roi_align``: position-sensitive RoIAlign (R-FCN with RoIAlign's sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp

from roipool_jax._src import backends, dense, position_sensitive, scaffold, validation
from roipool_jax._src import roi_align as roi_align_lib


def ps_roi_align(
  features: jax.typing.ArrayLike,
  boxes: jax.typing.ArrayLike,
  output_size: int | Sequence[int],
  *,
  spatial_scale: float = 1.0,
  sampling_ratio: int = -1,
  box_indices: jax.typing.ArrayLike | None = None,
  impl: Literal["auto", "gather", "einsum"] = "auto",
  channel_order: Literal["channel_major", "bin_major"] = "channel_major",
) -> jax.Array:
  r"""Position-sensitive RoIAlign: bin ``(i, j)`` averages its own group of channels.

  The map has ``C = C_out * oh * ow`` channels; output channel ``c`` of bin
  ``(i, j)`` is the RoIAlign average over that bin of input channel ``(c * oh
  + i) * ow + j`` (``channel_order="channel_major"``, torchvision's layout) or
  ``(i * ow + j) * C_out + c`` (``"bin_major"``), so each bin reads ``C_out``
  channels, not ``C``. The sampling is :func:`roipool_jax.roi_align`'s with
  ``aligned=True``, as in ``torchvision.ops.ps_roi_align``. Per axis (y shown),
  with ``s = spatial_scale``, in the compute dtype::

      y0 = y1 * s - 0.5          roi_h = (y2 * s - 0.5) - y0     # no minimum size
      bin_h = roi_h / oh                                         # correctly rounded
      g = sampling_ratio if sampling_ratio > 0 else ceil(bin_h)  # per box
      sample i of bin p:  y = y0 + p * bin_h + (i + 0.5) * bin_h / g

  Each sample is bilinearly interpolated with torchvision's rule (zero
  outside ``[-1, H]``, clamped to the last row/column; see ``roi_align``) and
  a bin outputs the sum of its ``g_y * g_x`` samples divided by ``g_y * g_x``.

  Deliberate differences from torchvision, for degenerate boxes only: a box
  with a bin of no sample (a zero-size box with adaptive sampling) outputs 0
  where torchvision outputs NaN (``0 / 0``), and inverted boxes (``x2 < x1``
  or ``y2 < y1``) output 0 where torchvision samples a mirrored box or
  outputs NaN. Boxes with non-finite coordinates, or (under ``jit``) an
  out-of-range ``box_indices`` entry, output 0. No box affects another.

  Gradients (hand-written ``custom_vjp`` of the sampling kernel):

  * features: each sample sends ``cotangent * weight / (g_y * g_x)`` to its
    four neighbour cells, in the channel it read; accumulated in
    the compute dtype in a fixed order, so bitwise reproducible on CPU;
  * boxes: the exact derivative of the sample positions (as ``roi_align``),
    with the integer grid ``g`` held constant; zero for degenerate boxes.

  Dtypes: float64 features are computed in float64, all others in float32;
  outputs keep the features' dtype. ``K = 0`` boxes or ``N = 0`` images give
  empty outputs and zero gradients.

  Implementations (``impl``): ``"gather"`` reads, per bin, the cells its
  samples touch (at most ``min(bin_h + 2, H) * min(bin_w + 2, W)`` cells of
  ``C_out`` values with adaptive sampling) from the map transposed once to
  ``[N, H, W, oh * ow, C_out]``, and transposes the gradient back; a bin-major
  map is already in that layout, read in place with no copy (on XLA:CPU
  7-33% less time in float32). Permuting the output channels of the layer
  that makes the map is free, so a model trained in JAX can pick
  ``"bin_major"``; ``"channel_major"`` reads maps made for torchvision, mmcv or
  the original R-FCN. ``"einsum"`` applies dense interpolation matrices with
  matmuls batched over bin rows: no gather or scatter in its HLO,
  deterministic gradients everywhere, ``2 * K * oh * N * H * W * C_out * ow``
  flops. ``"auto"`` picks ``"einsum"`` on TPU and GPU, ``"gather"`` on CPU.

  Args:
    features: ``[N, H, W, C_out * oh * ow]`` floating feature map.
    boxes: ``[K, 4]`` (with ``box_indices``) or ``[N, R, 4]`` (per image) boxes
      ``(x1, y1, x2, y2)`` in input-image pixels.
    output_size: ``oh`` (square) or ``(oh, ow)``; static.
    spatial_scale: static feature cells per image pixel.
    sampling_ratio: static samples per bin along each axis; ``<= 0`` means
      adaptive, ``ceil(roi_size / output_size)`` per box and axis.
    box_indices: ``[K]`` integer image index of each box for ``[K, 4]`` boxes;
      may be omitted when ``N == 1``. Must be None for ``[N, R, 4]`` boxes.
    impl: ``"auto"``, ``"gather"`` or ``"einsum"`` (see above); static.
    channel_order: ``"channel_major"`` or ``"bin_major"``, which input channel
      each output channel of each bin reads (see above); static.

  Returns:
    ``[K, oh, ow, C_out]`` (flat boxes) or ``[N, R, oh, ow, C_out]`` (per-image
    boxes) in the dtype of ``features``.

  Raises:
    TypeError: an option of the wrong type, non-floating ``features`` or
      non-integer ``box_indices``.
    ValueError: a wrong rank or last dim of ``features``/``boxes``, ``C`` not a
      multiple of ``oh * ow``, a non-positive ``output_size`` or
      ``spatial_scale``, an unknown ``impl`` or ``channel_order``, or
      ``box_indices`` of the wrong length or (when concrete) out of ``[0, N)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from roipool_jax import ps_roi_align
    >>> x = jnp.arange(16.0).reshape(1, 2, 2, 4)  # C = 4 = 1 channel * 2 * 2 bins
    >>> ps_roi_align(x, jnp.array([[0.0, 0.0, 2.0, 2.0]]), 2)[0, :, :, 0]
    Array([[ 0.,  5.],
           [10., 15.]], dtype=float32)

  References:
    Dai, Li, He, Sun, "R-FCN: Object Detection via Region-based Fully
    Convolutional Networks", NeurIPS 2016. https://arxiv.org/abs/1605.06409
  """
  validation.check_features(features)
  size = validation.normalize_size(output_size)
  scale = validation.check_spatial_scale(spatial_scale)
  ratio = validation.check_sampling_ratio(sampling_ratio)
  features = jnp.asarray(features)
  c_out = position_sensitive.check_channels(features, size)
  impl = backends.resolve(impl)
  order = position_sensitive.check_channel_order(channel_order)
  options = dict(size=size, scale=scale, ratio=ratio, impl=impl, order=order)
  return scaffold.run(_ps_roi_align, features, boxes, box_indices, size, c_out, **options)


# Compiled once per shape and configuration, also when called outside `jit`.
@partial(jax.jit, static_argnames=("size", "scale", "ratio", "impl", "order"))
def _ps_roi_align(features, flat, *, size, scale, ratio, impl, order):
  rows, cols = roi_align_lib.align_geometry(flat, size, scale, ratio, aligned=True)
  map_size = features.shape[1:3]
  wy, wx = roi_align_lib.average_weights(rows, cols, size, map_size, ratio, impl)
  if impl == "einsum":
    return dense.position_sensitive_sum(features, wy, wx, flat.image_index, order)
  return position_sensitive.pooled_sum(features, wy, wx, flat.image_index, order)
