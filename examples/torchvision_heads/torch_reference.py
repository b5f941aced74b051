"""torchvision's RoI heads, built and run for the parity fixture and the notebook (needs torch).

Nothing is downloaded: the weights are torchvision's default initialisation under a fixed seed,
with a few rescaled so that the scores are peaked (some fall below the score threshold) and one
class's size deltas hit the decoder's clamp. The inputs (an FPN pyramid, proposals, targets)
are seeded as well. Everything is returned as NumPy arrays, NHWC where torch is NCHW.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.models.detection import transform as tv_transform
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

# A small Mask R-CNN: torchvision's layout with narrow layers, so the fixture stays small.
SMALL = dict(
  num_classes=5, channels=8, representation_size=32, mask_layers=(8, 8, 8, 8), dim_reduced=8
)
# torchvision's own sizes (maskrcnn_resnet50_fpn on COCO), for the benchmark.
FULL = dict(
  num_classes=91, channels=256, representation_size=1024, mask_layers=(256,) * 4, dim_reduced=256
)
LEVELS = ("0", "1", "2", "3")
STRIDES = (4, 8, 16, 32)


def build_roi_heads(
  num_classes, channels, representation_size, mask_layers, dim_reduced, seed=0, sampling=(32, 0.25)
) -> RoIHeads:
  """torchvision's ``RoIHeads`` for Mask R-CNN with FPN, in eval mode, seeded weights."""
  torch.manual_seed(seed)
  heads = RoIHeads(
    box_roi_pool=MultiScaleRoIAlign(list(LEVELS), 7, 2),
    box_head=TwoMLPHead(channels * 7 * 7, representation_size),
    box_predictor=FastRCNNPredictor(representation_size, num_classes),
    fg_iou_thresh=0.5,
    bg_iou_thresh=0.5,
    batch_size_per_image=sampling[0],
    positive_fraction=sampling[1],
    bbox_reg_weights=None,
    score_thresh=0.05,
    nms_thresh=0.5,
    detections_per_img=100,
    mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, 2),
    mask_head=MaskRCNNHeads(channels, list(mask_layers), 1),
    mask_predictor=MaskRCNNPredictor(mask_layers[-1], dim_reduced, num_classes),
  )
  with torch.no_grad():
    heads.box_predictor.cls_score.weight.mul_(8.0)  # peaked class scores
    heads.box_predictor.bbox_pred.weight.mul_(20.0)  # deltas that move boxes visibly
    heads.box_predictor.bbox_pred.bias[4 * (num_classes - 1) + 2] = 25.0  # dw past the clamp
  return heads.eval()


def state_dict(heads: RoIHeads) -> dict[str, np.ndarray]:
  return {name: value.detach().numpy().copy() for name, value in heads.state_dict().items()}


def make_inputs(rng, image_shapes, channels, proposals_per_image, dtype=np.float16):
  """Seeded FPN levels (NHWC, values exact in ``dtype``) for the padded batch, and proposals."""
  batch_h = -(-max(h for h, _ in image_shapes) // 32) * 32
  batch_w = -(-max(w for _, w in image_shapes) // 32) * 32
  n = len(image_shapes)
  features = [
    rng.standard_normal((n, batch_h // s, batch_w // s, channels)).astype(dtype).astype(np.float32)
    for s in STRIDES
  ]
  proposals = np.stack([random_boxes(rng, shape, proposals_per_image) for shape in image_shapes])
  return features, proposals


def random_boxes(rng, image_shape, count, low=8.0, high=600.0):
  """Boxes as an RPN gives them: log-uniform sizes anywhere in the image, clipped to it."""
  h, w = image_shape
  size = np.exp(rng.uniform(math.log(low), math.log(high), (count, 2)))
  centre = rng.uniform(0, 1, (count, 2)) * (w, h)
  boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
  boxes = np.clip(boxes, 0, [w, h, w, h])
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1.0)
  return boxes.astype(np.float32)


def torch_inputs(features, proposals):
  """NHWC NumPy levels and ``[N, P, 4]`` proposals as ``RoIHeads`` takes them: an NCHW dict of
  levels and a list of per-image boxes."""
  levels = {
    k: torch.tensor(f).permute(0, 3, 1, 2).contiguous()
    for k, f in zip(LEVELS, features, strict=True)
  }
  return levels, [torch.tensor(p) for p in proposals]


def paste(result, image_shapes, original_sizes):
  """The detection transform's postprocess: boxes resized to the original images, masks
  pasted into them (``GeneralizedRCNNTransform.postprocess`` in eval mode)."""
  with torch.no_grad():
    return tv_transform.GeneralizedRCNNTransform.postprocess(
      _EvalTransform(), [dict(r) for r in result], image_shapes, original_sizes
    )


def _nhwc(x):
  return x.detach().permute(0, 2, 3, 1).numpy()


def run_eval(heads, features, proposals, image_shapes, original_sizes):
  """Eval-mode ``RoIHeads`` plus the transform's postprocess (boxes resized, masks pasted)."""
  feats, props = torch_inputs(features, proposals)
  out = {}
  with torch.no_grad():
    pooled = heads.box_roi_pool(feats, props, image_shapes)
    logits, deltas = heads.box_predictor(heads.box_head(pooled))
    result, _ = heads(feats, props, image_shapes)
    mask_pooled = heads.mask_roi_pool(feats, [r["boxes"] for r in result], image_shapes)
  pasted = paste(result, image_shapes, original_sizes)
  out["box_pooled"] = _nhwc(pooled)
  out["class_logits"] = logits.numpy()
  out["box_regression"] = deltas.numpy()
  out["mask_pooled"] = _nhwc(mask_pooled)
  detections = heads.detections_per_img
  out.update(_padded_detections(result, detections))
  out["masks"] = np.stack([_pad(r["masks"][:, 0].numpy(), detections, 0.0) for r in result])
  out["original_boxes"] = np.stack([_pad(r["boxes"].numpy(), detections, 0.0) for r in pasted])
  for i, r in enumerate(pasted):  # images of different sizes: one key each
    out[f"pasted_{i}"] = r["masks"][:, 0].numpy()
  return out


def run_detections(heads, features, proposals, image_shapes, detections_per_img):
  """Only the detections (padded to ``detections_per_img``), with another detection limit."""
  limit, heads.detections_per_img = heads.detections_per_img, detections_per_img
  try:
    with torch.no_grad():
      result, _ = heads(*torch_inputs(features, proposals), image_shapes)
  finally:
    heads.detections_per_img = limit
  return _padded_detections(result, detections_per_img)


def _padded_detections(result, detections):
  out = {}
  for key, fill in [("boxes", 0.0), ("scores", 0.0), ("labels", 0)]:
    out[key] = np.stack([_pad(r[key].numpy(), detections, fill) for r in result])
  out["count"] = np.array([len(r["boxes"]) for r in result])
  return out


class _EvalTransform:
  training = False


def _pad(x, size, fill):
  padded = np.full((size, *x.shape[1:]), fill, x.dtype)
  padded[: len(x)] = x
  return padded


def make_targets(rng, image_shape, num_classes, count=3):
  """Ground truth: ``count`` boxes with labels, and an ellipse mask filling each box."""
  h, w = image_shape
  boxes = random_boxes(rng, image_shape, count, low=60.0, high=250.0)
  labels = rng.integers(1, num_classes, count)
  yy, xx = np.mgrid[:h, :w] + 0.5
  masks = []
  for x1, y1, x2, y2 in boxes:
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    masks.append(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0)
  return boxes, labels, np.stack(masks).astype(np.uint8)


def jittered(rng, boxes, count, scale=0.1):
  """Proposals near the ground truth (most overlap it with IoU >= 0.5)."""
  picks = boxes[rng.integers(0, len(boxes), count)]
  size = np.concatenate([picks[:, 2:] - picks[:, :2]] * 2, 1)
  return (picks + rng.normal(0, scale, picks.shape) * size).astype(np.float32)


def run_train(heads, features, proposals, image_shapes, targets, seed=0):
  """Training mode: torchvision samples the proposals (seeded); the losses and their gradients
  with respect to every head weight, computed by ``RoIHeads.forward`` on those samples."""
  feats, props = torch_inputs(features, proposals)
  tgts = [
    {
      "boxes": torch.tensor(b),
      "labels": torch.tensor(lab, dtype=torch.int64),
      "masks": torch.tensor(m),
    }
    for b, lab, m in targets
  ]
  heads.train()
  torch.manual_seed(seed)
  samples = heads.select_training_samples(props, tgts)
  heads.select_training_samples = lambda proposals, targets: samples  # fixed samples
  heads.zero_grad()
  _, losses = heads(feats, props, image_shapes, tgts)
  sum(losses.values()).backward()
  del heads.select_training_samples
  heads.eval()
  sampled, matched, labels, regression = samples
  out = {
    "sampled_proposals": np.stack([s.numpy() for s in sampled]),
    "matched_idxs": np.stack([m.numpy() for m in matched]),
    "labels": np.stack([lab.numpy() for lab in labels]),
    "regression_targets": np.stack([r.numpy() for r in regression]),
  }
  out.update({f"loss_{k[5:]}": v.detach().numpy() for k, v in losses.items()})
  grads = {f"grad.{name}": p.grad.numpy().copy() for name, p in heads.named_parameters()}
  return out, grads
