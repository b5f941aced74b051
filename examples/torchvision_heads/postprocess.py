"""torchvision's detection postprocess with static shapes: box coding, NMS, detections, masks.

Every function is pure, jit-able and batch-friendly. Where torchvision returns a list of tensors
of data-dependent length, these return fixed-size arrays padded at the end, with a ``valid``
mask. Formulas follow ``torchvision.models.detection`` (``_utils.BoxCoder``, ``roi_heads``,
``transform``) and ``torchvision.ops.boxes`` expression by expression, in the inputs' float dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # the largest size delta decode_boxes lets through


class Detections(NamedTuple):
  """Per image detections, best first, padded to a fixed count.

  Attributes:
    boxes: ``[N, D, 4]`` ``(x1, y1, x2, y2)``; zeros where not ``valid``.
    scores: ``[N, D]`` class probabilities; zeros where not ``valid``.
    labels: ``[N, D]`` int32 class ids (1 .. num_classes - 1); zeros where not ``valid``.
    valid: ``[N, D]`` bool; the first ``valid.sum(-1)`` entries of each image are detections.
    masks: ``[N, D, M, M]`` mask probabilities of each detection's class (Mask R-CNN), or None.
  """

  boxes: jax.Array
  scores: jax.Array
  labels: jax.Array
  valid: jax.Array
  masks: jax.Array | None = None


def encode_boxes(reference, proposals, weights=BOX_CODER_WEIGHTS):
  """Regression targets that move ``proposals`` onto ``reference`` (``BoxCoder.encode``).

  ``dx = wx (cx_ref - cx) / w``, ``dw = ww log(w_ref / w)`` and likewise for y and h, where
  ``cx = x1 + w / 2`` and ``w = x2 - x1``. Shapes ``[..., 4]`` (broadcast) to ``[..., 4]``.
  """
  wx, wy, ww, wh = weights
  w, h = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
  cx, cy = proposals[..., 0] + 0.5 * w, proposals[..., 1] + 0.5 * h
  rw, rh = reference[..., 2] - reference[..., 0], reference[..., 3] - reference[..., 1]
  rcx, rcy = reference[..., 0] + 0.5 * rw, reference[..., 1] + 0.5 * rh
  return jnp.stack(
    [wx * (rcx - cx) / w, wy * (rcy - cy) / h, ww * jnp.log(rw / w), wh * jnp.log(rh / h)], -1
  )


def decode_boxes(deltas, boxes, weights=BOX_CODER_WEIGHTS, clip=BBOX_XFORM_CLIP):
  """Applies per-class deltas ``[..., C * 4]`` to ``boxes`` ``[..., 4]``: ``[..., C, 4]``.

  ``BoxCoder.decode``: ``dw = min(deltas_w / ww, clip)`` (likewise ``dh``), then centre
  ``dx / wx * w + cx`` and size ``exp(dw) * w``; corners are the centre -/+ half the size.
  """
  wx, wy, ww, wh = weights
  deltas = deltas.reshape(*deltas.shape[:-1], deltas.shape[-1] // 4, 4)
  w = (boxes[..., 2] - boxes[..., 0])[..., None]
  h = (boxes[..., 3] - boxes[..., 1])[..., None]
  cx, cy = boxes[..., 0, None] + 0.5 * w, boxes[..., 1, None] + 0.5 * h
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  pcx, pcy = deltas[..., 0] / wx * w + cx, deltas[..., 1] / wy * h + cy
  half_w, half_h = 0.5 * (jnp.exp(dw) * w), 0.5 * (jnp.exp(dh) * h)
  return jnp.stack([pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h], -1)


def clip_boxes_to_image(boxes, image_shape):
  """Clamps x to ``[0, W]`` and y to ``[0, H]``; ``image_shape`` is ``(H, W)`` (may be traced)."""
  h, w = image_shape[0], image_shape[1]
  upper = jnp.stack([w, h, w, h]).astype(boxes.dtype)
  return jnp.clip(boxes, 0, upper.reshape((1,) * (boxes.ndim - 1) + (4,)))


def box_area(boxes):
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
  """``[..., A, B]`` IoU of ``[..., A, 4]`` and ``[..., B, 4]`` boxes (``ops.box_iou``)."""
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter)


def batched_nms(boxes, scores, labels, valid, iou_threshold, max_output):
  """Greedy per-class NMS of one image's candidates, with a static number of outputs.

  The candidates are visited by decreasing score (ties: lower index first, as torchvision's
  stable sort). A valid candidate is kept unless a kept candidate of the same label overlaps
  it with ``iou > iou_threshold``, where ``iou = inter / (area_i + area_j - inter)`` as in
  torchvision's kernel. The visit stops once ``max_output`` are kept, so the cost is one
  ``[M]``-vector step per candidate visited.

  The IoU uses the boxes' own coordinates. For up to 1000 candidates on CPU, torchvision's
  ``batched_nms`` instead shifts each class's boxes by ``label * (max_coordinate + 1)`` and
  runs one NMS, which rounds the shifted coordinates: the two can disagree only on a pair
  whose IoU is within float rounding of ``iou_threshold``.

  Args:
    boxes: ``[M, 4]``; scores: ``[M]``; labels: ``[M]`` ints; valid: ``[M]`` bool.
    iou_threshold: static float.
    max_output: static int.

  Returns:
    ``(indices, kept)``: ``[max_output]`` int32 indices into the candidates, best first, and
    ``[max_output]`` bool, True for the first ``min(kept, max_output)`` entries.
  """
  count = boxes.shape[0]
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)
  boxes, labels, valid = boxes[order], labels[order], valid[order]
  areas = box_area(boxes)

  def visit(state):
    i, kept, suppressed, total = state
    box = boxes[i]
    xy1 = jnp.maximum(boxes[:, :2], box[None, :2])
    xy2 = jnp.minimum(boxes[:, 2:], box[None, 2:])
    wh = jnp.maximum(xy2 - xy1, 0)
    inter = wh[:, 0] * wh[:, 1]
    iou = inter / (areas[i] + areas - inter)
    keep = valid[i] & ~suppressed[i]
    suppressed = suppressed | (keep & (labels == labels[i]) & (iou > iou_threshold))
    return i + 1, kept.at[i].set(keep), suppressed, total + keep

  def unfinished(state):
    i, _, _, total = state
    return (i < count) & (total < max_output)

  start = (0, jnp.zeros(count, bool), jnp.zeros(count, bool), 0)
  _, kept, _, _ = lax.while_loop(unfinished, visit, start)
  (positions,) = jnp.nonzero(kept, size=max_output, fill_value=0)
  found = jnp.arange(max_output) < kept.sum()
  return order[positions].astype(jnp.int32), found


def postprocess_detections(
  class_logits,
  box_regression,
  proposals,
  image_shapes,
  *,
  score_thresh: float = 0.05,
  nms_thresh: float = 0.5,
  detections_per_img: int = 100,
  max_candidates: int = 4096,
  weights: Sequence[float] = BOX_CODER_WEIGHTS,
) -> Detections:
  """``RoIHeads.postprocess_detections`` with static shapes.

  Per image: decode every class's box from its proposal, clip it to the image, take softmax
  scores, drop the background class, then keep candidates (one per proposal and class,
  proposal-major order) with ``score > score_thresh`` and both sides ``>= 0.01``, run
  per-class NMS and keep the best ``detections_per_img``.

  Static shapes need one bound torchvision does not have: NMS sees the ``max_candidates``
  best-scoring candidates. The result equals torchvision's whenever at most ``max_candidates``
  candidates pass the filters, or at least ``detections_per_img`` of those seen are kept (a
  candidate's fate depends only on better ones).

  Args:
    class_logits: ``[N, P, C]``.
    box_regression: ``[N, P, C * 4]``.
    proposals: ``[N, P, 4]`` boxes in image pixels.
    image_shapes: ``[N, 2]`` ``(H, W)`` of each image (before batch padding).

  Returns:
    :class:`Detections` with ``D = detections_per_img`` and ``masks=None``.
  """

  def one_image(logits, deltas, boxes, image_shape):
    classes = logits.shape[-1]
    boxes = clip_boxes_to_image(decode_boxes(deltas, boxes, weights), image_shape)
    scores = jax.nn.softmax(logits, -1)
    boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
    labels = jnp.tile(jnp.arange(1, classes, dtype=jnp.int32), logits.shape[0])
    sides = jnp.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    valid = (scores > score_thresh) & (sides >= 1e-2)
    seen = min(max_candidates, scores.shape[0])
    if seen == 0:  # no proposals: nothing to detect
      empty = lambda x: jnp.zeros((detections_per_img, *x.shape[1:]), x.dtype)  # noqa: E731
      return Detections(empty(boxes), empty(scores), empty(labels), empty(scores).astype(bool))
    _, best = lax.top_k(jnp.where(valid, scores, -jnp.inf), seen)  # ties: lower index first
    index, found = batched_nms(
      boxes[best], scores[best], labels[best], valid[best], nms_thresh, detections_per_img
    )
    pick = best[index]
    zero = lambda x: jnp.where(found.reshape(-1, *[1] * (x.ndim - 1)), x, 0)  # noqa: E731
    return Detections(zero(boxes[pick]), zero(scores[pick]), zero(labels[pick]), found)

  return jax.vmap(one_image)(class_logits, box_regression, proposals, image_shapes)


def class_mask_logits(mask_logits, labels):
  """Each box's mask logits for its label: ``[..., M, M, C]`` and ``[...]`` give ``[..., M, M]``."""
  return jnp.take_along_axis(mask_logits, labels[..., None, None, None], axis=-1)[..., 0]


def select_class_masks(mask_logits, labels):
  """``maskrcnn_inference``: the sigmoid of each box's mask for its label (``[..., M, M]``)."""
  return jax.nn.sigmoid(class_mask_logits(mask_logits, labels))


def resize_boxes(boxes, image_shape, original_size):
  """Boxes of an ``image_shape`` ``(H, W)`` image in an ``original_size`` one (``transform``)."""
  ratio_h = jnp.float32(original_size[0]) / jnp.float32(image_shape[0])
  ratio_w = jnp.float32(original_size[1]) / jnp.float32(image_shape[1])
  ratios = jnp.stack([ratio_w, ratio_h, ratio_w, ratio_h]).astype(boxes.dtype)
  return boxes * ratios.reshape((1,) * (boxes.ndim - 1) + (4,))


def paste_masks_in_image(masks, boxes, image_size: tuple[int, int], padding: int = 1):
  """``paste_masks_in_image``: each ``M x M`` mask resized into its box on an empty image.

  As torchvision: the mask is zero-padded by ``padding`` cells and its box widened about its
  centre by ``(M + 2 padding) / M``; the box's corners are truncated to ints, the padded mask
  is resized (bilinear, ``align_corners=False``) to ``(y2 - y1 + 1) x (x2 - x1 + 1)`` and
  written at ``(y1, x1)``, clipped to the image. Written as two small matmuls per mask (the
  separable resize weights of each image row and column), so it is static-shaped and
  gather-free.

  Args:
    masks: ``[D, M, M]``.
    boxes: ``[D, 4]`` in the image's pixels.
    image_size: static ``(H, W)``.
    padding: static int.

  Returns:
    ``[D, H, W]`` in the masks' dtype.
  """
  size = masks.shape[-1]
  padded_size = size + 2 * padding
  padded = jnp.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
  scale = jnp.asarray(padded_size / size, boxes.dtype)
  half = jnp.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, -1) * 0.5 * scale
  centre = jnp.concatenate([boxes[:, 2:] + boxes[:, :2]] * 2, -1) * 0.5
  sign = jnp.array([[-1, -1, 1, 1]], boxes.dtype)
  corners = jnp.trunc(centre + half * sign).astype(jnp.int32)  # torch's .to(int64)

  def axis_weights(start, end, length):
    """``[D, length, padded_size]``: resize weights of each image pixel along one axis."""
    extent = jnp.maximum(end - start + 1, 1)
    pixel = jnp.arange(length)[None]
    inside = (pixel >= start[:, None]) & (pixel <= end[:, None])
    ratio = jnp.float32(padded_size) / extent.astype(jnp.float32)
    source = ratio[:, None] * ((pixel - start[:, None]).astype(jnp.float32) + 0.5) - 0.5
    source = jnp.maximum(source, 0.0)
    low = jnp.floor(source).astype(jnp.int32)
    frac = jnp.clip(source - low, 0.0, 1.0)
    high = low + (low < padded_size - 1)
    weights = jax.nn.one_hot(low, padded_size) * (1 - frac)[..., None]
    weights += jax.nn.one_hot(high, padded_size) * frac[..., None]
    return (weights * inside[..., None]).astype(masks.dtype)

  rows = axis_weights(corners[:, 1], corners[:, 3], image_size[0])
  cols = axis_weights(corners[:, 0], corners[:, 2], image_size[1])
  hi = lax.Precision.HIGHEST
  return jnp.einsum("dhi,dij,dwj->dhw", rows, padded, cols, precision=hi)
