"""Independent NumPy references, written for reading, not for speed.

Plain loops over boxes, bins and cells, following the formulas in the op
docstrings (and torchvision's C++ kernels). Scalar float32 arithmetic goes
through NumPy float32 scalars, which round exactly as C ``float`` does.

One exception, :func:`dense_roi_align`, is written in ``jax.numpy`` so that
autodiff of a straightforward formulation (every sample gathered from a
per-box copy of the map) can be compared with the library's hand-written
gradients.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

F32 = np.float32


def c_round(x: float) -> int:
  """C ``roundf``: halves away from zero (exact: a float32 plus 0.5 fits a double)."""
  return int(math.copysign(math.floor(abs(x) + 0.5), x))


def _bin_ranges(box, scale, oh, ow, quantization, t=F32):
  """Unclipped [start, end) rows and columns of every bin of one box, in scalar type ``t``."""
  x1, y1, x2, y2 = (t(v) for v in box)
  s = t(scale)
  if quantization == "round":
    x_start, y_start = c_round(float(x1 * s)), c_round(float(y1 * s))
    x_end, y_end = c_round(float(x2 * s)), c_round(float(y2 * s))
    roi_w, roi_h = max(x_end - x_start + 1, 1), max(y_end - y_start + 1, 1)
    bin_w, bin_h = t(roi_w) / t(ow), t(roi_h) / t(oh)
    rows = [
      (math.floor(t(i) * bin_h) + y_start, math.ceil(t(i + 1) * bin_h) + y_start) for i in range(oh)
    ]
    cols = [
      (math.floor(t(j) * bin_w) + x_start, math.ceil(t(j + 1) * bin_w) + x_start) for j in range(ow)
    ]
  else:  # "floor": the article's scheme
    x0, y0 = math.floor(x1 * s), math.floor(y1 * s)
    width, height = math.floor((x2 - x1) * s), math.floor((y2 - y1) * s)
    bin_w, bin_h = max(width // ow, 1), max(height // oh, 1)
    rows = [(y0 + i * bin_h, y0 + (i + 1) * bin_h) for i in range(oh)]
    cols = [(x0 + j * bin_w, x0 + (j + 1) * bin_w) for j in range(ow)]
  return rows, cols


def roi_pool(features, boxes, box_indices, output_size, scale, quantization="round"):
  """Returns (output [K, oh, ow, C], argmax [K, oh, ow, C] flat h * W + w, -1 if empty).

  Bin geometry is computed in float64 for float64 features, else in float32.
  """
  features = np.asarray(features)
  t = np.float64 if features.dtype == np.float64 else F32
  n, height, width, channels = features.shape
  oh, ow = output_size
  k = len(boxes)
  out = np.zeros((k, oh, ow, channels), features.dtype)
  argmax = np.full((k, oh, ow, channels), -1, np.int64)
  for b in range(k):
    box = np.asarray(boxes[b], t)
    if not np.all(np.isfinite(box)) or not 0 <= box_indices[b] < n:
      continue
    image = features[box_indices[b]]
    rows, cols = _bin_ranges(box, scale, oh, ow, quantization, t)
    for i, (h0, h1) in enumerate(rows):
      h0, h1 = min(max(h0, 0), height), min(max(h1, 0), height)
      for j, (w0, w1) in enumerate(cols):
        w0, w1 = min(max(w0, 0), width), min(max(w1, 0), width)
        for c in range(channels):
          best, best_at = None, -1
          for h in range(h0, h1):
            for w in range(w0, w1):
              if best is None or image[h, w, c] > best:
                best, best_at = image[h, w, c], h * width + w
          if best is not None:
            out[b, i, j, c], argmax[b, i, j, c] = best, best_at
  return out, argmax


def roi_pool_grad(features_shape, box_indices, argmax, cotangent):
  """Gradient wrt features: each cotangent added at its bin's arg-max."""
  n, height, width, channels = features_shape
  grad = np.zeros((n, height * width, channels), np.float64)
  k, oh, ow, _ = argmax.shape
  for b in range(k):
    for i in range(oh):
      for j in range(ow):
        for c in range(channels):
          if argmax[b, i, j, c] >= 0:
            grad[box_indices[b], argmax[b, i, j, c], c] += cotangent[b, i, j, c]
  return grad.reshape(features_shape)


# ------------------------------------------------------------------ RoIAlign


def bilinear(image, y, x):
  """torchvision's bilinear sample of ``image [H, W, C]`` at ``(y, x)``, in the dtype of ``y``.

  ``y`` and ``x`` are NumPy float32 (or float64) scalars, so every operation
  rounds as C ``float`` (or ``double``) does.
  """
  t = type(y)
  height, width = image.shape[:2]
  if y < -1 or y > height or x < -1 or x > width:
    return np.zeros(image.shape[2], t)
  y, x = max(y, t(0)), max(x, t(0))
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_low = y_high = height - 1
    y = t(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_low = x_high = width - 1
    x = t(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - t(y_low), x - t(x_low)
  hy, hx = t(1) - ly, t(1) - lx
  return (
    hy * hx * image[y_low, x_low]
    + hy * lx * image[y_low, x_high]
    + ly * hx * image[y_high, x_low]
    + ly * lx * image[y_high, x_high]
  )


def roi_align(
  features,
  boxes,
  box_indices,
  output_size,
  scale,
  sampling_ratio,
  aligned,
  mode,
  dtype=np.float32,
):
  """Loops over boxes, bins and samples, in ``dtype`` as torchvision's kernel writes them.

  Documented deviation from torchvision: a box of negative width or height
  (inverted) gives zeros. Non-finite boxes give zeros.
  """
  t = np.dtype(dtype).type
  features = np.asarray(features, dtype)
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, features.shape[3]), dtype)
  s, offset = t(scale), t(0.5 if aligned else 0.0)
  for b, box in enumerate(np.asarray(boxes, dtype)):
    if not np.all(np.isfinite(box)):
      continue
    x0, y0 = box[0] * s - offset, box[1] * s - offset
    roi_w, roi_h = box[2] * s - offset - x0, box[3] * s - offset - y0
    if roi_w < 0 or roi_h < 0:
      continue
    if not aligned:
      roi_w, roi_h = max(roi_w, t(1)), max(roi_h, t(1))
    bin_h, bin_w = roi_h / t(oh), roi_w / t(ow)
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
    image = features[box_indices[b]]
    for i in range(oh):
      for j in range(ow):
        samples = [
          bilinear(
            image,
            y0 + t(i) * bin_h + (t(iy) + t(0.5)) * bin_h / t(gh),
            x0 + t(j) * bin_w + (t(ix) + t(0.5)) * bin_w / t(gw),
          )
          for iy in range(gh)
          for ix in range(gw)
        ]
        if not samples:
          continue
        if mode == "avg":
          out[b, i, j] = np.sum(samples, axis=0) / t(max(gh * gw, 1))
        else:
          out[b, i, j] = np.max(samples, axis=0)
  return out


def tf_crop_and_resize(image, boxes, box_indices, crop_size, method="bilinear", extrapolation=0.0):
  """``tf.image.crop_and_resize`` as its CPU kernel writes it, for NHWC ``image``.

  ``boxes [K, 4]`` are normalized ``(y1, x1, y2, x2)``; float32 arithmetic,
  ``roundf`` (halves away from zero) for nearest. Returns float32
  ``[K, ch, cw, C]``.
  """
  image = np.asarray(image, np.float32)
  _, height, width, channels = image.shape
  ch, cw = crop_size
  out = np.zeros((len(boxes), ch, cw, channels), np.float32)

  def points(lo, hi, num, length):
    if num == 1:
      return [F32(0.5 * float(lo + hi) * (length - 1))]
    scale = (hi - lo) * F32(length - 1) / F32(num - 1)
    return [lo * F32(length - 1) + F32(i) * scale for i in range(num)]

  for b, (y1, x1, y2, x2) in enumerate(np.asarray(boxes, np.float32)):
    data = image[box_indices[b]]
    for i, y in enumerate(points(y1, y2, ch, height)):
      for j, x in enumerate(points(x1, x2, cw, width)):
        if y < 0 or y > height - 1 or x < 0 or x > width - 1:
          out[b, i, j] = extrapolation
        elif method == "nearest":
          out[b, i, j] = data[c_round(float(y)), c_round(float(x))]
        else:
          top, bottom, left, right = math.floor(y), math.ceil(y), math.floor(x), math.ceil(x)
          y_lerp, x_lerp = y - F32(top), x - F32(left)
          upper = data[top, left] + (data[top, right] - data[top, left]) * x_lerp
          lower = data[bottom, left] + (data[bottom, right] - data[bottom, left]) * x_lerp
          out[b, i, j] = upper + (lower - upper) * y_lerp
  return out


def crop_and_resize(features, boxes, box_indices, crop_size, scale, aligned, method, extrapolation):
  """Pixel-box ``crop_and_resize``: one sample at each cell centre of a grid over the box.

  Inverted boxes give flipped crops. ``extrapolation=None``: torchvision's
  bilinear edge rule (:func:`bilinear`; nearest reads the clamped, rounded
  cell); a number: TensorFlow's (points outside ``[0, L - 1]`` give it).
  """
  features = np.asarray(features, np.float32)
  _, height, width, channels = features.shape
  ch, cw = crop_size
  out = np.zeros((len(boxes), ch, cw, channels), np.float32)
  s, offset = F32(scale), F32(0.5 if aligned else 0.0)
  for b, box in enumerate(np.asarray(boxes, np.float32)):
    if not np.all(np.isfinite(box)):
      continue
    x0, y0 = box[0] * s - offset, box[1] * s - offset
    roi_w, roi_h = box[2] * s - offset - x0, box[3] * s - offset - y0
    if not aligned:  # at least one cell, keeping the direction
      roi_w = max(roi_w, F32(1)) if roi_w >= 0 else min(roi_w, F32(-1))
      roi_h = max(roi_h, F32(1)) if roi_h >= 0 else min(roi_h, F32(-1))
    bin_h, bin_w = roi_h / F32(ch), roi_w / F32(cw)
    image = features[box_indices[b]]
    for i in range(ch):
      y = y0 + F32(i) * bin_h + F32(0.5) * bin_h
      for j in range(cw):
        x = x0 + F32(j) * bin_w + F32(0.5) * bin_w
        if extrapolation is not None:
          if y < 0 or y > height - 1 or x < 0 or x > width - 1:
            out[b, i, j] = extrapolation
            continue
        elif y < -1 or y > height or x < -1 or x > width:
          continue
        if method == "nearest":
          row = c_round(float(min(max(y, F32(0)), F32(height - 1))))
          col = c_round(float(min(max(x, F32(0)), F32(width - 1))))
          out[b, i, j] = image[row, col]
        else:
          out[b, i, j] = bilinear(image, y, x)
  return out


def roi_warp(features, boxes, box_indices, output_size, warp_size):
  """MNC RoI warping: the bilinear ``warp_size`` crop of each box (pixel centres, aligned),
  max-pooled over non-overlapping windows to ``output_size``. For boxes with ``x1 < x2``
  and ``y1 < y2`` (the op gives inverted boxes zeros; this crop would flip them)."""
  (oh, ow), (wh, ww) = output_size, warp_size
  crop = crop_and_resize(features, boxes, box_indices, (wh, ww), 1.0, True, "bilinear", None)
  return crop.reshape(len(boxes), oh, wh // oh, ow, ww // ow, -1).max(axis=(2, 4))


def dense_tf_crop_and_resize(image, boxes, box_indices, crop_size):
  """TensorFlow's bilinear ``crop_and_resize`` in ``jax.numpy`` (gathers from a per-box copy).

  For autodiff gradients (features and boxes) to compare with the library's
  hand-written ones; extrapolation value 0.
  """
  _, height, width, _ = image.shape
  ch, cw = crop_size

  def points(lo, hi, num, length):
    step = (hi - lo) * (length - 1) / (num - 1)
    return lo[:, None] * (length - 1) + jnp.arange(num)[None, :] * step[:, None]

  ys = points(boxes[:, 0], boxes[:, 2], ch, height)  # [K, ch]
  xs = points(boxes[:, 1], boxes[:, 3], cw, width)
  inside = ((ys >= 0) & (ys <= height - 1))[:, :, None] & ((xs >= 0) & (xs <= width - 1))[:, None]
  ys, xs = jnp.clip(ys, 0, height - 1), jnp.clip(xs, 0, width - 1)
  top, left = jnp.floor(ys).astype(jnp.int32), jnp.floor(xs).astype(jnp.int32)
  bottom, right = jnp.ceil(ys).astype(jnp.int32), jnp.ceil(xs).astype(jnp.int32)
  y_lerp, x_lerp = (ys - top)[:, :, None, None], (xs - left)[:, None, :, None]
  maps = image[jnp.asarray(box_indices)]  # [K, H, W, C]
  k = jnp.arange(len(boxes))[:, None, None]

  def at(rows, cols):
    return maps[k, rows[:, :, None], cols[:, None, :]]

  upper = at(top, left) + (at(top, right) - at(top, left)) * x_lerp
  lower = at(bottom, left) + (at(bottom, right) - at(bottom, left)) * x_lerp
  return jnp.where(inside[..., None], upper + (lower - upper) * y_lerp, 0.0)


def dense_roi_align(features, boxes, indices, size, scale, grid, aligned, mode):
  """A straightforward jnp RoIAlign with a fixed grid, for autodiff gradients to compare with.

  Gathers every sample's four corners from a per-box copy of the map: fine for
  tiny test maps, never for the library.
  """
  oh, ow = size
  _, height, width, _ = features.shape
  offset = 0.5 if aligned else 0.0
  start = boxes[:, :2] * scale - offset
  roi = boxes[:, 2:] * scale - offset - start
  if not aligned:
    roi = jnp.maximum(roi, 1.0)

  def positions(lo, extent, bins):
    b = extent / bins
    p = jnp.arange(bins)[None, :, None]
    i = jnp.arange(grid)[None, None, :]
    return lo[:, None, None] + p * b[:, None, None] + (i + 0.5) * b[:, None, None] / grid

  def corner_weights(y, length):
    inside = (y >= -1) & (y <= length)
    y = jnp.maximum(y, 0.0)
    low = jnp.floor(y).astype(jnp.int32)
    edge = low >= length - 1
    low = jnp.minimum(low, length - 1)
    high = jnp.where(edge, low, low + 1)
    frac = jnp.where(edge, 0.0, y - low)
    return (low, high), ((1 - frac) * inside, frac * inside)

  (ry, wy) = corner_weights(positions(start[:, 1], roi[:, 1], oh), height)  # [K, oh, g]
  (rx, wx) = corner_weights(positions(start[:, 0], roi[:, 0], ow), width)
  maps = features[indices]  # [K, H, W, C]
  k = jnp.arange(boxes.shape[0])[:, None, None, None, None]
  value = 0.0
  for a in range(2):
    for b in range(2):
      rows = ry[a][:, :, :, None, None]
      cols = rx[b][:, None, None, :, :]
      w = wy[a][:, :, :, None, None] * wx[b][:, None, None, :, :]
      value = value + w[..., None] * maps[k, rows, cols]  # [K, oh, g, ow, g, C]
  reduce = jnp.mean if mode == "avg" else jnp.max
  return reduce(value, axis=(2, 4))


def central_differences(loss, x, eps):
  """``d loss / d x`` by central differences, one coordinate at a time (``x`` a jax array)."""
  numeric = np.zeros(x.shape)
  for i in np.ndindex(*x.shape):
    step = jnp.zeros(x.shape, x.dtype).at[i].set(eps)
    numeric[i] = (loss(x + step) - loss(x - step)) / (2 * eps)
  return numeric


def _ps_pool_bins(box, scale, oh, ow, height, width, t=F32):
  """``ps_roi_pool``'s clipped ``[start, end)`` rows and columns of every bin of one box."""
  s = t(scale)
  x1, y1, x2, y2 = (c_round(t(v) * s) for v in box)
  bin_h = t(max(y2 - y1, 1)) / t(oh)
  bin_w = t(max(x2 - x1, 1)) / t(ow)
  clip = lambda v, limit: min(max(v, 0), limit)  # noqa: E731
  rows = [
    (
      clip(math.floor(t(i) * bin_h) + y1, height - 1),
      clip(math.ceil(t(i + 1) * bin_h) + y1, height - 1),
    )
    for i in range(oh)
  ]
  cols = [
    (
      clip(math.floor(t(j) * bin_w) + x1, width - 1),
      clip(math.ceil(t(j + 1) * bin_w) + x1, width - 1),
    )
    for j in range(ow)
  ]
  return rows, cols


def ps_channels(i, j, output_size, channels, channel_order="channel_major"):
  """Input channels read by bin ``(i, j)``, in output-channel order: ``(c * oh + i) * ow + j``
  (channel-major), or ``(i * ow + j) * C_out + c`` (bin-major)."""
  oh, ow = output_size
  c_out = channels // (oh * ow)
  if channel_order == "bin_major":
    return [(i * ow + j) * c_out + c for c in range(c_out)]
  return [(c * oh + i) * ow + j for c in range(c_out)]


def ps_roi_pool(features, boxes, box_indices, output_size, scale, channel_order="channel_major"):
  """torchvision's ``ps_roi_pool`` forward: the mean of each bin's cells in its own channels."""
  features = np.asarray(features, np.float32)
  _, height, width, channels = features.shape
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, channels // (oh * ow)), np.float32)
  for b, box in enumerate(np.asarray(boxes, np.float32)):
    if not np.all(np.isfinite(box)):
      continue
    rows, cols = _ps_pool_bins(box, scale, oh, ow, height, width)
    for i, (r0, r1) in enumerate(rows):
      for j, (c0, c1) in enumerate(cols):
        if r1 > r0 and c1 > c0:
          cells = features[box_indices[b], r0:r1, c0:c1][
            ..., ps_channels(i, j, output_size, channels, channel_order)
          ]
          out[b, i, j] = cells.sum(axis=(0, 1)) / np.float32((r1 - r0) * (c1 - c0))
  return out


def ps_roi_pool_grad(
  features_shape, boxes, box_indices, output_size, scale, cotangent, channel_order="channel_major"
):
  """The exact gradient of :func:`ps_roi_pool`: each cotangent spread evenly over its bin."""
  _, height, width, channels = features_shape
  grad = np.zeros(features_shape, np.float64)
  for b, box in enumerate(np.asarray(boxes, np.float32)):
    if not np.all(np.isfinite(box)):
      continue
    rows, cols = _ps_pool_bins(box, scale, *output_size, height, width)
    for i, (r0, r1) in enumerate(rows):
      for j, (c0, c1) in enumerate(cols):
        if r1 > r0 and c1 > c0:
          share = cotangent[b, i, j] / ((r1 - r0) * (c1 - c0))
          cells = grad[box_indices[b], r0:r1, c0:c1]  # a view
          cells[..., ps_channels(i, j, output_size, channels, channel_order)] += share
  return grad


def ps_roi_align(
  features, boxes, box_indices, output_size, scale, sampling_ratio, channel_order="channel_major"
):
  """torchvision's ``ps_roi_align`` (RoIAlign sampling with the -0.5 offset), float32.

  Documented deviations: inverted boxes and bins without samples (zero-size
  boxes, adaptive) give zeros, where torchvision mirrors or gives NaN.
  """
  t = F32
  features = np.asarray(features, np.float32)
  channels = features.shape[3]
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, channels // (oh * ow)), np.float32)
  s, half = t(scale), t(0.5)
  for b, box in enumerate(np.asarray(boxes, np.float32)):
    if not np.all(np.isfinite(box)):
      continue
    x0, y0 = box[0] * s - half, box[1] * s - half
    roi_w, roi_h = box[2] * s - half - x0, box[3] * s - half - y0
    if roi_w < 0 or roi_h < 0:
      continue
    bin_h, bin_w = roi_h / t(oh), roi_w / t(ow)
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
    for i in range(oh):
      for j in range(ow):
        image = features[box_indices[b]][
          ..., ps_channels(i, j, output_size, channels, channel_order)
        ]
        total = np.zeros(image.shape[2], t)
        for iy in range(gh):
          y = y0 + t(i) * bin_h + (t(iy) + half) * bin_h / t(gh)
          for ix in range(gw):
            x = x0 + t(j) * bin_w + (t(ix) + half) * bin_w / t(gw)
            total = total + bilinear(image, y, x)
        if gh * gw > 0:
          out[b, i, j] = total / t(gh * gw)
  return out


def _rotated_samples(box, scale, output_size, sampling_ratio, aligned, clockwise, t):
  """The sample points of one rotated box, as detectron2's / mmcv's kernels place them.

  Returns ``{(i, j): [(y, x), ...]}`` and the divisor ``max(g_h * g_w, 1)``, or
  None for a box that gives zeros (non-finite, or negative with ``aligned``).
  """
  if not np.all(np.isfinite(box)):
    return None
  oh, ow = output_size
  s, offset = t(scale), t(0.5 if aligned else 0.0)
  cx, cy = box[0] * s - offset, box[1] * s - offset
  w, h = box[2] * s, box[3] * s
  if aligned and (w < 0 or h < 0):
    return None
  if not aligned:
    w, h = max(w, t(1)), max(h, t(1))
  theta = t(float(box[4]) * math.pi / 180.0)
  if clockwise:
    theta = -theta
  cos, sin = t(math.cos(theta)), t(math.sin(theta))
  bin_h, bin_w = h / t(oh), w / t(ow)
  gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / t(oh))
  gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / t(ow))
  start_h, start_w = -h / t(2), -w / t(2)
  points = {}
  for i in range(oh):
    for j in range(ow):
      points[i, j] = []
      for a in range(gh):
        yy = start_h + t(i) * bin_h + (t(a) + t(0.5)) * bin_h / t(gh)
        for b in range(gw):
          xx = start_w + t(j) * bin_w + (t(b) + t(0.5)) * bin_w / t(gw)
          points[i, j].append((yy * cos - xx * sin + cy, yy * sin + xx * cos + cx))
  return points, t(max(gh * gw, 1))


def roi_align_rotated(
  features, boxes, box_indices, output_size, scale, sampling_ratio, aligned, clockwise, dtype=F32
):
  """detectron2's / mmcv's ``ROIAlignRotated`` forward as their CPU kernels write it.

  ``boxes [K, 5]`` are ``(cx, cy, w, h, angle_degrees)``. Documented deviation:
  with ``aligned=True`` a negative ``w`` or ``h`` gives zeros (the kernels
  raise). Non-finite boxes give zeros.
  """
  t = np.dtype(dtype).type
  features = np.asarray(features, dtype)
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, features.shape[3]), dtype)
  for k, box in enumerate(np.asarray(boxes, dtype)):
    samples = _rotated_samples(box, scale, output_size, sampling_ratio, aligned, clockwise, t)
    if samples is None:
      continue
    points, count = samples
    image = features[box_indices[k]]
    for (i, j), bin_points in points.items():
      total = np.zeros(features.shape[3], dtype)
      for y, x in bin_points:
        total = total + bilinear(image, y, x)
      out[k, i, j] = total / count
  return out


def riroi_align_rotated(
  features, boxes, box_indices, output_size, scale, sampling_ratio, orientations, clockwise
):
  """mmcv's ``RiRoIAlignRotated`` forward as its kernel writes it, in float64.

  Per output channel ``g * O + o``: the orientation index from the angle
  (``u = angle * O / 360``), then at every sample ``(1 - f) *`` channel
  ``g * O + (o - s) mod O`` ``+ f *`` channel ``g * O + (o - s + 1) mod O``,
  averaged over the bin. Sampling as :func:`roi_align_rotated` with
  ``aligned=False``. Non-finite boxes give zeros.
  """
  features = np.asarray(features, np.float64)
  channels = features.shape[3]
  out = np.zeros((len(boxes),) + tuple(output_size) + (channels,))
  for k, box in enumerate(np.asarray(boxes, np.float64)):
    samples = _rotated_samples(box, scale, output_size, sampling_ratio, False, clockwise, float)
    if samples is None:
      continue
    points, count = samples
    u = box[4] * orientations / 360
    m = math.floor(u)
    f, shift = u - m, m % orientations
    image = features[box_indices[k]]
    for c in range(channels):
      group, o = divmod(c, orientations)
      low = group * orientations + (o - shift) % orientations
      high = group * orientations + (o - shift + 1) % orientations
      for (i, j), bin_points in points.items():
        total = 0.0
        for y, x in bin_points:
          values = bilinear(image, y, x)
          total += (1 - f) * values[low] + f * values[high]
        out[k, i, j, c] = total / count
  return out


def bezier_align(features, boxes, box_indices, output_size, scale, sampling_ratio, aligned):
  """mmcv's ``BezierAlign`` CPU forward, in float64 (mmcv's double curve arithmetic).

  ``boxes [K, 16]``: ``p0..p3`` (top curve, left to right) then ``q0..q3``
  (bottom curve, right to left). Non-finite boxes give zeros.
  """
  features = np.asarray(features, np.float64)
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, features.shape[3]))
  for k, box in enumerate(np.asarray(boxes, np.float64)):
    if not np.all(np.isfinite(box)):
      continue
    p = box.reshape(8, 2) * scale
    top, bottom = p[:4], p[[7, 6, 5, 4]]
    offset = 0.5 if aligned else 0.0
    roi_w = max(abs(top[0, 0] - top[3, 0]), abs(bottom[0, 0] - bottom[3, 0]))
    roi_h = max(abs(top[0, 1] - top[3, 1]), abs(bottom[0, 1] - bottom[3, 1]))
    if not aligned:
      roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
    image = features[box_indices[k]]
    for i in range(oh):
      v = float(np.float32(i) / np.float32(oh))
      for j in range(ow):
        u = float(np.float32(j) / np.float32(ow))
        weights = np.array([(1 - u) ** 3, 3 * u * (1 - u) ** 2, 3 * u * u * (1 - u), u**3])
        x0, y0 = weights @ top
        x1, y1 = weights @ bottom
        cx, cy = x1 * v + x0 * (1 - v) - offset, y1 * v + y0 * (1 - v) - offset
        total = np.zeros(features.shape[3])
        for a in range(gh):
          y = cy - 0.5 * bin_h + (a + 0.5) * bin_h / gh
          for b in range(gw):
            x = cx - 0.5 * bin_w + (b + 0.5) * bin_w / gw
            total = total + bilinear(image, y, x)
        out[k, i, j] = total / max(gh * gw, 1)
  return out


def _cell(image, h, w):
  """``image[h, w]``, or zeros outside the map (PrRoI pooling's convention)."""
  height, width = image.shape[:2]
  if 0 <= h < height and 0 <= w < width:
    return image[h, w].astype(np.float64)
  return np.zeros(image.shape[2])


def _unit_cell_integral(image, h, w, y0, x0, y1, x1):
  """Integral of the bilinear patch on cell ``[h, h+1] x [w, w+1]`` over ``[y0, y1] x [x0, x1]``.

  On the patch, ``f = sum of corner values * (1 - |dy|) * (1 - |dx|)``; each
  corner's factor integrates in closed form: ``int (1 - u) du = u - u^2 / 2``.
  """

  def side(lo, hi):  # integral of (1 - u) for u from lo to hi
    return (hi - hi * hi / 2) - (lo - lo * lo / 2)

  total = np.zeros(image.shape[2])
  for ch, dy0, dy1 in ((h, y0 - h, y1 - h), (h + 1, (h + 1) - y1, (h + 1) - y0)):
    for cw, dx0, dx1 in ((w, x0 - w, x1 - w), (w + 1, (w + 1) - x1, (w + 1) - x0)):
      total += _cell(image, ch, cw) * side(dy0, dy1) * side(dx0, dx1)
  return total


def _prroi(features, boxes, box_indices, output_size, scale, integral):
  """PrRoI pooling with ``integral(image, ay, by, ax, bx) -> [C]`` over each bin, in float64.

  mmcv's geometry: bin ``(i, j)`` spans ``[y1 s + i bin_h, + bin_h] x [x1 s + j bin_w,
  + bin_w]`` with ``bin = max(x2 s - x1 s, 0) / P``; zero-area bins and non-finite boxes give 0.
  """
  features = np.asarray(features, np.float64)
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, features.shape[3]))
  for k, box in enumerate(np.asarray(boxes, np.float64)):
    if not np.all(np.isfinite(box)):
      continue
    x0, y0 = box[0] * scale, box[1] * scale
    bin_w = max(box[2] * scale - x0, 0.0) / ow
    bin_h = max(box[3] * scale - y0, 0.0) / oh
    for i in range(oh):
      for j in range(ow):
        if bin_h * bin_w > 0:
          ay, ax = y0 + i * bin_h, x0 + j * bin_w
          total = integral(features[box_indices[k]], ay, ay + bin_h, ax, ax + bin_w)
          out[k, i, j] = total / (bin_h * bin_w)
  return out


def precise_roi_pool(features, boxes, box_indices, output_size, scale):
  """PrRoI pooling in closed form, cell by cell (mmcv's kernel structure), in float64."""

  def integral(image, ay, by, ax, bx):
    total = np.zeros(image.shape[2])
    for h in range(math.floor(ay), math.ceil(by)):
      for w in range(math.floor(ax), math.ceil(bx)):
        y0, y1 = max(ay, h), min(by, h + 1)
        x0, x1 = max(ax, w), min(bx, w + 1)
        total += _unit_cell_integral(image, h, w, y0, x0, y1, x1)
    return total

  return _prroi(features, boxes, box_indices, output_size, scale, integral)


def interpolate_zero_outside(image, y, x):
  """The continuous map of PrRoI pooling at ``(y, x)``: bilinear, cell ``(h, w)`` at ``(h, w)``,
  zero outside the map (no clamping)."""
  h, w = math.floor(y), math.floor(x)
  dy, dx = y - h, x - w
  return (
    _cell(image, h, w) * (1 - dy) * (1 - dx)
    + _cell(image, h, w + 1) * (1 - dy) * dx
    + _cell(image, h + 1, w) * dy * (1 - dx)
    + _cell(image, h + 1, w + 1) * dy * dx
  )


def precise_roi_pool_quadrature(features, boxes, box_indices, output_size, scale, points=4):
  """PrRoI pooling by numerical integration: Gauss-Legendre with ``points`` nodes per axis on
  every piece of the bin between integer lines (exact for the piecewise bilinear map)."""
  nodes, weights = np.polynomial.legendre.leggauss(points)

  def pieces(a, b):
    cuts = [a] + [float(c) for c in range(math.floor(a) + 1, math.ceil(b))] + [b]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
      yield from zip(lo + (nodes + 1) * (hi - lo) / 2, weights * (hi - lo) / 2, strict=True)

  def integral(image, ay, by, ax, bx):
    total = np.zeros(image.shape[2])
    for y, wy in pieces(ay, by):
      for x, wx in pieces(ax, bx):
        total += wy * wx * interpolate_zero_outside(image, y, x)
    return total

  return _prroi(features, boxes, box_indices, output_size, scale, integral)


# ------------------------------------------------------------------ deformable RoI pooling


def deform_roi_pool(
  features, boxes, box_indices, offsets, output_size, scale, sampling_ratio, gamma
):
  """mmcv's ``deform_roi_pool`` forward as its kernel writes it (``offsets [K, oh, ow, 2]``
  as ``(dx, dy)``), in float64. Documented deviation: inverted boxes give zeros."""
  features = np.asarray(features, np.float64)
  oh, ow = output_size
  out = np.zeros((len(boxes), oh, ow, features.shape[3]))
  for k, box in enumerate(np.asarray(boxes, np.float64)):
    if not (np.all(np.isfinite(box)) and np.all(np.isfinite(offsets[k]))):
      continue
    x0, y0 = box[0] * scale - 0.5, box[1] * scale - 0.5
    roi_w, roi_h = (box[2] * scale - 0.5) - x0, (box[3] * scale - 0.5) - y0
    if roi_w < 0 or roi_h < 0:
      continue
    bin_h, bin_w = roi_h / oh, roi_w / ow
    gh = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_h)
    gw = sampling_ratio if sampling_ratio > 0 else math.ceil(bin_w)
    image = features[box_indices[k]]
    for i in range(oh):
      for j in range(ow):
        start_x = x0 + gamma * roi_w * float(offsets[k, i, j, 0])
        start_y = y0 + gamma * roi_h * float(offsets[k, i, j, 1])
        total = np.zeros(features.shape[3])
        for iy in range(gh):
          y = start_y + i * bin_h + (iy + 0.5) * bin_h / gh
          for ix in range(gw):
            x = start_x + j * bin_w + (ix + 0.5) * bin_w / gw
            total += bilinear(image, np.float64(y), np.float64(x))
        out[k, i, j] = total / max(gh * gw, 1)
  return out
