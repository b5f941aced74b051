"""impl="einsum" (gather-free) against impl="gather", its HLO, and the backend choice.

Parity of impl="einsum" with torchvision is in the fixture tests of
test_roi_align.py and test_multiscale.py, which run every impl.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roipool_jax import (
  crop_and_resize,
  linen,
  multi_scale_roi_align,
  roi_align,
  roi_pool,
  roi_warp,
)
from roipool_jax._src import backends
from tests.quick import some


def _problem(seed=0, k=40):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.standard_normal((2, 12, 15, 3)), jnp.float32)
  lo = rng.uniform(-30, 110, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0, 90, (k, 2))], 1).astype(np.float32)
  boxes[0] = [60, 50, 40, 30]  # inverted
  boxes[1] = [np.nan, 0, 10, 10]
  boxes[2] = [-400, -300, 500, 400]  # far larger than the map
  boxes[3] = [20, 20, 20, 20]  # zero size
  return features, jnp.asarray(boxes), jnp.asarray(rng.integers(0, 2, k), jnp.int32)


OPS = {
  "roi_align adaptive": lambda x, b, i, impl: roi_align(
    x, b, (3, 4), spatial_scale=1 / 8, box_indices=i, impl=impl
  ),
  "roi_align ratio 2 aligned": lambda x, b, i, impl: roi_align(
    x, b, 2, spatial_scale=1 / 8, sampling_ratio=2, aligned=True, box_indices=i, impl=impl
  ),
  "crop_and_resize": lambda x, b, i, impl: crop_and_resize(
    x, b, 5, spatial_scale=1 / 8, box_indices=i, impl=impl
  ),
  "roi_warp": lambda x, b, i, impl: roi_warp(
    x, b, 3, spatial_scale=1 / 8, box_indices=i, impl=impl
  ),
  "multi_scale_roi_align": lambda x, b, i, impl: multi_scale_roi_align(
    [x, x[:, ::2, ::2]], b, 2, image_size=(96, 120), box_indices=i, impl=impl
  ),
}


@pytest.mark.parametrize("op", some(sorted(OPS), 2))
def test_einsum_equals_gather_forward_and_gradients(op):
  features, boxes, index = _problem()

  def loss(impl):
    return lambda x, b: jnp.sum(jnp.sin(OPS[op](x, b, index, impl)))

  for impl in ("gather", "einsum"):
    chex.assert_tree_all_finite(jax.grad(loss(impl), (0, 1))(features, boxes)[0])
  np.testing.assert_allclose(
    OPS[op](features, boxes, index, "einsum"), OPS[op](features, boxes, index, "gather"), atol=5e-6
  )
  grads = jax.grad(loss("einsum"), (0, 1))(features, boxes)
  expected = jax.grad(loss("gather"), (0, 1))(features, boxes)
  np.testing.assert_allclose(grads[0], expected[0], atol=2e-5)
  finite = np.isfinite(np.asarray(boxes)).all(1)
  np.testing.assert_allclose(grads[1][finite], expected[1][finite], atol=2e-5)
  assert np.all(np.asarray(grads[1])[1] == 0)  # NaN box: zero gradient
  # Inverted boxes: zeros for the RoI ops; crop_and_resize flips them (a real gradient).
  assert np.all(np.asarray(grads[1])[0] == 0) == (op != "crop_and_resize")


def _hlo_ops(fn, *args):
  """Gather/scatter instructions in the StableHLO and in the optimized HLO.

  Matches instructions, not names: metadata (source paths, test names) may
  contain the words too.
  """
  lowered = jax.jit(fn).lower(*args)
  stable = re.findall(r"stablehlo\.(gather|scatter)\b", lowered.as_text())
  compiled = re.findall(r"= [^ ]+ (gather|scatter)\(", lowered.compile().as_text())
  return set(stable) | set(compiled)


@pytest.mark.parametrize("op", some(sorted(OPS), 2))
def test_einsum_hlo_has_no_gather_or_scatter(op):
  features, boxes, index = _problem(k=5)

  def loss(impl):
    return lambda x, b: jnp.sum(OPS[op](x, b, index, impl))

  assert _hlo_ops(lambda x, b: OPS[op](x, b, index, "einsum"), features, boxes) == set()
  assert _hlo_ops(jax.grad(loss("einsum"), (0, 1)), features, boxes) == set()
  # The check can fail: the gather path has both.
  assert _hlo_ops(jax.grad(loss("gather"), (0, 1)), features, boxes) == {"gather", "scatter"}


def test_per_image_boxes_bf16_and_empty_with_einsum():
  features, boxes, _ = _problem(k=8)
  per_image = boxes.reshape(2, 4, 4)
  out = roi_align(features, per_image, 3, spatial_scale=1 / 8, impl="einsum")
  chex.assert_shape(out, (2, 4, 3, 3, 3))
  np.testing.assert_allclose(
    out, roi_align(features, per_image, 3, spatial_scale=1 / 8, impl="gather"), atol=2e-6
  )
  half = roi_align(features.astype(jnp.bfloat16), per_image, 3, spatial_scale=1 / 8, impl="einsum")
  assert half.dtype == jnp.bfloat16
  empty = roi_align(
    features, jnp.zeros((0, 4)), 3, box_indices=jnp.zeros(0, jnp.int32), impl="einsum"
  )
  chex.assert_shape(empty, (0, 3, 3, 3))


def test_einsum_under_vmap_and_in_a_module():
  features, boxes, index = _problem(k=6)
  single = jax.vmap(
    lambda f, b: roi_align(f[None], b[None], 2, spatial_scale=1 / 8, impl="einsum")[0]
  )(features, boxes[:2])
  expected = roi_align(features, boxes[:2], 2, spatial_scale=1 / 8, box_indices=jnp.arange(2))
  np.testing.assert_allclose(single, expected, atol=2e-6)
  module = linen.RoIAlign(output_size=2, spatial_scale=1 / 8, impl="einsum")
  out = module.apply({}, features, boxes, index)
  np.testing.assert_allclose(
    out, roi_align(features, boxes, 2, spatial_scale=1 / 8, box_indices=index), atol=2e-6
  )


def test_auto_picks_by_backend(monkeypatch):
  assert backends.resolve("auto") == ("gather" if jax.default_backend() == "cpu" else "einsum")
  for platform, expected in (("tpu", "einsum"), ("gpu", "einsum"), ("cpu", "gather")):
    monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
    assert backends.resolve("auto") == expected
    assert backends.resolve("auto", einsum_supported=False) == "gather"
    assert backends.resolve("gather") == "gather"


def test_bad_impl_is_rejected_by_name():
  features, boxes, index = _problem(k=6)
  with pytest.raises(ValueError, match="impl"):
    roi_align(features, boxes, 2, box_indices=index, impl="pallas")
  with pytest.raises(ValueError, match='impl="einsum".*mode="max"'):
    roi_align(features, boxes, 2, box_indices=index, mode="max", impl="einsum")


def _pool_problem(seed=0, k=30):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.integers(-3, 4, (2, 9, 11, 3)), jnp.float32)  # many ties
  lo = rng.uniform(-20, 60, (k, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(-5, 70, (k, 2))], 1).astype(np.float32)
  boxes[0] = [-200, -200, 400, 400]  # far larger than the map
  boxes[1] = [np.nan, 0, 10, 10]
  boxes[2] = [30, 30, 10, 10]  # inverted
  boxes[3] = [100, 100, 140, 140]  # outside
  cot = jnp.asarray(rng.integers(-2, 3, (k, 3, 2, 3)), jnp.float32)  # exact sums
  return features, jnp.asarray(boxes), jnp.asarray(rng.integers(0, 2, k), jnp.int32), cot


def _pool(impl, quantization="round"):
  def op(x, b, i):
    return roi_pool(
      x, b, (3, 2), spatial_scale=0.25, box_indices=i, quantization=quantization, impl=impl
    )

  return op


@pytest.mark.parametrize("quantization", ["round", "floor"])
def test_roi_pool_einsum_equals_gather_bitwise(quantization):
  # Same maxima and the same first-arg-max tie rule: with integer features (ties
  # everywhere) and integer cotangents both give bit-identical values and gradients.
  features, boxes, index, cot = _pool_problem()
  results = {}
  for impl in ("gather", "einsum"):
    op = _pool(impl, quantization)
    grad = jax.grad(lambda x, op=op: jnp.vdot(op(x, boxes, index), cot))(features)
    results[impl] = (op(features, boxes, index), grad)
  chex.assert_trees_all_equal(results["einsum"], results["gather"])
  assert np.any(np.asarray(results["einsum"][1]))


def test_roi_pool_einsum_hlo_has_no_gather_or_scatter():
  features, boxes, index, cot = _pool_problem(k=5)
  cot = cot[:5]

  def loss(impl):
    return lambda x: jnp.vdot(_pool(impl)(x, boxes, index), cot)

  assert _hlo_ops(lambda x: _pool("einsum")(x, boxes, index), features) == set()
  assert _hlo_ops(jax.grad(loss("einsum")), features) == set()
  # The check can fail: the gather path has both.
  assert _hlo_ops(jax.grad(loss("gather")), features) == {"gather", "scatter"}


def test_roi_pool_einsum_empty_and_vmapped():
  features, boxes, index, _ = _pool_problem(k=6)
  op = _pool("einsum")
  assert op(features, boxes[:0], index[:0]).shape == (0, 3, 2, 3)
  grad = jax.grad(lambda x: jnp.sum(op(x, boxes[:0], index[:0])))(features)
  chex.assert_trees_all_equal(grad, jnp.zeros_like(features))
  batched = jax.vmap(lambda b: op(features, b, index))(jnp.stack([boxes, boxes + 8.0]))
  chex.assert_trees_all_equal(batched[1], op(features, boxes + 8.0, index))


def test_roi_pool_auto_picks_einsum_on_tpu_only(monkeypatch):
  for platform, expected in (("tpu", "einsum"), ("gpu", "gather"), ("cpu", "gather")):
    monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
    assert backends.resolve("auto", dense_backends=("tpu",)) == expected


def test_cpu_vendor_reads_proc_cpuinfo_and_is_empty_where_it_cannot(monkeypatch, tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
  real_open = open

  def fake_open(path, *args, **kwargs):
    if path != "/proc/cpuinfo":
      return real_open(path, *args, **kwargs)
    if not info.exists():
      raise FileNotFoundError(path)
    return real_open(info, *args, **kwargs)

  monkeypatch.setattr("builtins.open", fake_open)
  backends.cpu_vendor.cache_clear()
  try:
    assert backends.cpu_vendor() == "AuthenticAMD"
    backends.cpu_vendor.cache_clear()
    info.unlink()
    assert backends.cpu_vendor() == ""
  finally:
    backends.cpu_vendor.cache_clear()
