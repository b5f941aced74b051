"""Times roi_pool forward and forward+backward, side by side with torchvision.

    python benchmarks/bench_roi_pool.py [--repeats 20] [--json out.json]

Each JAX function is jit-compiled and run once before timing; the figure is
the median wall time of ``--repeats`` runs (``block_until_ready``). When
torch/torchvision are importable, ``torchvision.ops.roi_pool`` (NCHW, CPU, its
default threads) runs on the same data in the same process. Boxes imitate
region proposals: centers uniform over the image, widths and heights
log-uniform between 16 px and the image size, clipped to the image.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from common import machine, median_ms, ms, proposals, ratio, torch_timings

from roipool_jax import roi_pool

CONFIGS = [
  # name, (N, H, W, C), K, output size, spatial scale
  ("Fast R-CNN VGG16", (2, 38, 63, 512), 128, 7, 1 / 16),
  ("article (Fast R-CNN 512x512)", (1, 16, 16, 512), 2000, 3, 1 / 32),
]


def bench_jax(features, boxes, indices, size, scale, repeats):
  fwd = jax.jit(lambda x, b, i: roi_pool(x, b, size, spatial_scale=scale, box_indices=i))
  cot = jnp.ones(fwd(features, boxes, indices).shape, features.dtype)

  def loss(x, b, i):
    return jnp.vdot(roi_pool(x, b, size, spatial_scale=scale, box_indices=i), cot)

  grad = jax.jit(jax.grad(loss))
  jax.block_until_ready(fwd(features, boxes, indices))
  jax.block_until_ready(grad(features, boxes, indices))
  return (
    median_ms(lambda: jax.block_until_ready(fwd(features, boxes, indices)), repeats),
    median_ms(lambda: jax.block_until_ready(grad(features, boxes, indices)), repeats),
  )


def bench_torch(features, boxes, indices, size, scale, repeats):
  try:
    import torchvision
  except ImportError:
    return None
  return torch_timings(
    lambda x, rois: torchvision.ops.roi_pool(x, rois, size, scale),
    features,
    boxes,
    indices,
    repeats,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--json", help="also write the results to this JSON file")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  rows = []
  for name, shape, k, size, scale in CONFIGS:
    n, h, w, c = shape
    features = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
    boxes, indices = proposals(rng, k, n, h / scale, w / scale)
    j_fwd, j_both = bench_jax(features, boxes, indices, size, scale, args.repeats)
    t = bench_torch(features, boxes, indices, size, scale, args.repeats)
    rows.append(
      dict(
        config=name,
        shape=shape,
        rois=k,
        output=size,
        scale=scale,
        jax_fwd_ms=j_fwd,
        jax_fwd_bwd_ms=j_both,
        torch_fwd_ms=t and t[0],
        torch_fwd_bwd_ms=t and t[1],
      )
    )

  print(f"roi_pool on {machine()}, median of {args.repeats}")
  print(
    "| config | features NHWC | RoIs | out | jax fwd ms | torchvision fwd ms | speed-up "
    "| jax fwd+bwd ms | torchvision fwd+bwd ms | speed-up |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    tf, tb = ms(r["torch_fwd_ms"]), ms(r["torch_fwd_bwd_ms"])
    print(
      f"| {r['config']} | {'x'.join(map(str, r['shape']))} | {r['rois']} | "
      f"{r['output']}x{r['output']} | {r['jax_fwd_ms']:.1f} | {tf} | "
      f"{ratio(r['jax_fwd_ms'], r['torch_fwd_ms'])} | {r['jax_fwd_bwd_ms']:.1f} | {tb} | "
      f"{ratio(r['jax_fwd_bwd_ms'], r['torch_fwd_bwd_ms'])} |"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
