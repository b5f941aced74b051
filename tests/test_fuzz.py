"""Fuzzing every public function and module with hypothesis.

Each property draws an op and its options (``impl`` x ``mode`` x ``aligned`` x
``sampling_ratio`` and the op's own), a dtype (float32, bfloat16, float16, and
float64 under x64), a box form (``[K, 4]`` with ``box_indices`` or
``[N, R, 4]``), ``K`` in {0, 1, many}, ``N`` in {0, 1, 3}, and boxes that are
NaN, inf, inverted, zero-size, huge or outside the map among ordinary ones.

The properties:

* valid input never raises, and outputs and gradients (features and boxes)
  have the documented shapes and dtypes and are finite (the features are);
* ``jit`` equals eager;
* ``impl="gather"`` equals ``impl="einsum"``;
* ``vmap`` equals a loop;
* a box's output and gradients never depend on the other boxes;
* float64 gradients pass ``jax.test_util.check_grads`` (away from the
  quantization kinks, which random continuous boxes miss);
* the Linen and NNX modules equal the functions.

Cost: every example compiles new kernels, so the number of examples per
property is an eighth of the hypothesis profile's (the same ones on every
run): 1 in the quick default run (``-m "not slow"``), which also runs each
property for one op (a different one per property), and 3 in the full suite.
The vmap and box-independence properties compile four programs per example
(batched and single, forward and gradient) and take a twelfth: 1 and 2.
For a long local run with fresh examples (37 and 25 per property):
``HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import roipool_jax
from roipool_jax import linen as roi_linen
from roipool_jax import nnx as roi_nnx
from tests.quick import examples, some

EXAMPLES = examples(8)
HEAVY_EXAMPLES = examples(12)  # four compiled programs per example
NAMES = sorted(roipool_jax.__all__)
# precise_roi_pool and deform_roi_pool compile large programs per example; their vmap,
# box-independence and float64 gradient properties live in their own test files.
HEAVY_PROPERTY_NAMES = [n for n in NAMES if n not in ("deform_roi_pool", "precise_roi_pool")]
MODULES = {
  "roi_pool": "RoIPool",
  "roi_align": "RoIAlign",
  "crop_and_resize": "CropAndResize",
  "roi_warp": "RoIWarp",
  "multi_scale_roi_align": "MultiScaleRoIAlign",
  "ps_roi_pool": "PSRoIPool",
  "ps_roi_align": "PSRoIAlign",
  "roi_align_rotated": "RoIAlignRotated",
  "riroi_align_rotated": "RiRoIAlignRotated",
  "bezier_align": "BezierAlign",
  "precise_roi_pool": "PreciseRoIPool",
}  # deform_roi_pool's modules learn their offsets: tests/test_deform_modules.py
NO_EINSUM = (
  "bezier_align",
  "roi_pool",
  "ps_roi_pool",
  "roi_align_rotated",
  "riroi_align_rotated",
  "deform_roi_pool",
)  # roi_pool's einsum path is tested in test_backends
MAPS = [(5, 7), (1, 1), (8, 6)]
PYRAMID_MAPS = [(8, 6), (6, 7)]  # two levels: the map and its stride-2 subsampling
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
KINDS = ["box"] * 5 + ["inverted", "zero", "nan", "inf", "huge", "outside"]


@dataclasses.dataclass(frozen=True)
class Op:
  """A public function with its static options, callable as ``op(features, boxes, indices)``."""

  name: str
  size: int | tuple[int, int]
  options: tuple[tuple[str, object], ...]

  @property
  def kwargs(self) -> dict:
    return dict(self.options)

  @property
  def normalized(self) -> bool:
    return self.kwargs.get("box_format") == "tf"

  @property
  def einsum_ok(self) -> bool:
    return self.name not in NO_EINSUM and self.kwargs.get("mode", "avg") == "avg"

  def with_impl(self, impl: str) -> Op:
    return dataclasses.replace(self, options=tuple({**self.kwargs, "impl": impl}.items()))

  def _inputs(self, features):
    if self.name != "multi_scale_roi_align":
      return features, {}
    return [features, features[:, ::2, ::2]], {"image_size": features.shape[1:3]}

  def __call__(self, features, boxes, box_indices=None):
    features, extra = self._inputs(features)
    fn = getattr(roipool_jax, self.name)
    if self.name == "deform_roi_pool":  # the same offsets for every box
      return fn(
        features, boxes, self.offsets(boxes), self.size, box_indices=box_indices, **self.kwargs
      )
    return fn(features, boxes, self.size, box_indices=box_indices, **self.kwargs, **extra)

  def offsets(self, boxes):
    """A fixed pattern of ``deform_roi_pool`` offsets, ``boxes.shape[:-1] + (oh, ow, 2)``."""
    oh, ow = (self.size, self.size) if isinstance(self.size, int) else self.size
    i, j, c = np.meshgrid(np.arange(oh), np.arange(ow), np.arange(2), indexing="ij")
    pattern = (0.7 * np.sin(3 * i + 5 * j + c)).astype(np.float32)
    return np.broadcast_to(pattern, boxes.shape[:-1] + pattern.shape)

  def module(self, kind: str):
    """The Linen or NNX module with the same options, as a function."""
    size_field = "crop_size" if self.name == "crop_and_resize" else "output_size"
    cls = getattr(roi_linen if kind == "linen" else roi_nnx, MODULES[self.name])

    def call(features, boxes, box_indices=None):
      inputs, extra = self._inputs(features)
      layer = cls(**{size_field: self.size, **self.kwargs, **extra})
      if kind == "linen":
        return layer.apply({}, inputs, boxes, box_indices)
      return layer(inputs, boxes, box_indices)

    return call


def _impls(avg: bool):
  return st.sampled_from(["auto", "gather", "einsum"] if avg else ["auto", "gather"])


@st.composite
def ops(draw, name: str) -> Op:
  size = draw(st.sampled_from([1, (2, 3), 3]))
  scale = st.sampled_from([1.0, 0.5])
  if name == "roi_pool":
    options = dict(
      spatial_scale=draw(scale), quantization=draw(st.sampled_from(["round", "floor"]))
    )
  elif name == "roi_align":
    mode = draw(st.sampled_from(["avg", "max"]))
    options = dict(
      spatial_scale=draw(scale),
      sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])),
      aligned=draw(st.booleans()),
      mode=mode,
      impl=draw(_impls(mode == "avg")),
    )
  elif name == "crop_and_resize":
    box_format = draw(st.sampled_from(["xyxy", "tf"]))
    options = dict(
      box_format=box_format,
      method=draw(st.sampled_from(["bilinear", "nearest"])),
      extrapolation_value=draw(st.sampled_from([None, 0.0, -1.5])),
      impl=draw(_impls(True)),
    )
    if box_format == "xyxy":
      options.update(spatial_scale=draw(scale), aligned=draw(st.booleans()))
  elif name == "ps_roi_pool":
    options = dict(spatial_scale=draw(scale))
  elif name == "roi_align_rotated":
    options = dict(
      spatial_scale=draw(scale),
      sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])),
      aligned=draw(st.booleans()),
      clockwise=draw(st.booleans()),
    )
  elif name == "bezier_align":
    options = dict(
      spatial_scale=draw(scale),
      sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2])),
      aligned=draw(st.booleans()),
    )
  elif name == "riroi_align_rotated":
    options = dict(
      num_orientations=draw(st.sampled_from([1, 2, 4])),
      spatial_scale=draw(scale),
      sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2])),
      clockwise=draw(st.booleans()),
    )
  elif name == "ps_roi_align":
    options = dict(
      spatial_scale=draw(scale),
      sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])),
      impl=draw(_impls(True)),
    )
  elif name == "precise_roi_pool":
    options = dict(spatial_scale=draw(scale), impl=draw(_impls(True)))
  elif name == "deform_roi_pool":
    options = dict(
      spatial_scale=draw(scale),
      sampling_ratio=draw(st.sampled_from([-1, 0, 1, 2, 3])),
      gamma=draw(st.sampled_from([0.1, 0.5])),
    )
  elif name == "roi_warp":
    oh, ow = (size, size) if isinstance(size, int) else size
    factor = draw(st.sampled_from([None, 1, 3]))
    options = dict(
      spatial_scale=draw(scale),
      warp_size=None if factor is None else (factor * oh, factor * ow),
      aligned=draw(st.booleans()),
      impl=draw(_impls(True)),
    )
  else:
    options = dict(
      sampling_ratio=draw(st.sampled_from([-1, 2])),
      aligned=draw(st.booleans()),
      canonical_scale=draw(st.sampled_from([224, 4])),
      canonical_level=draw(st.sampled_from([4, 1])),
      impl=draw(_impls(True)),
    )
  return Op(name, size, tuple(options.items()))


def _boxes(rng, k: int, extent: np.ndarray, degenerate: bool) -> np.ndarray:
  """``[k, 4]`` boxes over a map of ``extent`` (box units), some degenerate."""
  lo = rng.uniform(-0.3, 1.0, (k, 2)) * extent
  boxes = np.concatenate([lo, lo + rng.uniform(0.05, 1.0, (k, 2)) * extent], axis=1)
  for i, kind in enumerate(rng.choice(KINDS, k) if degenerate else ["box"] * k):
    coord = rng.integers(0, 4)
    if kind == "inverted":
      boxes[i] = boxes[i, [2, 3, 0, 1]]
    elif kind == "zero":
      boxes[i, 2:] = boxes[i, :2]
    elif kind == "nan":
      boxes[i, coord] = np.nan
    elif kind == "inf":
      boxes[i, coord] = rng.choice([np.inf, -np.inf])
    elif kind == "huge":
      boxes[i] *= rng.choice([1e4, 1e30])
    elif kind == "outside":
      boxes[i] += np.tile(extent, 2) * rng.choice([-3, 3])
  return boxes


@dataclasses.dataclass
class Problem:
  features: np.ndarray
  boxes: np.ndarray
  indices: np.ndarray | None


@st.composite
def problems(
  draw,
  op: Op,
  images=(0, 1, 3),
  counts=(0, 1, 6),
  dtypes=DTYPES,
  per_image=None,
  degenerate=True,
) -> Problem:
  maps = PYRAMID_MAPS if op.name == "multi_scale_roi_align" else MAPS
  n, (h, w), c = (
    draw(st.sampled_from(images)),
    draw(st.sampled_from(maps)),
    draw(st.sampled_from([1, 2])),
  )
  if op.name.startswith("ps_"):  # C = C_out * oh * ow
    c *= int(np.prod(_out_size(op)))
  c *= op.kwargs.get("num_orientations", 1)  # C = C_g * O
  dtype = draw(st.sampled_from(dtypes))
  per_image = draw(st.booleans()) if per_image is None else per_image
  k = draw(st.sampled_from(counts))
  if not per_image and n == 0:
    k = 0  # flat boxes name an image each
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if jnp.issubdtype(dtype, jnp.integer):
    features = rng.integers(0, 255, (n, h, w, c)).astype(dtype)
  else:
    features = rng.standard_normal((n, h, w, c)).astype(dtype)
  scale = op.kwargs.get("spatial_scale", 1.0)
  extent = np.ones(2) if op.normalized else np.array([w, h]) / scale
  if op.name == "multi_scale_roi_align":
    extent = np.array([w, h], float)
  total = n * k if per_image else k
  boxes = _boxes(rng, total, extent, degenerate)
  if op.name.endswith("roi_align_rotated"):  # (cx, cy, w, h, angle) of the same boxes, turned
    centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    boxes = np.concatenate([centre, size, rng.uniform(-360, 360, (total, 1))], axis=1)
  if op.name == "bezier_align":  # the box's top and bottom edges as curves, bent a little
    t = np.array([0, 1 / 3, 2 / 3, 1])
    with np.errstate(invalid="ignore", over="ignore"):  # inf boxes give NaN: degenerate too
      xs = boxes[:, :1] + t * (boxes[:, 2:3] - boxes[:, :1])
      bend = rng.uniform(-0.2, 0.2, (total, 8)) * (boxes[:, 3:4] - boxes[:, 1:2])
      top = np.stack([xs, boxes[:, 1:2] + bend[:, :4]], -1)
      bottom = np.stack([xs, boxes[:, 3:4] + bend[:, 4:]], -1)[:, ::-1]
    boxes = np.concatenate([top, bottom], 1).reshape(total, 16)
  boxes = boxes.astype(np.float32)
  if per_image:
    return Problem(features, boxes.reshape(n, k, boxes.shape[-1]), None)
  return Problem(features, boxes, rng.integers(0, max(n, 1), k).astype(np.int32))


def _x64(dtype):
  return jax.enable_x64(True) if dtype == jnp.float64 else contextlib.nullcontext()


def _tolerance(dtype) -> dict:
  if dtype == jnp.bfloat16:
    return dict(rtol=2e-2, atol=2e-2)
  if dtype == jnp.float16:
    return dict(rtol=2e-3, atol=2e-3)
  return dict(rtol=1e-5, atol=1e-5)


def _loss(op: Op, indices):
  def loss(features, boxes):
    return jnp.sum(jnp.sin(op(features, boxes, indices).astype(jnp.float32)))

  return loss


def _assert_close(got, want, dtype, what):
  np.testing.assert_allclose(
    np.asarray(got, np.float64), np.asarray(want, np.float64), err_msg=what, **_tolerance(dtype)
  )


def _out_size(op: Op) -> tuple[int, int]:
  return (op.size, op.size) if isinstance(op.size, int) else op.size


def _out_channels(op: Op, features) -> tuple[int]:
  """The output's channel dim: ``C``, or ``C / (oh * ow)`` for position-sensitive ops."""
  c = features.shape[3]
  return (c // int(np.prod(_out_size(op))) if op.name.startswith("ps_") else c,)


# ------------------------------------------------------------------ the properties


@pytest.mark.parametrize("name", some(NAMES, start=0))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_valid_input_runs_with_finite_outputs_and_gradients_and_jit_equals_eager(name, data):
  op = data.draw(ops(name), label="op")
  dtypes = DTYPES + [jnp.float64] + ([jnp.uint8] if name == "crop_and_resize" else [])
  p = data.draw(problems(op, dtypes=dtypes), label="problem")
  dtype = p.features.dtype
  with _x64(dtype):
    features, boxes = jnp.asarray(p.features), jnp.asarray(p.boxes)
    out = op(features, boxes, p.indices)
    out_dtype = jnp.float32 if jnp.issubdtype(dtype, jnp.integer) else dtype
    assert out.shape == boxes.shape[:-1] + _out_size(op) + _out_channels(op, features)
    assert out.dtype == out_dtype
    assert np.all(np.isfinite(np.asarray(out, np.float64)))
    _assert_close(jax.jit(op)(features, boxes, p.indices), out, out_dtype, "jit output")

    loss = _loss(op, p.indices)
    argnums = (1,) if jnp.issubdtype(dtype, jnp.integer) else (0, 1)
    grads = jax.grad(loss, argnums)(features, boxes)
    jit_grads = jax.jit(jax.grad(loss, argnums))(features, boxes)
    for arg, grad, jit_grad in zip(argnums, grads, jit_grads, strict=True):
      like = (features, boxes)[arg]
      assert grad.shape == like.shape and grad.dtype == like.dtype
      assert np.all(np.isfinite(np.asarray(grad, np.float64))), ("gradient", arg)
      _assert_close(jit_grad, grad, like.dtype, f"jit gradient {arg}")


@pytest.mark.parametrize("name", some(HEAVY_PROPERTY_NAMES, start=3))
@settings(max_examples=HEAVY_EXAMPLES)
@given(data=st.data())
def test_a_box_never_depends_on_the_other_boxes(name, data):
  op = data.draw(ops(name), label="op")
  p = data.draw(problems(op, images=(1, 3), counts=(6,), per_image=False), label="problem")
  features, boxes, indices = jnp.asarray(p.features), jnp.asarray(p.boxes), p.indices
  i = data.draw(st.integers(0, len(boxes) - 1), label="box")
  cot = jnp.asarray(
    np.random.default_rng(i).standard_normal(_out_size(op) + _out_channels(op, features))
  )

  def loss_all(f, b):
    return jnp.vdot(op(f, b, indices)[i].astype(jnp.float32), cot)

  def loss_one(f, b):
    return jnp.vdot(op(f, b, indices[i : i + 1])[0].astype(jnp.float32), cot)

  tol = features.dtype
  _assert_close(
    op(features, boxes, indices)[i],
    op(features, boxes[i : i + 1], indices[i : i + 1])[0],
    tol,
    "output",
  )
  grads_all = jax.grad(loss_all, (0, 1))(features, boxes)
  grads_one = jax.grad(loss_one, (0, 1))(features, boxes[i : i + 1])
  _assert_close(grads_all[0], grads_one[0], tol, "feature gradient")
  _assert_close(grads_all[1][i], grads_one[1][0], jnp.float32, "box gradient")
  others = np.delete(np.asarray(grads_all[1]), i, axis=0)
  assert np.all(others == 0), "gradient reached other boxes"


EINSUM_OPS = [n for n in NAMES if n not in NO_EINSUM]


@pytest.mark.parametrize("name", some(EINSUM_OPS, start=3))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_gather_equals_einsum(name, data):
  op = data.draw(ops(name).filter(lambda o: o.einsum_ok), label="op")
  p = data.draw(problems(op), label="problem")
  features, boxes = jnp.asarray(p.features), jnp.asarray(p.boxes)
  gather, einsum = op.with_impl("gather"), op.with_impl("einsum")
  dtype = features.dtype
  _assert_close(
    einsum(features, boxes, p.indices), gather(features, boxes, p.indices), dtype, "out"
  )
  want = jax.grad(_loss(gather, p.indices), (0, 1))(features, boxes)
  got = jax.grad(_loss(einsum, p.indices), (0, 1))(features, boxes)
  _assert_close(got[0], want[0], dtype, "feature gradient")
  tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else _tolerance(dtype)
  np.testing.assert_allclose(got[1], want[1], err_msg="box gradient", **tol)


@pytest.mark.parametrize("name", some(HEAVY_PROPERTY_NAMES, start=2))
@settings(max_examples=HEAVY_EXAMPLES)
@given(data=st.data())
def test_vmap_equals_a_loop(name, data):
  op = data.draw(ops(name), label="op")
  batch = [data.draw(problems(op, images=(1, 3), per_image=False), label="first")]
  second = data.draw(problems(op, images=(1, 3), per_image=False), label="second")
  # The second problem takes the first one's shapes and dtype.
  f0, b0 = batch[0].features, batch[0].boxes
  rng = np.random.default_rng(len(b0))
  batch.append(
    Problem(
      rng.standard_normal(f0.shape).astype(f0.dtype),
      np.resize(second.boxes, b0.shape) if second.boxes.size else b0[::-1].copy(),
      rng.integers(0, f0.shape[0], len(b0)).astype(np.int32),
    )
  )
  features = jnp.stack([jnp.asarray(q.features) for q in batch])
  boxes = jnp.stack([jnp.asarray(q.boxes) for q in batch])
  indices = jnp.stack([jnp.asarray(q.indices) for q in batch])
  out = jax.vmap(op)(features, boxes, indices)
  grads = jax.vmap(jax.grad(lambda f, b, i: _loss(op, i)(f, b), (0, 1)))(features, boxes, indices)
  for j in range(2):
    _assert_close(out[j], op(features[j], boxes[j], indices[j]), f0.dtype, "output")
    one = jax.grad(_loss(op, indices[j]), (0, 1))(features[j], boxes[j])
    _assert_close(grads[0][j], one[0], f0.dtype, "feature gradient")
    np.testing.assert_allclose(grads[1][j], one[1], rtol=1e-4, atol=1e-4, err_msg="box gradient")


@pytest.mark.parametrize("name", some(HEAVY_PROPERTY_NAMES, start=4))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_float64_gradients_pass_check_grads(name, data):
  op = data.draw(ops(name), label="op")
  p = data.draw(
    problems(
      op, images=(1, 2), counts=(1, 3), dtypes=[np.float64], per_image=False, degenerate=False
    ),
    label="problem",
  )
  with jax.enable_x64(True):
    features, boxes = jnp.asarray(p.features), jnp.asarray(p.boxes, jnp.float64)
    assert op(features, boxes, p.indices).dtype == jnp.float64
    check_grads(lambda f, b: op(f, b, p.indices), (features, boxes), 1, modes=("rev",), eps=1e-7)


@pytest.mark.parametrize("name", some(sorted(MODULES), start=1))
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_modules_equal_the_functions(name, data):
  op = data.draw(ops(name), label="op")
  p = data.draw(problems(op, counts=(0, 6)), label="problem")
  features, boxes = jnp.asarray(p.features), jnp.asarray(p.boxes)
  want = np.asarray(op(features, boxes, p.indices))
  for kind in ("linen", "nnx"):
    np.testing.assert_array_equal(np.asarray(op.module(kind)(features, boxes, p.indices)), want)
