"""Times roi_align forward and forward+backward, side by side with torchvision.

    python benchmarks/bench_roi_align.py [--repeats 10] [--json out.json]

Each JAX function is jit-compiled and run once before timing; the figure is
the median wall time of ``--repeats`` runs. forward+backward is the gradient
with respect to the features (torchvision has no box gradient). When
torch/torchvision are importable, ``torchvision.ops.roi_align`` (NCHW, CPU, its
default threads) runs on the same data in the same process. ``scratch MB`` is
the temporary memory of the compiled JAX forward+backward (XLA's memory
analysis), next to the ``K * H * W * C`` floats a per-box copy of the map
would take.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, median_ms, ms, proposals, ratio, temp_bytes, torch_timings

from roipool_jax import roi_align

CONFIGS = [
  # name, (N, H, W, C), K, output size, spatial scale, sampling ratio, aligned,
  # (min box px, max box / image)
  ("Mask R-CNN FPN P2, box head", (1, 200, 304, 256), 512, 7, 1 / 4, 2, True, (16, 1)),
  ("Mask R-CNN FPN P2, mask head", (1, 200, 304, 256), 512, 14, 1 / 4, 2, True, (16, 1)),
  ("adaptive, large boxes (P4-like)", (2, 50, 84, 256), 512, 7, 1 / 16, -1, True, (200, 1)),
  ("adaptive, boxes up to 3x the map", (2, 50, 84, 256), 512, 7, 1 / 16, -1, True, (400, 3)),
]


def bench_jax(features, boxes, indices, size, scale, ratio_, aligned, repeats):
  def op(x, b):
    return roi_align(
      x, b, size, spatial_scale=scale, sampling_ratio=ratio_, aligned=aligned, box_indices=indices
    )

  fwd = jax.jit(op)
  cot = jnp.ones(fwd(features, boxes).shape, features.dtype)
  grad = jax.jit(jax.grad(lambda x, b: jnp.vdot(op(x, b), cot)))
  jax.block_until_ready(grad(features, boxes))
  return (
    median_ms(lambda: jax.block_until_ready(fwd(features, boxes)), repeats),
    median_ms(lambda: jax.block_until_ready(grad(features, boxes)), repeats),
    temp_bytes(grad, features, boxes),
  )


def bench_torch(features, boxes, indices, size, scale, ratio_, aligned, repeats):
  try:
    import torchvision
  except ImportError:
    return None
  return torch_timings(
    lambda x, rois: torchvision.ops.roi_align(x, rois, size, scale, ratio_, aligned),
    features,
    boxes,
    indices,
    repeats,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--json", help="also write the results to this JSON file")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  rows = []
  for name, shape, k, size, scale, ratio_, aligned, (min_px, factor) in CONFIGS:
    n, h, w, c = shape
    features = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    boxes, indices = proposals(rng, k, n, h / scale, w / scale, min_px, factor)
    setting = (size, scale, ratio_, aligned, args.repeats)
    j_fwd, j_both, scratch = bench_jax(features, boxes, indices, *setting)
    t = bench_torch(features, boxes, indices, *setting)
    rows.append(
      dict(
        config=name,
        shape=shape,
        rois=k,
        output=size,
        scale=scale,
        sampling_ratio=ratio_,
        aligned=aligned,
        jax_fwd_ms=j_fwd,
        jax_fwd_bwd_ms=j_both,
        torch_fwd_ms=t and t[0],
        torch_fwd_bwd_ms=t and t[1],
        jax_scratch_mb=scratch and scratch / 2**20,
        per_box_copy_mb=k * h * w * c * 4 / 2**20,
      )
    )

  print(f"roi_align on {machine()}, median of {args.repeats}")
  print(
    "| config | features NHWC | RoIs | out | sampling | jax fwd ms | torchvision fwd ms | speed-up "
    "| jax fwd+bwd ms | torchvision fwd+bwd ms | speed-up | scratch MB (K*H*W*C MB) |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    sampling = "adaptive" if r["sampling_ratio"] <= 0 else str(r["sampling_ratio"])
    print(
      f"| {r['config']} | {'x'.join(map(str, r['shape']))} | {r['rois']} | "
      f"{r['output']}x{r['output']} | {sampling} | {r['jax_fwd_ms']:.1f} | "
      f"{ms(r['torch_fwd_ms'])} | {ratio(r['jax_fwd_ms'], r['torch_fwd_ms'])} | "
      f"{r['jax_fwd_bwd_ms']:.1f} | {ms(r['torch_fwd_bwd_ms'])} | "
      f"{ratio(r['jax_fwd_bwd_ms'], r['torch_fwd_bwd_ms'])} | "
      f"{ms(r['jax_scratch_mb'])} ({r['per_box_copy_mb']:.0f}) |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
