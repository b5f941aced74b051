"""``crop_and_resize(box_format="tf")`` against ``tf.image.crop_and_resize``: fuzzing and fixtures.

Needs TensorFlow (``pip install -e ".[tensorflow]"``); CI never runs it, the
tests read the fixtures it stores. Run from the repo root:

    python tools/tensorflow_parity.py --cases 300 --seed 1   # fuzz: compare, print mismatches
    python tools/tensorflow_parity.py --cases 30 --large     # maps up to 96 x 96, 200-900 boxes
    python tools/tensorflow_parity.py --write                # store the fixtures

Each case is drawn from ``numpy.random.default_rng((seed, index))``, so a
reported ``seed/index`` pair redraws the same case on any machine:

* images ``[N, H, W, C]`` with ``N <= 3``, ``H, W`` from 1 to 12, ``C <= 4``:
  float32 or float64 (``jax_enable_x64``), rounded to integers a third of the
  time, or uint8 (forward only: no gradient);
* up to 24 normalized ``(y1, x1, y2, x2)`` boxes of one kind per case:
  random in ``[-0.3, 1.3]``, on whole cells (multiples of ``1 / (H - 1)``,
  where a point on a cell adds nothing to the box gradient along its axis;
  float32 and uint8 only), flipped, zero-size, or much larger than the image;
* crops from 1 x 1 to 6 x 6, ``bilinear`` or ``nearest``, extrapolation
  values 0, -1.5 and 7;
* with ``--large``: maps of 24 to 96 cells a side with 16 channels, 200 to
  900 boxes and crops up to 14 x 14, where crops overlap a lot.

TensorFlow runs with op determinism: its CPU image-gradient kernel otherwise
shards the boxes over threads that add into shared cells unsynchronized, and
loses updates where crops overlap.

Compared: the output; the image gradient; the box gradient for ``bilinear``
(TensorFlow gives ``nearest`` crops the bilinear box gradient as an
approximation; roipool_jax gives them 0, a documented difference), except
for boxes where TensorFlow's box-gradient kernel, rounding the step in its
own way, puts a point on other cells than its forward kernel
(:func:`gradient_points_agree`; a few boxes in a hundred cases). The
tolerances are :func:`check`'s.

``--write`` stores cases ``0..FIXTURE_CASES-1`` of seed 0, in float32, with
TensorFlow's output and gradients, as ``tests/fixtures/tensorflow_crop_and_resize.npz``.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import roipool_jax  # noqa: E402

# See the module docstring: TensorFlow's image gradient is racy without this.
tf.config.experimental.enable_op_determinism()

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
FIXTURE_CASES = 40
METHODS = ("bilinear", "nearest")


def _boxes(rng, k, height, width, whole_cells=True):
  """``[k, 4]`` normalized ``(y1, x1, y2, x2)``, one kind of box per case."""
  kind = rng.integers(0 if whole_cells else 2, 5)
  boxes = rng.uniform(-0.3, 1.3, (k, 4))
  if kind == 1:  # whole cells
    cells = np.array([height, width, height, width]) - 1
    boxes = rng.integers(-1, cells + 2, (k, 4)) / np.maximum(cells, 1)
  if kind == 2:  # flipped
    boxes = boxes[:, [2, 3, 0, 1]]
  if kind == 3:  # zero-size
    boxes[:, 2:] = boxes[:, :2]
  if kind == 4:  # much larger than the image
    boxes = boxes * 4 - 1.5
  return boxes


class Sizes(NamedTuple):
  """Half-open ranges the sizes of a case are drawn from."""

  shape: tuple[list[int], list[int]]  # (N, H, W)
  channels: tuple[int, int]
  boxes: tuple[int, int]
  crop: tuple[int, int]  # each side


SMALL = Sizes(shape=([1, 1, 1], [4, 13, 13]), channels=(1, 5), boxes=(0, 25), crop=(1, 7))
# Where TensorFlow's kernels run on several threads, and crops overlap a lot.
LARGE = Sizes(shape=([1, 24, 24], [4, 97, 97]), channels=(16, 17), boxes=(200, 901), crop=(1, 15))


def draw(seed: int, index: int, sizes: Sizes = SMALL) -> dict:
  """Case ``index`` of ``seed``: inputs and options."""
  rng = np.random.default_rng((seed, index))
  n, height, width = (int(v) for v in rng.integers(*sizes.shape))
  image = rng.standard_normal((n, height, width, int(rng.integers(*sizes.channels))))
  kind = rng.integers(0, 3)
  if kind == 0:
    image = np.round(image)
  if kind < 2:
    image = image.astype(np.float32)
  if rng.random() < 0.15:
    image = rng.integers(0, 256, image.shape).astype(np.uint8)
  k = int(rng.integers(*sizes.boxes))
  # float64 maps sample at float64 points; where a point lies on a cell, or half-way
  # between two, in TensorFlow's float32 arithmetic, one ulp decides its cells, so
  # whole-cell boxes are drawn for the other dtypes only. TensorFlow's boxes are float32.
  boxes = _boxes(rng, k, height, width, whole_cells=image.dtype != np.float64)
  boxes = boxes.astype(np.float32).astype(image.dtype if image.dtype == np.float64 else np.float32)
  crop = rng.integers(*sizes.crop, 2).astype(np.int32)
  return dict(
    image=image,
    boxes=boxes,
    box_indices=rng.integers(0, n, k).astype(np.int32),
    crop_size=crop,
    method=np.str_(METHODS[rng.integers(0, 2)]),
    extrapolation_value=np.float32(rng.choice([0.0, -1.5, 7.0])),
    cotangent=rng.standard_normal((k, *crop, image.shape[-1])).astype(np.float32),
  )


def _tf_points(lo, hi, num, length, gradient_kernel):
  """TensorFlow's float32 sample points ``[K, num]`` along one axis.

  Its forward kernel's step is ``(hi - lo) * (length - 1) / (num - 1)``; its
  box-gradient kernel's is ``(hi - lo) * ((length - 1) / (num - 1))``, rounded
  differently.
  """
  f32 = np.float32
  lo, hi, extent = lo.astype(f32), hi.astype(f32), f32(length - 1)
  if num == 1:
    return ((lo + hi).astype(np.float64) * 0.5 * (length - 1)).astype(f32)[:, None]
  if gradient_kernel:
    step = (hi - lo) * (extent / f32(num - 1))
  else:
    step = (hi - lo) * extent / f32(num - 1)
  return lo[:, None] * extent + np.arange(num, dtype=f32)[None] * step[:, None]


def _tf_cells(lo, hi, num, length, gradient_kernel):
  """TensorFlow's points (:func:`_tf_points`), their cells ``floor``/``ceil``, and which count."""
  y = _tf_points(lo, hi, num, length, gradient_kernel)
  return y, np.floor(y), np.ceil(y), (y >= 0) & (y <= length - 1)


def gradient_points_agree(case: dict) -> np.ndarray:
  """``[K]`` bool: whether TensorFlow's two kernels put every point of each box on the same cells.

  Where they do not (a point on a cell in one and an ulp off it in the
  other), TensorFlow's box gradient is not the derivative of its own output,
  and roipool_jax's (the derivative of the output) differs from it.
  """
  _, height, width, _ = case["image"].shape
  crop, boxes = case["crop_size"], case["boxes"]
  agree = np.ones(len(boxes), bool)
  for axis, length in ((0, height), (1, width)):
    lo, hi, num = boxes[:, axis], boxes[:, axis + 2], int(crop[axis])
    forward = _tf_cells(lo, hi, num, length, gradient_kernel=False)[1:]
    backward = _tf_cells(lo, hi, num, length, gradient_kernel=True)[1:]
    for a, b in zip(forward, backward, strict=True):
      agree &= np.all(a == b, axis=1)
  return agree


def tensorflow_result(case: dict):
  """TensorFlow's output, image gradient and box gradient (None without gradients)."""
  image = tf.constant(case["image"])
  boxes = tf.constant(case["boxes"], tf.float32)
  crop = [int(s) for s in case["crop_size"]]
  options = dict(method=str(case["method"]), extrapolation_value=float(case["extrapolation_value"]))
  if case["image"].dtype == np.uint8:
    out = tf.image.crop_and_resize(image, boxes, case["box_indices"], crop, **options)
    return out.numpy(), None, None
  with tf.GradientTape() as tape:
    tape.watch([image, boxes])
    out = tf.image.crop_and_resize(image, boxes, case["box_indices"], crop, **options)
    loss = tf.reduce_sum(out * tf.constant(case["cotangent"]))
  grad_image, grad_boxes = tape.gradient(loss, [image, boxes])
  return out.numpy(), grad_image.numpy(), grad_boxes.numpy()


def roipool_result(case: dict, impl: str = "auto"):
  """roipool_jax's output, image gradient and box gradient under ``jit``."""

  @jax.jit
  def run(image, boxes, cot):
    def crop(image, boxes):
      return roipool_jax.crop_and_resize(
        image,
        boxes,
        tuple(int(s) for s in case["crop_size"]),
        box_indices=case["box_indices"],
        box_format="tf",
        method=str(case["method"]),
        extrapolation_value=float(case["extrapolation_value"]),
        impl=impl,
      )

    if not jnp.issubdtype(image.dtype, jnp.floating):
      return crop(image, boxes), None, None
    out, vjp = jax.vjp(crop, image, boxes)
    return (out, *vjp(cot.astype(out.dtype)))

  out, grad_image, grad_boxes = run(case["image"], case["boxes"], case["cotangent"])
  return tuple(None if a is None else np.asarray(a) for a in (out, grad_image, grad_boxes))


def box_gradient_magnitudes(case: dict) -> np.ndarray:
  """``[K, 4]``: a bound on the sum of the magnitudes of the terms of each box gradient.

  Each point and channel adds ``cot * slope * factor`` to a coordinate, where
  ``slope`` is the bilinear slope of the output along the point's axis and
  ``0 <= factor <= length - 1``. Computed at TensorFlow's box-gradient points.
  """
  image = case["image"].astype(np.float32)
  _, height, width, _ = image.shape
  boxes, crop = case["boxes"], [int(s) for s in case["crop_size"]]

  def cells(lo, hi, num, length):  # points that do not count read cell 0 (weight 0 below)
    y, low, high, inside = _tf_cells(lo, hi, num, length, gradient_kernel=True)
    lerp = np.where(inside, y - low, np.float32(0))
    return np.where(inside, low, 0).astype(int), np.where(inside, high, 0).astype(int), lerp, inside

  top, bottom, y_lerp, in_y = cells(boxes[:, 0], boxes[:, 2], crop[0], height)
  left, right, x_lerp, in_x = cells(boxes[:, 1], boxes[:, 3], crop[1], width)
  n = case["box_indices"][:, None, None]

  def at(rows, cols):  # [K, ch, cw, C]
    return image[n, rows[:, :, None], cols[:, None, :]]

  y_lerp, x_lerp = y_lerp[:, :, None, None], x_lerp[:, None, :, None]
  slope_y = (1 - x_lerp) * (at(bottom, left) - at(top, left)) + x_lerp * (
    at(bottom, right) - at(top, right)
  )
  slope_x = (1 - y_lerp) * (at(top, right) - at(top, left)) + y_lerp * (
    at(bottom, right) - at(bottom, left)
  )
  weight = np.abs(case["cotangent"]) * (in_y[:, :, None] & in_x[:, None, :])[..., None]
  along_y = np.sum(weight * np.abs(slope_y), axis=(1, 2, 3)) * (height - 1)
  along_x = np.sum(weight * np.abs(slope_x), axis=(1, 2, 3)) * (width - 1)
  return np.stack([along_y, along_x, along_y, along_x], axis=1)


def check(case: dict, impl: str = "auto") -> list[str]:
  """The ways roipool_jax differs from TensorFlow on ``case`` (empty: it agrees).

  Outputs within 1e-5 (relative and absolute); image gradients within 1e-5
  times (1 + the largest magnitude of the gradient), since each cell sums
  terms in another order. Box gradients within 1e-5 times (1 + the sum of
  the magnitudes of their terms, :func:`box_gradient_magnitudes`) times
  ``max(1, max(H, W) / 16)``: TensorFlow's two kernels place each point a few
  ulps apart, which moves its slope, and an ulp grows with the coordinate.
  float64 cases allow ``max(H, W)`` times all that: TensorFlow samples them
  at float32 points.
  """
  want = tensorflow_result(case)
  got = roipool_result(case, impl)
  scale = max(case["image"].shape[1:3]) if case["image"].dtype == np.float64 else 1
  problems = []
  names = ("output", "image gradient", "box gradient")
  for name, a, b in zip(names, got, want, strict=True):
    if b is None or (name == "box gradient" and case["method"] == "nearest"):
      continue
    if name == "box gradient":
      agree = gradient_points_agree(case)
      size = (1 + box_gradient_magnitudes(case)[agree]) * max(1, max(case["image"].shape[1:3]) / 16)
      a, b = a[agree], b[agree]
    else:
      size = 1 if name == "output" else 1 + np.abs(b).max(initial=0)
    tol = 1e-5 * scale * size
    if not np.allclose(a, b, rtol=1e-5 * scale, atol=tol):
      problems.append(f"{name} off by up to {np.abs(a - b).max():.3g}")
  return problems


def describe(case: dict) -> str:
  image = "x".join(str(d) for d in case["image"].shape)
  crop = tuple(int(s) for s in case["crop_size"])
  return (
    f"{case['image'].dtype} image {image}, {len(case['boxes'])} boxes, crop {crop}, "
    f"{case['method']}, extrapolation {float(case['extrapolation_value'])}"
  )


def write(seed: int = 0) -> None:
  """Stores cases ``0..FIXTURE_CASES-1`` of ``seed`` in float32 with TensorFlow's results."""
  arrays = {}
  for index in range(FIXTURE_CASES):
    case = draw(seed, index)
    if case["image"].dtype == np.float64:
      case.update(image=case["image"].astype(np.float32), boxes=case["boxes"].astype(np.float32))
    out, grad_image, grad_boxes = tensorflow_result(case)
    fields = dict(case, output=out)
    if grad_image is not None:
      fields.update(grad_image=grad_image, grad_boxes=grad_boxes)
      fields["box_gradient_compared"] = gradient_points_agree(case)
    for field, value in fields.items():
      arrays[f"case_{seed}_{index}/{field}"] = np.asarray(value)
  FIXTURES.mkdir(exist_ok=True)
  np.savez_compressed(FIXTURES / "tensorflow_crop_and_resize.npz", **arrays)
  print(f"wrote {FIXTURE_CASES} cases (tensorflow {tf.__version__})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cases", type=int, default=100)
  parser.add_argument("--start", type=int, default=0, help="first case index")
  parser.add_argument("--impl", default="auto", choices=("auto", "gather", "einsum"))
  parser.add_argument("--large", action="store_true", help="maps up to 96 x 96, 200-900 boxes")
  parser.add_argument("--write", action="store_true", help="store the fixtures instead")
  args = parser.parse_args()
  if args.write:
    write()
    return
  failed = skipped = 0
  for index in range(args.start, args.start + args.cases):
    case = draw(args.seed, index, LARGE if args.large else SMALL)
    if case["method"] == "bilinear" and case["image"].dtype != np.uint8:
      skipped += int(np.sum(~gradient_points_agree(case)))
    problems = check(case, args.impl)
    if problems:
      failed += 1
      print(f"MISMATCH {args.seed}/{index}: {describe(case)}: {'; '.join(problems)}", flush=True)
  print(
    f"tensorflow {tf.__version__}: {args.cases} cases, {failed} mismatches; box gradients of "
    f"{skipped} boxes not compared (TensorFlow's kernels put a point on different cells)"
  )
  raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
  main()
