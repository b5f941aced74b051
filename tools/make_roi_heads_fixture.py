"""Writes tests/fixtures/torchvision_roi_heads.npz: torchvision's Mask R-CNN RoI heads, end to end.

Needs torch and torchvision (``pip install -e ".[torch]"``); the tests only read the committed
file. Run from the repo root:

    python tools/make_roi_heads_fixture.py

It builds torchvision's ``RoIHeads`` (FPN ``MultiScaleRoIAlign``, ``TwoMLPHead``,
``FastRCNNPredictor``, ``MaskRCNNHeads``, ``MaskRCNNPredictor``) with narrow layers and seeded
weights, runs it on a seeded pyramid and proposals for two images of different sizes and saves,
under ``section/name`` keys:

- ``weights/*``: the ``state_dict``;
- ``inputs/*``: NHWC levels, proposals, image shapes, original image sizes, and the training
  targets (boxes, labels, masks per image);
- ``eval/*``: pooled features, logits, deltas, the detections (padded to 100 with a count),
  the mask probabilities, and after the transform's postprocess the boxes in the original images
  and the pasted masks;
- ``eval_600/*``: the detections again with a limit of 600, which every image stays under;
- ``train/*``: torchvision's sampled proposals with their labels, matched ground truth and
  regression targets, the three losses, and ``grad.*``: their sum's gradient for every weight.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from examples.torchvision_heads import torch_reference as ref  # noqa: E402

OUT = (
  pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torchvision_roi_heads.npz"
)
IMAGE_SHAPES = [(480, 640), (400, 600)]
ORIGINAL_SIZES = [(60, 80), (50, 75)]


def main():
  rng = np.random.default_rng(2026)
  heads = ref.build_roi_heads(**ref.SMALL)
  features, proposals = ref.make_inputs(rng, IMAGE_SHAPES, ref.SMALL["channels"], 120)
  evaluated = ref.run_eval(heads, features, proposals, IMAGE_SHAPES, ORIGINAL_SIZES)
  unlimited = ref.run_detections(heads, features, proposals, IMAGE_SHAPES, 600)

  targets = [ref.make_targets(rng, shape, ref.SMALL["num_classes"]) for shape in IMAGE_SHAPES]
  train_proposals = np.stack(
    [
      np.concatenate([ref.jittered(rng, t[0], 30), ref.random_boxes(rng, shape, 30)])
      for t, shape in zip(targets, IMAGE_SHAPES, strict=True)
    ]
  )
  trained, grads = ref.run_train(heads, features, train_proposals, IMAGE_SHAPES, targets)
  assert trained["labels"].shape == (2, 32), trained["labels"].shape  # static samples per image
  assert (trained["labels"] > 0).any(axis=1).all(), "every image needs positives"

  arrays = {f"weights/{k}": v for k, v in ref.state_dict(heads).items()}
  inputs = {f"level{i}": f.astype(np.float16) for i, f in enumerate(features)}
  inputs.update(
    proposals=proposals,
    image_shapes=np.array(IMAGE_SHAPES),
    original_sizes=np.array(ORIGINAL_SIZES),
    train_proposals=train_proposals,
  )
  for i, (boxes, labels, masks) in enumerate(targets):
    inputs.update({f"gt_boxes_{i}": boxes, f"gt_labels_{i}": labels, f"gt_masks_{i}": masks})
  arrays.update({f"inputs/{k}": v for k, v in inputs.items()})
  arrays.update({f"eval/{k}": v for k, v in evaluated.items()})
  arrays.update({f"eval_600/{k}": v for k, v in unlimited.items()})
  arrays.update({f"train/{k}": v for k, v in {**trained, **grads}.items()})
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays)")
  print(
    "detections per image:",
    evaluated["count"],
    unlimited["count"],
    "positives:",
    (trained["labels"] > 0).sum(1),
  )


if __name__ == "__main__":
  main()
