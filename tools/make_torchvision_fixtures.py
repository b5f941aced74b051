"""Writes the torchvision parity fixtures used by the tests (tests/fixtures/*.npz).

Needs torch and torchvision (``pip install -e ".[torch]"``); the tests only
read the committed .npz files, so CI never needs torch. Run from the repo root:

    python tools/make_torchvision_fixtures.py

Every case stores NHWC features, the flat boxes, their image indices, the
options, torchvision's output (converted to NHWC) and torchvision's gradient
with respect to the features for a fixed random cotangent. Besides the
hand-written cases, each file holds the cases of :data:`FUZZED`, drawn by
``tools/fuzz_torchvision.py`` (named ``fuzz_<seed>_<index>``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import torchvision

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
# Cases of tools/fuzz_torchvision.py kept as fixtures: (seed, index) pairs of its
# draw(), stored in float32 as fuzz_<seed>_<index> next to the op's other cases.
FUZZED = ((0, 274), (0, 733), (0, 752), (0, 825), (0, 901))
FILES = {
  "roi_pool": "torchvision_roi_pool.npz",
  "roi_align": "torchvision_roi_align.npz",
  "multi_scale_roi_align": "torchvision_multiscale.npz",
  "ps_roi_pool": "torchvision_position_sensitive.npz",
  "ps_roi_align": "torchvision_position_sensitive.npz",
}


def run_torchvision(op, maps, boxes, indices, seed, absolute=False):
  """Runs ``op(maps, boxes, indices)`` on torch tensors (maps NCHW) and its backward.

  Returns torchvision's NHWC output, the NHWC gradient of each map and the NHWC
  cotangent: standard normal from ``seed``, in the boxes' dtype, or its
  magnitude with ``absolute`` (the gradient then sums, in each cell, the
  magnitudes of the terms added there).
  """
  xs = [torch.tensor(m).permute(0, 3, 1, 2).contiguous().requires_grad_(True) for m in maps]
  y = op(xs, torch.tensor(boxes), torch.tensor(indices))
  cotangent = np.random.default_rng(seed).standard_normal(y.shape).astype(boxes.dtype)
  if absolute:
    cotangent = np.abs(cotangent)
  y.backward(torch.tensor(cotangent))
  nhwc = lambda t: t.detach().permute(0, 2, 3, 1).numpy()  # noqa: E731
  return nhwc(y), [nhwc(x.grad) for x in xs], cotangent.transpose(0, 2, 3, 1)


def with_rois(op):
  """``op(x, rois)`` of one map as ``op(maps, boxes, indices)``: rois are ``[K, 5]``."""

  def run(maps, boxes, indices):
    return op(maps[0], torch.cat([indices.to(boxes.dtype)[:, None], boxes], 1))

  return run


def _case(op, features, boxes, indices, output_size, scale, seed, **extra):
  """One fixture case: the inputs, the options and torchvision's output and gradient."""
  boxes = np.asarray(boxes, np.float32)
  indices = np.asarray(indices, np.int32)
  out, (grad,), cot = run_torchvision(with_rois(op), [features], boxes, indices, seed)
  return dict(
    features=features,
    boxes=boxes,
    box_indices=indices,
    output_size=np.array(output_size),
    spatial_scale=np.float32(scale),
    output=out,
    grad=grad,
    cotangent=cot,
    **extra,
  )


def roi_pool_cases():
  rng = np.random.default_rng(1234)
  cases = {}

  def add(name, features, boxes, indices, output_size, scale):
    op = lambda x, r: torchvision.ops.roi_pool(x, r, output_size, scale)  # noqa: E731
    cases[name] = _case(op, features, boxes, indices, output_size, scale, len(cases))

  # Random boxes on several images, VGG-like scale.
  feats = rng.standard_normal((2, 12, 15, 3)).astype(np.float32)
  xy = rng.uniform(-20, 240, (24, 2))
  wh = rng.uniform(0, 160, (24, 2))
  add(
    "random_two_images",
    feats,
    np.concatenate([xy, xy + wh], 1),
    rng.integers(0, 2, 24),
    (3, 4),
    1 / 16,
  )
  # .5 rounding traps: scaled corners land exactly on halves (C round goes away from 0).
  feats = rng.standard_normal((1, 10, 10, 2)).astype(np.float32)
  halves = np.array(
    [
      [0.5, 1.5, 2.5, 3.5],
      [1.5, 2.5, 6.5, 7.5],
      [2.5, 0.5, 8.5, 9.5],
      [4.5, 4.5, 4.5, 4.5],
      [-0.5, -1.5, 3.5, 2.5],
      [0.49999997, 1.4999999, 5.5, 6.5],
    ]
  )
  add("half_rounding_scale1", feats, halves, np.zeros(6), (2, 3), 1.0)
  add("half_rounding_scale_half", feats, halves * 2, np.zeros(6), 3, 0.5)
  # Ties: ReLU zeros and small integers, so the first-arg-max rule decides the gradient.
  feats = np.maximum(rng.integers(-3, 3, (1, 9, 11, 4)), 0).astype(np.float32)
  add(
    "ties_relu_integers",
    feats,
    [[0, 0, 10, 8], [2, 1, 7, 7], [1, 1, 3, 2], [0, 0, 40, 30]],
    np.zeros(4),
    (3, 3),
    1.0,
  )
  # Degenerate: tiny, zero-size, inverted, partly and fully outside the map.
  feats = rng.standard_normal((1, 8, 8, 2)).astype(np.float32)
  add(
    "degenerate",
    feats,
    [
      [3, 3, 3, 3],
      [3.2, 3.1, 3.3, 3.2],
      [6, 6, 2, 2],
      [-10, -10, 2, 3],
      [20, 20, 30, 30],
      [-5, 2, 40, 5],
      [7, 7, 9, 9],
      [0, 0, 7, 7],
    ],
    np.zeros(8),
    (4, 2),
    1.0,
  )
  # A 1x1 map.
  add(
    "one_by_one_map",
    rng.standard_normal((2, 1, 1, 3)).astype(np.float32),
    [[0, 0, 5, 5], [0, 0, 0, 0], [-3, -3, 8, 8]],
    [0, 1, 1],
    (2, 2),
    0.25,
  )
  # The article's setting, small: 16x16 map, scale 1/32, 3x3 output.
  feats = rng.standard_normal((1, 16, 16, 2)).astype(np.float32)
  add(
    "article",
    feats,
    [[296, 192, 496, 337], [0, 0, 511, 511], [100, 50, 180, 400]],
    np.zeros(3),
    3,
    1 / 32,
  )
  # Bin edges where float32 division rounding matters (e.g. 22 / 7).
  feats = rng.standard_normal((1, 40, 40, 1)).astype(np.float32)
  b = np.array([[0, 0, w - 1, w - 1] for w in range(1, 40)], np.float32)
  add("division_edges", feats, b, np.zeros(len(b)), (7, 7), 1.0)
  return cases


def roi_align_cases():
  """aligned x sampling_ratio in {-1, 1, 2, 3}, each over a mixed box set."""
  rng = np.random.default_rng(4321)
  feats = rng.standard_normal((2, 9, 12, 3)).astype(np.float32)
  k = 20
  xy = rng.uniform(-40, 200, (k, 2))
  wh = rng.uniform(1, 120, (k, 2))
  random_boxes = np.concatenate([xy, xy + wh], 1)
  special = np.array(
    [
      [50, 40, 50, 40],  # zero size
      [50.2, 40.1, 50.9, 40.3],  # tiny
      [-300, -250, 500, 420],  # much larger than the map (adaptive grid ~ 10+)
      [-60, -60, 5, 5],  # mostly outside, top-left
      [170, 130, 260, 190],  # partly outside, bottom-right
      [300, 300, 400, 400],  # fully outside
      [0, 0, 192, 144],  # the whole map exactly
      [7.99, 15.99, 100.01, 72.5],  # edges near cell borders
    ]
  )
  # (Inverted boxes are left out: roipool_jax deliberately gives them zeros.)
  cases = {}

  def add(name, features, boxes, indices, size, scale, ratio, aligned):
    def op(x, r):
      return torchvision.ops.roi_align(x, r, size, scale, ratio, aligned)

    options = dict(sampling_ratio=np.int32(ratio), aligned=np.bool_(aligned))
    cases[name] = _case(op, features, boxes, indices, size, scale, len(cases), **options)

  for aligned in (False, True):
    for ratio in (-1, 1, 2, 3):
      boxes = np.concatenate([random_boxes, special])
      indices = rng.integers(0, 2, len(boxes))
      add(
        f"aligned{int(aligned)}_ratio{ratio}", feats, boxes, indices, (3, 4), 1 / 16, ratio, aligned
      )
  # FPN P2-like scale, 7x7, and a single-row map.
  for name, shape, scale in (("p2_scale", (1, 20, 24, 2), 0.25), ("one_row", (1, 1, 6, 2), 1.0)):
    f = rng.standard_normal(shape).astype(np.float32)
    boxes = np.concatenate([rng.uniform(-8, 60, (6, 2)), rng.uniform(60, 110, (6, 2))], 1)
    for aligned in (False, True):
      add(f"{name}_aligned{int(aligned)}", f, boxes, np.zeros(6), (7, 7), scale, -1, aligned)
  # Whole-pixel boxes at scale 1/3: x2 * s - x1 * s rounds twice in C (44 to 56 px spans
  # 4.000001 cells, so 2 bins take 3 samples each), which an FMA would not.
  f = rng.standard_normal((1, 24, 24, 2)).astype(np.float32)
  lo = np.tile(np.arange(0.0, 60.0), 2)
  hi = lo + np.repeat([12.0, 18.0], 60)
  boxes = np.stack([lo, lo[::-1], hi, lo[::-1] + 7], axis=1)
  for aligned in (False, True):
    add(f"third_scale_aligned{int(aligned)}", f, boxes, np.zeros(120), (3, 2), 1 / 3, -1, aligned)
  return cases


def multiscale_cases():
  """torchvision.ops.MultiScaleRoIAlign over P2..P5 of a 256x320 batch (and P3..P5)."""
  rng = np.random.default_rng(99)
  image_shapes = [(256, 320), (240, 300)]
  sizes = [(64, 80), (32, 40), (16, 20), (8, 10)]
  pyramid = [rng.standard_normal((2, h, w, 3)).astype(np.float32) for h, w in sizes]
  k = 24
  centers = rng.uniform(0, 1, (k, 2)) * [320, 256]
  sides = np.exp(rng.uniform(np.log(8), np.log(700), (k, 2)))  # every level, and clamping
  boxes = np.concatenate([centers - sides / 2, centers + sides / 2], 1)
  # Exactly canonical (224 px -> level 4), a zero-area box and a tiny one.
  boxes = np.concatenate([boxes, [[10, 10, 234, 234], [5, 5, 5, 40], [3, 3, 4, 4]]])
  boxes = boxes.astype(np.float32)
  indices = rng.integers(0, 2, len(boxes)).astype(np.int32)
  order = np.argsort(indices, kind="stable")  # torchvision returns the boxes image by image
  boxes, indices = boxes[order], indices[order]
  cases = {}
  for name, first, ratio in (("p2_p5_ratio2", 0, 2), ("p3_p5_adaptive", 1, -1)):
    levels = pyramid[first:]
    out, grads, cot = run_torchvision(
      pyramid_op(len(levels), 7, ratio, image_shapes), levels, boxes, indices, len(cases)
    )
    case = dict(
      boxes=boxes,
      box_indices=indices,
      image_size=np.array([256, 320]),
      output_size=np.array([7, 7]),
      sampling_ratio=np.int32(ratio),
      output=out,
      cotangent=cot,
    )
    for i, (f, g) in enumerate(zip(levels, grads, strict=True)):
      case[f"features{i}"] = f
      case[f"grad{i}"] = g
    cases[name] = case
  return cases


def pyramid_op(levels, output_size, sampling_ratio, image_shapes):
  """``torchvision.ops.MultiScaleRoIAlign`` as ``op(maps, boxes, indices)``.

  The boxes must be grouped by image, in image order: the output rows follow them.
  """
  names = [f"p{i}" for i in range(levels)]
  pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio)

  def run(maps, boxes, indices):
    per_image = [boxes[indices == n] for n in range(maps[0].shape[0])]
    return pooler(dict(zip(names, maps, strict=True)), per_image, image_shapes)

  return run


def position_sensitive_cases():
  """ps_roi_pool and ps_roi_align: random, large, tiny and outside boxes, C = C_out * oh * ow.

  ``ps_roi_pool`` cases named ``inside_*`` keep every bin off the map's last
  row and column, where torchvision's backward agrees with its forward (it
  clips bins to ``H`` while its forward clips them to ``H - 1``); the tests
  compare gradients with torchvision there only.
  """
  rng = np.random.default_rng(2468)
  cases = {}

  def add(name, op, features, boxes, indices, size, scale, **extra):
    cases[name] = _case(op, features, boxes, indices, size, scale, len(cases), **extra)

  size, scale = (3, 2), 1 / 8
  feats = rng.standard_normal((2, 10, 13, 4 * 6)).astype(np.float32)
  k = 24
  xy = rng.uniform(-40, 110, (k, 2))
  wh = rng.uniform(0, 90, (k, 2))
  mixed = np.concatenate(
    [
      np.concatenate([xy, xy + wh], 1),
      [
        [40, 40, 40, 40],  # zero size
        [41, 33, 42.5, 34],  # tiny
        [-200, -150, 300, 260],  # much larger than the map
        [-60, -60, 4, 4],  # mostly outside
        [120, 90, 200, 150],  # partly outside, bottom-right
        [300, 300, 400, 400],  # fully outside
        [0, 0, 104, 80],  # the whole map
        [4, 4, 100, 76],  # rounding halves at scale 1/8
      ],
    ]
  ).astype(np.float32)
  indices = rng.integers(0, 2, len(mixed))

  def pool(x, r):
    return torchvision.ops.ps_roi_pool(x, r, size, scale)

  add("pool_mixed", pool, feats, mixed, indices, size, scale)
  corner = rng.uniform(0, 40, (k, 2))
  inside = np.concatenate([corner, corner + rng.uniform(0, 28, (k, 2))], 1)
  add("pool_inside", pool, feats, inside, indices[:k], size, scale)
  feats7 = rng.standard_normal((1, 12, 12, 2 * 49)).astype(np.float32)
  inside7 = [[0, 0, 10, 10], [1, 2, 9, 5], [3, 3, 4, 4], [2, 0, 10, 3], [0, 0, 5, 10]]

  def pool7(x, r):
    return torchvision.ops.ps_roi_pool(x, r, 7, 1.0)

  add("pool_inside_7x7", pool7, feats7, inside7, np.zeros(5), (7, 7), 1.0)
  add("pool_edges_7x7", pool7, feats7, [[0, 0, 11, 11], [5, 5, 30, 30]], np.zeros(2), (7, 7), 1.0)
  positive = mixed[np.all(mixed[:, 2:] > mixed[:, :2], axis=1)]  # no zero-size box
  for ratio in (-1, 1, 2):
    boxes = positive if ratio <= 0 else mixed

    def align(x, r, ratio=ratio):
      return torchvision.ops.ps_roi_align(x, r, size, scale, ratio)

    n = len(boxes)
    add(f"align_ratio{ratio}", align, feats, boxes, indices[:n], size, scale, sampling_ratio=ratio)

  def align7(x, r):
    return torchvision.ops.ps_roi_align(x, r, 7, 0.5, -1)

  boxes7 = [[0, 0, 24, 24], [3, 5, 18, 9], [-6, -6, 40, 40], [10.3, 2.2, 11.9, 23.7]]
  add("align_7x7", align7, feats7, boxes7, np.zeros(4), (7, 7), 0.5, sampling_ratio=-1)
  return cases


def fuzzed_cases():
  """``{file: {name: case}}`` for the :data:`FUZZED` cases, with torchvision's results."""
  import fuzz_torchvision  # here, not at the top: it imports this module

  files = {}
  for seed, index in FUZZED:
    case = fuzz_torchvision.draw(seed, index)
    for key, value in case.items():
      if isinstance(value, np.ndarray) and value.dtype == np.float64:
        case[key] = value.astype(np.float32)
    op = fuzz_torchvision.torchvision_op(case)
    maps = fuzz_torchvision.maps_of(case)
    out, grads, cot = run_torchvision(op, maps, case["boxes"], case["box_indices"], index)
    case.update(output=out, cotangent=cot)
    case.update({"grad" if "features" in case else f"grad{i}": g for i, g in enumerate(grads)})
    prefix = {"ps_roi_pool": "pool_", "ps_roi_align": "align_"}.get(case["op"], "")
    files.setdefault(FILES[case.pop("op")], {})[f"{prefix}fuzz_{seed}_{index}"] = case
  return files


def _save(cases, name):
  flat = {f"{case}/{key}": value for case, d in cases.items() for key, value in d.items()}
  path = OUT / name
  np.savez_compressed(path, **flat)
  print(f"wrote {len(cases)} cases to {path} (torchvision {torchvision.__version__})")


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  files = {
    FILES["roi_pool"]: roi_pool_cases(),
    FILES["roi_align"]: roi_align_cases(),
    FILES["multi_scale_roi_align"]: multiscale_cases(),
    FILES["ps_roi_pool"]: position_sensitive_cases(),
  }
  for name, cases in fuzzed_cases().items():
    files[name].update(cases)
  for name, cases in files.items():
    _save(cases, name)


if __name__ == "__main__":
  main()
