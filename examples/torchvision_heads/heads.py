"""torchvision's Faster/Mask R-CNN RoI heads (FPN) as Flax Linen modules, on roipool_jax.

Module and parameter names follow torchvision's ``state_dict`` (``box_head.fc6``,
``box_predictor.cls_score``, ``mask_head.0``, ``mask_predictor.conv5_mask``, ...), so
:func:`convert.params_from_state_dict` maps one onto the other. Arrays are NHWC; boxes are
``(x1, y1, x2, y2)`` in the (resized, unpadded) input image's pixels, as in torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

import roipool_jax

from . import losses, postprocess


class TwoMLPHead(nn.Module):
  """``TwoMLPHead``: flatten, then two ReLU fully connected layers. ``[K, 7, 7, C] -> [K, R]``."""

  representation_size: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    x = nn.relu(nn.Dense(self.representation_size, name="fc6")(x))
    return nn.relu(nn.Dense(self.representation_size, name="fc7")(x))


class FastRCNNPredictor(nn.Module):
  """``FastRCNNPredictor``: class logits ``[K, C]`` and per-class box deltas ``[K, 4 C]``."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    logits = nn.Dense(self.num_classes, name="cls_score")(x)
    return logits, nn.Dense(4 * self.num_classes, name="bbox_pred")(x)


class MaskRCNNHeads(nn.Module):
  """``MaskRCNNHeads``: 3x3 ReLU convolutions (no norm), ``[K, 14, 14, C] -> [K, 14, 14, L]``."""

  layers: Sequence[int]
  dilation: int = 1

  @nn.compact
  def __call__(self, x):
    d = self.dilation
    for i, features in enumerate(self.layers):
      conv = nn.Conv(features, (3, 3), padding=((d, d), (d, d)), kernel_dilation=d, name=str(i))
      x = nn.relu(conv(x))
    return x


class MaskRCNNPredictor(nn.Module):
  """``MaskRCNNPredictor``: 2x2 stride-2 transposed conv, ReLU, 1x1 conv to per-class logits."""

  dim_reduced: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    up = nn.ConvTranspose(
      self.dim_reduced, (2, 2), strides=(2, 2), padding="VALID", name="conv5_mask"
    )
    return nn.Conv(self.num_classes, (1, 1), name="mask_fcn_logits")(nn.relu(up(x)))


class RoIHeads(nn.Module):
  """The RoI stage of torchvision's ``maskrcnn_resnet50_fpn`` (``RoIHeads``), static-shaped.

  Boxes: ``MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 2)`` (roipool_jax's
  :func:`~roipool_jax.multi_scale_roi_align`), ``TwoMLPHead``, ``FastRCNNPredictor``, then
  :func:`postprocess.postprocess_detections`. Masks: the detections pooled at 14x14, then
  ``MaskRCNNHeads``, ``MaskRCNNPredictor`` and the mask of each detection's class.

  Attributes:
    num_classes: classes including background (91 for COCO).
    representation_size: width of the box head (1024).
    mask_layers: widths of the mask head's convolutions ((256,) * 4).
    mask_dilation: their dilation (1).
    mask_dim_reduced: width of the transposed convolution (256).
    score_thresh, nms_thresh, detections_per_img: as torchvision (0.05, 0.5, 100).
    max_candidates: candidates NMS sees per image (see ``postprocess_detections``).
    masks: False for Faster R-CNN (no mask branch).
    mask_chunk: detections per call of the mask branch (see ``detection_masks``).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> heads = RoIHeads(5, representation_size=32, mask_layers=(8,), mask_dim_reduced=8)
    >>> levels = [jnp.ones((1, 64 // s, 64 // s, 8)) for s in (4, 8, 16, 32)]
    >>> boxes, shapes = jnp.array([[[4.0, 4.0, 40.0, 30.0]]]), jnp.array([[64, 64]])
    >>> params = heads.init(jax.random.key(0), levels, boxes, shapes, image_size=(64, 64))
    >>> heads.apply(params, levels, boxes, shapes, image_size=(64, 64)).masks.shape
    (1, 100, 28, 28)
  """

  num_classes: int
  representation_size: int = 1024
  mask_layers: Sequence[int] = (256, 256, 256, 256)
  mask_dilation: int = 1
  mask_dim_reduced: int = 256
  score_thresh: float = 0.05
  nms_thresh: float = 0.5
  detections_per_img: int = 100
  max_candidates: int = 4096
  masks: bool = True
  mask_chunk: int = 10

  def setup(self):
    self.box_head = TwoMLPHead(self.representation_size)
    self.box_predictor = FastRCNNPredictor(self.num_classes)
    if self.masks:
      self.mask_head = MaskRCNNHeads(self.mask_layers, self.mask_dilation)
      self.mask_predictor = MaskRCNNPredictor(self.mask_dim_reduced, self.num_classes)

  def pool(self, features, boxes, size, image_size, box_indices=None):
    """Boxes pooled as ``MultiScaleRoIAlign(..., size, 2)``, flat: ``[N*R or K, s, s, C]``.

    ``boxes`` are ``[N, R, 4]`` (per image) or ``[K, 4]`` with ``box_indices`` ``[K]``.
    """
    pooled = roipool_jax.multi_scale_roi_align(
      features, boxes, size, image_size=image_size, sampling_ratio=2, box_indices=box_indices
    )
    return pooled.reshape(math.prod(pooled.shape[:-3]), *pooled.shape[-3:])

  def box_outputs(self, features, proposals, *, image_size):
    """Class logits ``[N, P, C]`` and box deltas ``[N, P, 4 C]`` of ``[N, P, 4]`` proposals."""
    logits, deltas = self.box_predictor(
      self.box_head(self.pool(features, proposals, 7, image_size))
    )
    n, p = proposals.shape[:2]
    return logits.reshape(n, p, logits.shape[-1]), deltas.reshape(n, p, deltas.shape[-1])

  def mask_logits(self, features, boxes, *, image_size, box_indices=None):
    """Per-class mask logits ``[N, R, 28, 28, C]`` of ``[N, R, 4]`` boxes (``[K, 28, 28, C]``
    of ``[K, 4]`` boxes with ``box_indices``)."""
    pooled = self.pool(features, boxes, 14, image_size, box_indices)
    logits = self.mask_predictor(self.mask_head(pooled))
    return logits.reshape(*boxes.shape[:-1], *logits.shape[1:])

  def __call__(self, features, proposals, image_shapes, *, image_size) -> postprocess.Detections:
    """Eval mode: detections (and their masks) from FPN levels and proposals.

    Args:
      features: the levels ``'0'`` to ``'3'``, ``[N, H_l, W_l, C]`` each (P2..P5).
      proposals: ``[N, P, 4]``. Pad images with fewer proposals with zero-size boxes
        (``x1 == x2``): every box decoded from them has zero width, and is dropped with the
        small boxes, as torchvision would drop it.
      image_shapes: ``[N, 2]`` ``(H, W)`` of each image, for clipping.
      image_size: static ``(H, W)``: the largest height and width in ``image_shapes``
        (torchvision infers the pyramid's scales from it).

    Returns:
      :class:`postprocess.Detections`, with ``[N, D, 28, 28]`` masks unless ``masks=False``.
    """
    logits, deltas = self.box_outputs(features, proposals, image_size=image_size)
    found = postprocess.postprocess_detections(
      logits,
      deltas,
      proposals,
      image_shapes,
      score_thresh=self.score_thresh,
      nms_thresh=self.nms_thresh,
      detections_per_img=self.detections_per_img,
      max_candidates=self.max_candidates,
    )
    if not self.masks:
      return found
    return found._replace(masks=self.detection_masks(features, found, image_size=image_size))

  def detection_masks(self, features, found: postprocess.Detections, *, image_size):
    """``[N, D, 28, 28]`` mask probabilities of each detection's class (``maskrcnn_inference``).

    The detections are taken ``mask_chunk`` at a time, and a chunk without a valid detection
    is skipped (``lax.cond``): like torchvision, which runs the mask branch on the detections
    only, the cost follows the number of detections rather than ``N * D``. Entries that are
    not valid detections are 0.
    """
    n, d = found.labels.shape
    if self.is_initializing() or n * d == 0:  # creates the weights; nothing to skip
      logits = self.mask_logits(features, found.boxes, image_size=image_size)
      masks = postprocess.select_class_masks(logits, found.labels)
    else:
      masks = self._chunked_masks(features, found, image_size)
    return jnp.where(found.valid[..., None, None], masks, 0)

  def _chunked_masks(self, features, found, image_size):
    """``detection_masks`` visiting ``mask_chunk`` detections at a time, skipping empty chunks."""
    n, d = found.labels.shape
    total = n * d
    chunk = min(self.mask_chunk, total)
    pad = -total % chunk

    def chunked(x):
      x = x.reshape(total, *x.shape[2:])
      return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])

    image = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, d))
    operands = tuple(chunked(x) for x in (found.boxes, image, found.labels, found.valid))
    size = 2 * 14  # the transposed convolution doubles the pooled 14 x 14

    def masks_of(boxes, image, labels):
      logits = self.mask_logits(features, boxes, image_size=image_size, box_indices=image)
      return postprocess.select_class_masks(logits, labels)

    def one_chunk(args):
      boxes, image, labels, valid = args
      skip = lambda *_: jnp.zeros((chunk, size, size), features[0].dtype)  # noqa: E731
      return lax.cond(valid.any(), masks_of, skip, boxes, image, labels)

    masks = lax.map(one_chunk, operands).reshape(-1, size, size)[:total]
    return masks.reshape(n, d, size, size)

  def losses(self, features, samples: losses.Samples, gt_masks=None, *, image_size):
    """Training losses on sampled proposals, as ``RoIHeads.forward`` in training mode.

    Args:
      features: as in ``__call__``.
      samples: :class:`losses.Samples`: ``[N, S, ...]`` sampled proposals with their labels
        (``-1``: padding), matched ground-truth indices and regression targets.
      gt_masks: per image ``[G_n, H_n, W_n]`` binary masks (Mask R-CNN).
      image_size: static, as in ``__call__``.

    Returns:
      ``{"loss_classifier", "loss_box_reg"}`` and ``"loss_mask"`` with masks.
    """
    logits, deltas = self.box_outputs(features, samples.proposals, image_size=image_size)
    labels = samples.labels.reshape(-1)
    classifier, box_reg = losses.fastrcnn_loss(
      logits.reshape(labels.shape[0], logits.shape[-1]),
      deltas.reshape(labels.shape[0], deltas.shape[-1]),
      labels,
      samples.regression_targets.reshape(-1, 4),
    )
    out = {"loss_classifier": classifier, "loss_box_reg": box_reg}
    if self.masks:
      mask_logits = self.mask_logits(features, samples.proposals, image_size=image_size)
      out["loss_mask"] = losses.maskrcnn_loss(mask_logits, samples, gt_masks)
    return out
