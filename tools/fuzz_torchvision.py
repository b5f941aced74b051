"""Fuzzes roipool_jax against torchvision.ops: random maps, boxes and options, forward and gradient.

Needs torch and torchvision (``pip install -e ".[torch]"``); CI never runs it.
Run from the repo root:

    python tools/fuzz_torchvision.py --cases 200 --seed 0
    python tools/fuzz_torchvision.py --cases 50 --ops roi_align,multi_scale_roi_align --impl einsum

Each case is drawn from ``numpy.random.default_rng((seed, index))``, so a
reported ``seed/index`` pair redraws the same case on any machine. The ops,
through the public NHWC API under ``jit`` (``--impl`` picks the backend of the ops
that have one):

* ``roi_pool``, ``roi_align`` (``sampling_ratio`` in -1..3, both ``aligned``),
  ``ps_roi_align`` and ``ps_roi_pool`` (forward only: its gradient differs
  from torchvision's by design, see its docstring);
* ``multi_scale_roi_align`` over 1-4 consecutive levels from P2 or P3 of a
  random image size, with RPN-like boxes (log-uniform sides, 2-900 px).

Maps are up to 47 x 47 with up to 400 boxes and 64 channels, so the ops run
several chunks; float32 and float64 (``jax_enable_x64``); spatial scales 1,
1/2, 1/3, 1/4, 1/16 and 2; features rounded to integers a third of the time
(ties decide the max gradient). Boxes are random, whole-pixel, zero-size,
much larger than the map or outside it; inverted only for the max ops (the
align ops give them zeros, a documented difference).

A mismatch prints the case's ``seed/index``. To keep one as a regression
fixture, add the pair to ``FUZZED`` in ``tools/make_torchvision_fixtures.py``
and rerun that script: the case is stored (in float32) with torchvision's
output and gradient next to the hand-written ones, and the parity tests run it.
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torchvision  # noqa: E402
from make_torchvision_fixtures import pyramid_op, run_torchvision, with_rois  # noqa: E402

import roipool_jax  # noqa: E402

OPS = ("roi_pool", "roi_align", "ps_roi_pool", "ps_roi_align", "multi_scale_roi_align")
SCALES = (1.0, 0.5, 1 / 3, 0.25, 1 / 16, 2.0)
MAX_OPS = ("roi_pool", "ps_roi_pool")  # the ops that define inverted boxes as torchvision does


def _boxes(rng, k, image_h, image_w, op):
  """``[k, 4]`` float64 boxes in image pixels, one kind of degeneracy per case."""
  kind = rng.integers(0, 5)
  center = rng.uniform(-0.3, 1.3, (k, 2)) * [image_w, image_h]
  side = np.exp(rng.uniform(np.log(0.1), np.log(3 * max(image_h, image_w)), (k, 2)))
  if kind == 1 and op in MAX_OPS:
    side = -0.3 * side  # inverted
  if kind == 2:
    side[: k // 2] = 0  # zero size
  if kind == 3:  # whole pixels: the edges where rounding in the scaling shows
    center, side = np.round(center), np.round(side)
  return np.concatenate([center - side / 2, center + side / 2], 1)


def draw(seed: int, index: int) -> dict:
  """Case ``index`` of ``seed``: inputs and options, in the fixture format (NHWC)."""
  rng = np.random.default_rng((seed, index))
  op = OPS[index % len(OPS)]
  dtype = (np.float32, np.float64)[rng.integers(0, 2)]
  n = int(rng.integers(1, 4))
  oh = int(rng.integers(1, 8))
  ow = oh if rng.random() < 0.5 else int(rng.integers(1, 8))
  case = dict(op=op, output_size=np.array([oh, ow]))
  if op == "multi_scale_roi_align":
    image = rng.integers(48, 700, 2)
    first, levels = int(rng.integers(2, 4)), int(rng.integers(1, 5))
    strides = 2 ** np.arange(first, first + levels)
    # Both libraries infer each level's scale as 2**round(log2(map / image)); where a
    # small odd image rounds a level to the wrong power, neither takes the pyramid.
    # Such images are made a multiple of the largest stride.
    inferred = 2.0 ** np.round(np.log2(-(-image[:, None] // strides) / image[:, None]))
    if np.any(inferred != 1 / strides):
      image = -(-image // strides[-1]) * strides[-1]
    channels = int(rng.integers(1, 4))
    for i, stride in enumerate(strides):
      shape = (n, -(-image[0] // stride), -(-image[1] // stride), channels)
      case[f"features{i}"] = rng.standard_normal(shape).astype(dtype)
    k = int(rng.integers(1, 200))
    center = rng.uniform(0, 1, (k, 2)) * image[::-1]
    side = np.exp(rng.uniform(np.log(2), np.log(900), (k, 2)))
    if rng.random() < 0.5:
      center, side = np.round(center), np.round(side)
    boxes = np.concatenate([center - side / 2, center + side / 2], 1)
    indices = np.sort(rng.integers(0, n, k))  # grouped by image, as torchvision returns them
    case.update(image_size=image, sampling_ratio=np.int32(rng.choice([-1, 0, 1, 2])))
  else:
    height, width = (int(v) for v in rng.integers(1, 48, 2))
    scale = float(rng.choice(SCALES))
    groups = int(rng.integers(1, 4))
    channels = groups * oh * ow if op.startswith("ps_") else int(rng.choice([1, 3, 16, 64]))
    features = rng.standard_normal((n, height, width, channels))
    if rng.random() < 0.3:
      features = np.round(features)
    boxes = _boxes(rng, int(rng.integers(1, 400)), height / scale, width / scale, op)
    case.update(features=features.astype(dtype), spatial_scale=np.float64(scale))
    if op in ("roi_align", "ps_roi_align"):
      case["sampling_ratio"] = np.int32(rng.choice([-1, 0, 1, 2, 3]))
    if op == "roi_align":
      case["aligned"] = np.bool_(rng.integers(0, 2))
    indices = rng.integers(0, n, len(boxes))
  case["boxes"] = boxes.astype(dtype)
  case["box_indices"] = indices.astype(np.int32)
  return case


def maps_of(case: dict) -> list[np.ndarray]:
  """The case's feature maps: one, or a pyramid's levels in order."""
  if "features" in case:
    return [case["features"]]
  return [case[f"features{i}"] for i in range(sum(k.startswith("features") for k in case))]


def torchvision_op(case: dict):
  """torchvision's op with the case's options, as ``op(maps, boxes, indices)``."""
  op, size = case["op"], tuple(int(s) for s in case["output_size"])
  if op == "multi_scale_roi_align":
    image = tuple(int(s) for s in case["image_size"])
    images = maps_of(case)[0].shape[0]
    return pyramid_op(len(maps_of(case)), size, int(case["sampling_ratio"]), [image] * images)
  scale = float(case["spatial_scale"])
  options = {"aligned": bool(case["aligned"])} if "aligned" in case else {}
  ratio = (int(case["sampling_ratio"]),) if "sampling_ratio" in case else ()
  fn = getattr(torchvision.ops, op)
  return with_rois(lambda x, rois: fn(x, rois, size, scale, *ratio, **options))


def roipool_op(case: dict, impl: str = "auto"):
  """``op(maps, boxes, box_indices)`` with roipool_jax's op and the case's options (NHWC).

  ``impl`` goes to every op that has one (all but ``ps_roi_pool``).
  """
  op, size = case["op"], tuple(int(s) for s in case["output_size"])
  options = {} if op == "ps_roi_pool" else {"impl": impl}
  if "sampling_ratio" in case:
    options["sampling_ratio"] = int(case["sampling_ratio"])
  if "aligned" in case:
    options["aligned"] = bool(case["aligned"])
  if op == "multi_scale_roi_align":
    options["image_size"] = tuple(int(s) for s in case["image_size"])
  else:
    options["spatial_scale"] = float(case["spatial_scale"])
  fn = getattr(roipool_jax, op)
  if op == "multi_scale_roi_align":
    return lambda maps, boxes, indices: fn(maps, boxes, size, box_indices=indices, **options)
  return lambda maps, boxes, indices: fn(maps[0], boxes, size, box_indices=indices, **options)


def roipool_result(case: dict, cotangent: np.ndarray, impl: str = "auto"):
  """roipool_jax's output and feature gradients under ``jit``."""
  fn = roipool_op(case, impl)

  @jax.jit
  def run(maps, boxes, indices, cot):
    out, vjp = jax.vjp(lambda m: fn(m, boxes, indices), maps)
    return out, vjp(cot)[0]

  maps = [jnp.asarray(m) for m in maps_of(case)]
  out, grads = run(maps, jnp.asarray(case["boxes"]), jnp.asarray(case["box_indices"]), cotangent)
  return np.asarray(out), [np.asarray(g) for g in grads]


def check(case: dict, impl: str = "auto") -> list[str]:
  """The ways roipool_jax differs from torchvision on ``case`` (empty: it agrees).

  ``roi_pool``'s output must match exactly, the others' within 1e-4 (float32)
  or 1e-10 (float64). Gradients add many terms per cell, in another order than
  torchvision's, so each cell may differ by ``64 * eps`` times the sum of the
  magnitudes of the terms added there.
  """
  op, maps = torchvision_op(case), maps_of(case)
  boxes, indices = case["boxes"], case["box_indices"]
  expected, expected_grads, cotangent = run_torchvision(op, maps, boxes, indices, seed=0)
  out, grads = roipool_result(case, cotangent, impl)
  tol = 0.0 if case["op"] == "roi_pool" else (1e-4 if boxes.dtype == np.float32 else 1e-10)
  if case["op"] == "ps_roi_align":  # torchvision's empty bins divide 0 by 0
    expected = np.nan_to_num(expected, nan=0.0)
  problems = []
  if not np.allclose(out, expected, rtol=tol, atol=tol, equal_nan=True):
    problems.append(f"output off by up to {np.nanmax(np.abs(out - expected)):.3g}")
  if case["op"] != "ps_roi_pool":  # its gradient differs by design
    _, magnitudes, _ = run_torchvision(op, maps, boxes, indices, seed=0, absolute=True)
    eps = np.finfo(boxes.dtype).eps
    for i, (g, e, m) in enumerate(zip(grads, expected_grads, magnitudes, strict=True)):
      if np.any(np.abs(g - e) > 64 * eps * m):
        problems.append(f"gradient {i} off by up to {np.abs(g - e).max():.3g}")
  return problems


def describe(case: dict) -> str:
  maps = " + ".join("x".join(str(d) for d in m.shape) for m in maps_of(case))
  options = {
    k: v.tolist()
    for k, v in case.items()
    if k in ("output_size", "spatial_scale", "sampling_ratio", "aligned", "image_size")
  }
  return f"{case['op']} {case['boxes'].dtype} maps {maps}, {len(case['boxes'])} boxes, {options}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cases", type=int, default=100)
  parser.add_argument("--start", type=int, default=0, help="first case index")
  parser.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of the ops")
  parser.add_argument("--impl", default="auto", choices=("auto", "gather", "einsum"))
  args = parser.parse_args()
  ops = set(args.ops.split(","))
  if ops - set(OPS):
    parser.error(f"unknown ops {sorted(ops - set(OPS))}; choose from {OPS}")
  checked = failed = 0
  for index in range(args.start, args.start + args.cases * len(OPS)):
    if checked == args.cases:
      break
    case = draw(args.seed, index)
    if case["op"] not in ops:
      continue
    checked += 1
    problems = check(case, args.impl)
    if problems:
      failed += 1
      print(f"MISMATCH {args.seed}/{index}: {describe(case)}: {'; '.join(problems)}", flush=True)
  print(f"torchvision {torchvision.__version__}: {checked} cases, {failed} mismatches")
  raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
  main()
