"""torchvision's R-CNN head losses (``fastrcnn_loss``, ``maskrcnn_loss``) for static shapes.

Sampled proposals come as ``[N, S]`` arrays whose padding has label ``-1``. torchvision pools
masks only for positive samples; here every sample is pooled and the loss weighs the positives,
which gives the same value and the same gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import roipool_jax

from . import postprocess


class Samples(NamedTuple):
  """Sampled proposals of a training step (``RoIHeads.select_training_samples``).

  Attributes:
    proposals: ``[N, S, 4]``.
    labels: ``[N, S]`` ints: 0 background, ``> 0`` the class, ``-1`` padding.
    matched_idxs: ``[N, S]`` index of each sample's ground truth in its image.
    regression_targets: ``[N, S, 4]`` (``postprocess.encode_boxes`` of the matched boxes).
  """

  proposals: jax.Array
  labels: jax.Array
  matched_idxs: jax.Array
  regression_targets: jax.Array


def smooth_l1(x, beta: float):
  """``0.5 x^2 / beta`` where ``|x| < beta``, else ``|x| - 0.5 beta`` (``F.smooth_l1_loss``)."""
  a = jnp.abs(x)
  return jnp.where(a < beta, 0.5 * x * x / beta, a - 0.5 * beta)


def fastrcnn_loss(class_logits, box_regression, labels, regression_targets):
  """Cross entropy over the samples, and smooth-L1 (beta 1/9) of the positives' class deltas.

  Both are divided by the number of samples (``labels >= 0``), as torchvision.

  Args:
    class_logits: ``[S, C]``; box_regression: ``[S, 4 C]``; labels: ``[S]``;
    regression_targets: ``[S, 4]``.

  Returns:
    ``(classification_loss, box_loss)`` scalars.
  """
  sampled = labels >= 0
  count = jnp.maximum(sampled.sum(), 1).astype(class_logits.dtype)
  label = jnp.maximum(labels, 0)
  log_p = jax.nn.log_softmax(class_logits, -1)
  nll = -jnp.take_along_axis(log_p, label[:, None], -1)[:, 0]
  classification = jnp.sum(jnp.where(sampled, nll, 0)) / count
  deltas = box_regression.reshape(labels.shape[0], box_regression.shape[-1] // 4, 4)
  own = jnp.take_along_axis(deltas, label[:, None, None], 1)[:, 0]
  per_box = smooth_l1(own - regression_targets, 1.0 / 9).sum(-1)
  return classification, jnp.sum(jnp.where(labels > 0, per_box, 0)) / count


def project_masks_on_boxes(gt_masks, boxes, matched_idxs, size: int):
  """Each box's ground-truth mask cropped and resized to ``size x size`` (``[S, size, size]``).

  torchvision's ``project_masks_on_boxes``: ``roi_align`` of the ``[G, H, W]`` masks with
  ``spatial_scale=1``, ``sampling_ratio=-1`` (adaptive) and ``aligned=False``.
  """
  masks = jnp.asarray(gt_masks, boxes.dtype)[..., None]
  out = roipool_jax.roi_align(masks, boxes, size, box_indices=matched_idxs, aligned=False)
  return out[..., 0]


def maskrcnn_loss(mask_logits, samples: Samples, gt_masks: Sequence[jax.typing.ArrayLike]):
  """Mean binary cross entropy of the positives' class masks against their projected targets.

  Args:
    mask_logits: ``[N, S, M, M, C]``.
    samples: the :class:`Samples` the logits were computed for.
    gt_masks: per image ``[G_n, H_n, W_n]`` (sizes may differ between images).

  Returns:
    A scalar; 0 when no sample is positive.
  """
  size = mask_logits.shape[-2]
  targets = jnp.stack(
    [
      project_masks_on_boxes(masks, boxes, matched, size)
      for masks, boxes, matched in zip(
        gt_masks, samples.proposals, samples.matched_idxs, strict=True
      )
    ]
  )
  logits = postprocess.class_mask_logits(mask_logits, jnp.maximum(samples.labels, 0))
  bce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  positive = (samples.labels > 0)[..., None, None]
  count = jnp.maximum(positive.sum() * size * size, 1).astype(bce.dtype)
  return jnp.sum(jnp.where(positive, bce, 0)) / count
