"""float64 in means float64 computed, end to end, for every op, impl and mode (x64 enabled)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import roipool_jax
from tests import reference
from tests.quick import some

INDICES = np.array([0, 1, 1], np.int32)
# Box coordinates and sizes away from every kink (integer sample positions,
# integer adaptive bin sizes, .5 rounding points) by much more than check_grads' eps.
BOXES = [[1.3, 0.7, 6.3, 5.7], [2.7, 1.3, 4.9, 6.45], [-1.2, 2.2, 7.9, 8.4]]

OPS = {
  "roi_pool": lambda f, b: roipool_jax.roi_pool(f, b, 2, box_indices=INDICES),
  "roi_pool floor": lambda f, b: roipool_jax.roi_pool(
    f, b, 2, box_indices=INDICES, quantization="floor"
  ),
  "roi_align adaptive gather": lambda f, b: roipool_jax.roi_align(
    f, b, 2, box_indices=INDICES, impl="gather"
  ),
  "roi_align adaptive einsum": lambda f, b: roipool_jax.roi_align(
    f, b, 2, box_indices=INDICES, impl="einsum"
  ),
  "roi_align ratio 2 aligned gather": lambda f, b: roipool_jax.roi_align(
    f, b, (2, 3), sampling_ratio=2, aligned=True, box_indices=INDICES, impl="gather"
  ),
  "roi_align ratio 3 einsum": lambda f, b: roipool_jax.roi_align(
    f, b, (2, 3), sampling_ratio=3, box_indices=INDICES, impl="einsum"
  ),
  "roi_align max adaptive": lambda f, b: roipool_jax.roi_align(
    f, b, 2, box_indices=INDICES, mode="max"
  ),
  "roi_align max ratio 2": lambda f, b: roipool_jax.roi_align(
    f, b, 2, sampling_ratio=2, box_indices=INDICES, mode="max", aligned=True
  ),
  "crop_and_resize gather": lambda f, b: roipool_jax.crop_and_resize(
    f, b, 3, box_indices=INDICES, impl="gather"
  ),
  "crop_and_resize einsum": lambda f, b: roipool_jax.crop_and_resize(
    f, b, 3, box_indices=INDICES, impl="einsum"
  ),
  "crop_and_resize tf extrapolated": lambda f, b: roipool_jax.crop_and_resize(
    f, b / 8.5, (3, 2), box_indices=INDICES, box_format="tf", extrapolation_value=0.5
  ),
  "crop_and_resize nearest": lambda f, b: roipool_jax.crop_and_resize(
    f, b, 3, box_indices=INDICES, method="nearest"
  ),
  "roi_warp gather": lambda f, b: roipool_jax.roi_warp(f, b, 2, box_indices=INDICES, impl="gather"),
  "roi_warp einsum": lambda f, b: roipool_jax.roi_warp(f, b, 2, box_indices=INDICES, impl="einsum"),
  "multi_scale_roi_align gather": lambda f, b: roipool_jax.multi_scale_roi_align(
    [f, f[:, ::2, ::2]], b, 2, image_size=(9, 10), box_indices=INDICES, impl="gather"
  ),
  "multi_scale_roi_align einsum": lambda f, b: roipool_jax.multi_scale_roi_align(
    [f, f[:, ::2, ::2]], b, 2, image_size=(9, 10), box_indices=INDICES, impl="einsum"
  ),
  # (+ 0.5: deform_roi_pool is aligned; the samples then stay on the map. With offsets of 0.1
  # check_grads fails: a sample then lies within its step of a cell edge, a kink.)
  "deform_roi_pool adaptive": lambda f, b: roipool_jax.deform_roi_pool(
    f, b + 0.5, jnp.full((3, 2, 3, 2), 0.13, b.dtype), (2, 3), box_indices=INDICES
  ),
  "deform_roi_pool ratio 2": lambda f, b: roipool_jax.deform_roi_pool(
    f, b + 0.5, jnp.full((3, 2, 2, 2), -0.1, b.dtype), 2, sampling_ratio=2, box_indices=INDICES
  ),
}
# precise_roi_pool reads zeros outside the map, so its value near the border is not the
# constant: its float64 tests are in test_precise_roi_pool.py.


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def _features(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((2, 9, 10, 3)), jnp.float64)


@pytest.mark.parametrize("op", some(sorted(OPS), 3))
def test_float64_resolves_one_part_in_1e12(op):
  features = jnp.full((2, 9, 10, 3), 1 + 1e-12, jnp.float64)
  out = OPS[op](features, jnp.asarray(BOXES, jnp.float64))
  assert out.dtype == jnp.float64
  out = np.asarray(out)
  nonzero = out[(out != 0) & (out != 0.5)]  # 0.5: the extrapolation value of one op
  assert nonzero.size and np.all(np.abs(nonzero - (1 + 1e-12)) < 1e-15), op


@pytest.mark.parametrize("op", some(sorted(OPS), 3))
def test_float64_gradients_pass_check_grads(op):
  features, boxes = _features(), jnp.asarray(BOXES, jnp.float64)
  check_grads(OPS[op], (features, boxes), order=1, modes=("rev",))
  # torch's gradcheck step, too.
  check_grads(OPS[op], (features, boxes), order=1, modes=("rev",), eps=1e-6)
  grads = jax.grad(lambda f, b: jnp.sum(OPS[op](f, b)), (0, 1))(features, boxes)
  assert grads[0].dtype == jnp.float64 and grads[1].dtype == jnp.float64


@pytest.mark.parametrize(
  "op",
  [
    "roi_align adaptive gather",
    "roi_align max ratio 2",
    "crop_and_resize tf extrapolated",
    "deform_roi_pool ratio 2",
  ],
)
def test_float64_box_gradients_match_central_differences_on_every_coordinate(op):
  features, boxes = _features(1), jnp.asarray(BOXES, jnp.float64)
  cot = jnp.asarray(np.random.default_rng(2).standard_normal(OPS[op](features, boxes).shape))

  def loss(b):
    return jnp.vdot(OPS[op](features, b), cot)

  numeric = reference.central_differences(loss, boxes, 1e-6)
  np.testing.assert_allclose(jax.grad(loss)(boxes), numeric, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("ratio", some([-1, 2]))
@pytest.mark.parametrize("aligned", some([False, True]))
def test_float64_matches_a_float64_reference(mode, ratio, aligned):
  features = np.asarray(_features(3))
  rng = np.random.default_rng(4)
  lo = rng.uniform(-3, 8, (6, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.3, 9, (6, 2))], 1)
  indices = rng.integers(0, 2, 6).astype(np.int32)
  kwargs = dict(spatial_scale=0.7, sampling_ratio=ratio, aligned=aligned, mode=mode)
  out = roipool_jax.roi_align(features, boxes, (3, 2), box_indices=indices, **kwargs)
  expected = reference.roi_align(
    features, boxes, indices, (3, 2), 0.7, ratio, aligned, mode, dtype=np.float64
  )
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-12, atol=1e-13)


def test_roi_pool_geometry_is_float64():
  # 0.4999999999 rounds to 0 in float64; as float32 it is 0.5, which rounds to 1.
  features = jnp.asarray(np.arange(16.0).reshape(1, 4, 4, 1)[:, :, ::-1])
  boxes = np.array([[0.4999999999, 0.0, 0.4999999999, 3.0]])
  out = roipool_jax.roi_pool(features, boxes, (1, 1))
  expected, _ = reference.roi_pool(np.asarray(features), boxes, [0], (1, 1), 1.0)
  assert out.dtype == jnp.float64 and float(out[0, 0, 0, 0]) == expected[0, 0, 0, 0] == 15.0
  # The float32 computation reads column 1 instead.
  out32 = roipool_jax.roi_pool(features.astype(jnp.float32), boxes, (1, 1))
  assert float(out32[0, 0, 0, 0]) == 14.0


def test_float32_features_stay_float32_with_float64_boxes():
  # Under x64, Python-float boxes become float64; float32 features keep float32 semantics.
  features = _features(5).astype(jnp.float32)
  boxes = jnp.asarray(BOXES, jnp.float64)
  out = roipool_jax.roi_align(features, boxes, 2, box_indices=INDICES)
  expected = roipool_jax.roi_align(features, boxes.astype(jnp.float32), 2, box_indices=INDICES)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
  grad = jax.grad(lambda b: jnp.sum(roipool_jax.roi_align(features, b, 2, box_indices=INDICES)))
  assert grad(boxes).dtype == jnp.float64


def test_exact_division_in_float64():
  from roipool_jax._src.boxes import exact_div

  rng = np.random.default_rng(6)
  x = np.concatenate([rng.integers(0, 2**40, 20000) / 7.0, rng.uniform(-1e6, 1e6, 20000)])
  for divisor in (1, 3, 7, 13, 49, 224, 2**22 - 3):
    got = np.asarray(exact_div(jnp.asarray(x, jnp.float64), divisor))
    np.testing.assert_array_equal(got, x / divisor)
