"""Box refinement by gradient ascent through Precise RoI Pooling (IoU-Net's refinement).

    python examples/refine_box.py [--steps 60]

A synthetic map is +1 inside a target rectangle and -1 elsewhere (smoothed
by the bilinear interpolation the ops use). The score of a box is the
integral of the map over the box: the box's mean value (``precise_roi_pool``
with a single bin) times its area. The score is largest when the box is the
target, so gradient ascent on the box coordinates moves a rough box onto it.

``precise_roi_pool`` is a continuous function of the box with an exact
gradient, so the box moves onto the target. ``roi_pool`` snaps boxes to
whole cells: the pooled mean has a zero box gradient, only the area factor
moves the box, and it grows without regard to the target.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import roipool_jax

SIZE = 64  # map and image size (spatial_scale = 1)
TARGET = np.array([19.5, 13.5, 47.5, 40.5])  # x1, y1, x2, y2: where the map crosses 0
START = np.array([8.0, 22.0, 35.0, 55.0])


def score_map() -> jnp.ndarray:
  """``[1, SIZE, SIZE, 1]``: +1 on the target's cells, -1 elsewhere."""
  y, x = np.mgrid[:SIZE, :SIZE]
  x1, y1, x2, y2 = TARGET
  inside = (x > x1) & (x < x2) & (y > y1) & (y < y2)
  return jnp.asarray(np.where(inside, 1.0, -1.0), jnp.float32)[None, :, :, None]


def score(op, features, box):
  """Integral of the map over ``box [4]``: mean value (one bin) times area."""
  mean = op(features, box[None], 1)[0, 0, 0, 0]
  return mean * (box[2] - box[0]) * (box[3] - box[1])


def iou(a, b) -> float:
  lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
  inter = np.prod(np.clip(hi - lo, 0, None))
  return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def refine(op=roipool_jax.precise_roi_pool, steps=60, step_size=0.02):
  """Gradient ascent on the box; returns the list of boxes, one per step (the start first)."""
  features = score_map()
  grad = jax.jit(jax.grad(lambda b: score(op, features, b)))
  box, boxes = jnp.asarray(START), [np.asarray(START)]
  for _ in range(steps):
    box = box + step_size * grad(box)
    boxes.append(np.asarray(box))
  return boxes


def mean_gradient(op, box=START) -> np.ndarray:
  """``d (pooled mean) / d box``: zero for ``roi_pool``, exact for ``precise_roi_pool``."""
  features = score_map()
  return np.asarray(jax.grad(lambda b: op(features, b[None], 1)[0, 0, 0, 0])(jnp.asarray(box)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  for name in ("precise_roi_pool", "roi_pool"):
    boxes = refine(getattr(roipool_jax, name), args.steps)
    print(
      f"{name}: d(pooled mean)/d(box) at the start = {mean_gradient(getattr(roipool_jax, name))}"
    )
    for step in range(0, args.steps + 1, max(1, args.steps // 6)):
      print(f"  step {step:3d}  box {np.round(boxes[step], 1)}  IoU {iou(boxes[step], TARGET):.3f}")


if __name__ == "__main__":
  main()
