"""Eager calls and compilation: K is padded to buckets, one program per call at most."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import roipool_jax
import roipool_jax.torchvision as tv
from roipool_jax._src import boxes as boxes_lib


class _Compiles(logging.Handler):
  """Collects the names of the programs XLA compiles while installed."""

  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.names.append(message.split()[1])


@pytest.fixture
def compiles():
  handler = _Compiles()
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  with jax.log_compiles(True):
    yield handler.names
  logger.removeHandler(handler)


def _boxes(k, seed):
  rng = np.random.default_rng(seed)
  corners = np.sort(rng.uniform(-10, 140, (k, 2, 2)), axis=1)  # [k, (lo, hi), (x, y)]
  return corners.reshape(k, 4).astype(np.float32), rng.integers(0, 2, k).astype(np.int32)


def _offsets(b, dtype):
  """Deformable offsets ``[K, 3, 3, 2]`` made from the boxes: on the host for concrete boxes,
  so that the test itself compiles nothing per K."""
  xp = jnp if isinstance(b, jax.core.Tracer) else np
  angle = b[:, :1, None, None] + xp.arange(18, dtype=np.float32).reshape(1, 3, 3, 2)
  return xp.sin(angle).astype(dtype)


OPS = {
  "roi_pool": lambda f, b, i: roipool_jax.roi_pool(f, b, 3, spatial_scale=0.25, box_indices=i),
  "roi_align": lambda f, b, i: roipool_jax.roi_align(f, b, 3, spatial_scale=0.25, box_indices=i),
  "roi_warp": lambda f, b, i: roipool_jax.roi_warp(f, b, 3, spatial_scale=0.25, box_indices=i),
  "deform_roi_pool": lambda f, b, i: roipool_jax.deform_roi_pool(
    f, b, None, 3, spatial_scale=0.25, sampling_ratio=2, box_indices=i
  ),
  "deform_roi_pool, bfloat16 offsets": lambda f, b, i: roipool_jax.deform_roi_pool(
    f, b, _offsets(b, jnp.bfloat16), 3, spatial_scale=0.25, sampling_ratio=2, box_indices=i
  ),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_nearby_k_reuses_one_compiled_program(op, compiles):
  jax.clear_caches()  # the programs of other parametrizations may hold this one
  features = jax.device_put(np.random.default_rng(0).standard_normal((2, 12, 16, 5)))
  b, i = _boxes(48, 1)
  OPS[op](features, b[:41], i[:41])  # K = 41: bucket 48, compiles
  assert len(compiles) == 1, compiles
  for k in (42, 45, 48):  # same bucket: nothing compiles
    compiles.clear()
    assert OPS[op](features, b[:k], i[:k]).shape[0] == k
    assert compiles == [], compiles
  compiles.clear()
  OPS[op](features, *_boxes(49, 2))  # next bucket (56): exactly one program
  assert len(compiles) == 1, compiles


@pytest.mark.parametrize("op", sorted(OPS))
def test_padded_eager_call_equals_the_jitted_call(op):
  features = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, 16, 5)), jnp.float32)
  b, i = _boxes(37, 4)
  b[3] = np.nan  # an invalid box among the real ones
  eager = OPS[op](features, b, i)
  jitted = jax.jit(OPS[op])(features, b, i)  # traced: K stays 37, no padding
  assert eager.shape == jitted.shape == (37, 3, 3, 5)
  np.testing.assert_array_equal(eager, jitted)
  assert not np.any(np.asarray(eager[3]))


def test_per_image_boxes_are_padded_in_flat_form(compiles):
  features = jax.device_put(np.random.default_rng(5).standard_normal((2, 12, 16, 5)))
  b, _ = _boxes(20, 6)
  op = lambda f, x: roipool_jax.roi_align(f, x, 2, spatial_scale=0.25)  # noqa: E731
  out = op(features, b[:18].reshape(2, 9, 4))  # 18 boxes: bucket 20
  assert len(compiles) == 1, compiles
  compiles.clear()
  op(features, b.reshape(2, 10, 4))  # 20: the same bucket, and nothing else compiles
  assert compiles == [], compiles
  expected = jax.jit(op)(features, b[:18].reshape(2, 9, 4))
  assert out.shape == (2, 9, 2, 2, 5)
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
  "k, expected", [(0, 8), (1, 8), (8, 8), (9, 10), (17, 20), (100, 112), (128, 128), (129, 160)]
)
def test_buckets_pad_at_most_a_quarter(k, expected):
  assert boxes_lib.bucket(k) == expected
  for k in range(9, 3000):
    assert k <= boxes_lib.bucket(k) <= 1.25 * k


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_exact_upcast(dtype):
  # 16-bit maps are computed in float32 (on CPU by converting the map first): max pooling
  # gives the same values, RoIAlign the float32 result rounded once.
  features = jnp.asarray(np.random.default_rng(7).standard_normal((2, 12, 16, 5)), dtype)
  b, i = _boxes(9, 8)
  wide = features.astype(jnp.float32)
  for op in OPS.values():
    got = op(features, b, i)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, op(wide, b, i).astype(dtype))


def test_materialize_is_the_identity_and_a_fusion_boundary():
  # Values pass through bit for bit, whatever the predicate reads (NaN, -0.0, ints, empty).
  floats = jnp.array([np.nan, -0.0, np.inf, -3.5, 1e-30], jnp.float32)
  ints = jnp.array([[7, -2], [0, 5]], jnp.int32)
  out = jax.jit(boxes_lib.materialize)((jnp.zeros((0, 3)), floats, ints))
  assert out[0].shape == (0, 3)
  np.testing.assert_array_equal(
    np.asarray(out[1]).view(np.int32), np.asarray(floats).view(np.int32)
  )
  np.testing.assert_array_equal(out[2], ints)
  # Its derivative is the identity's.
  grad = jax.grad(lambda x: jnp.sum(boxes_lib.materialize(x * x)))(jnp.array([1.5, -2.0]))
  np.testing.assert_array_equal(grad, [3.0, -4.0])
  # So do they when the predicate reads a key instead (NaN, empty: then the first leaf).
  for key in (jnp.array([np.nan, 1.0]), jnp.zeros((0,)), jnp.array([-0.0])):
    keyed = jax.jit(boxes_lib.materialize)((floats, ints), key=key)
    np.testing.assert_array_equal(
      np.asarray(keyed[0]).view(np.int32), np.asarray(floats).view(np.int32)
    )
    np.testing.assert_array_equal(keyed[1], ints)

  # The product stays a kernel of its own: consumers read it instead of recomputing it (and
  # contracting it with their adds into FMAs). This pins XLA's behaviour that the box geometry
  # relies on; a new XLA that fused across the conditional would fail here.
  def geometry(x):
    product = boxes_lib.materialize(x * 1.7)
    return product[:, None] + jnp.arange(7.0)[None], jnp.floor(product)

  hlo = jax.jit(geometry).lower(jnp.linspace(0.0, 9.0, 33)).compile().as_text()
  assert " conditional(" in hlo


def _long_division_kernels(fn, *args) -> int:
  """How many compiled kernels run :func:`boxes.exact_div`'s division of the significand."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  bodies = hlo.split("\n}\n")
  # Its ~70 instructions (integer divisions, shifts and the rounding) carry its name; a
  # consumer may hold a stray select of it.
  return sum(
    body.lstrip().startswith("%fused") and body.count("_long_division") > 40 for body in bodies
  )


@pytest.mark.parametrize(
  "op, size, kernels",
  [
    ("roi_pool", 7, 1),  # square: both axes in one [K, 2] division
    ("roi_pool", (7, 5), 2),
    ("ps_roi_pool", 7, 1),
    ("roi_align", 7, 1),  # adaptive grid
    ("roi_align", (5, 7), 2),
  ],
)
def test_box_geometry_runs_each_long_division_once(op, size, kernels):
  # The exact division is dozens of instructions, a large share of the bin geometry's compile
  # time. XLA duplicates it into every consumer kernel unless the quotient is materialized
  # (roi_pool's square bins: 6 copies before, 1 now).
  features = jnp.zeros((2, 24, 20, 49 if op == "ps_roi_pool" else 3), jnp.float32)
  b, i = _boxes(5, 0)
  fn = lambda f, b, i: getattr(roipool_jax, op)(f, b, size, spatial_scale=0.25, box_indices=i)  # noqa: E731
  assert _long_division_kernels(fn, features, b, i) == kernels


def _rois(k, seed):
  b, i = _boxes(k, seed)
  return np.concatenate([i[:, None].astype(np.float32), b], axis=1)


TV_OPS = {  # x: NCHW P2 and P3 maps
  "roi_pool": lambda x, rois: tv.roi_pool(x[0], rois, 3, 0.25),
  "roi_align": lambda x, rois: tv.roi_align(x[0], rois, 3, 0.25, 2, True),
  "ps_roi_pool": lambda x, rois: tv.ps_roi_pool(x[0], rois, 2, 0.25),
  "ps_roi_align": lambda x, rois: tv.ps_roi_align(x[0], rois, 2, 0.25, -1),
  "box list": lambda x, rois: tv.roi_align(
    x[0], [rois[rois[:, 0] == n, 1:] for n in range(2)], 3, 0.25, 2, True
  ),
  "MultiScaleRoIAlign": lambda x, rois: tv.MultiScaleRoIAlign(["p2", "p3"], 3, 2)(
    {"p2": x[0], "p3": x[1]}, [rois[rois[:, 0] == n, 1:] for n in range(2)], [(48, 64)] * 2
  ),
}


@pytest.mark.parametrize("op", sorted(TV_OPS))
def test_torchvision_layer_compiles_one_program_per_bucket(op, compiles):
  # The NCHW layer pads K as the NHWC ops do, and its transposes and rois split compile with
  # the op: an eager call with a new K compiles at most one program.
  jax.clear_caches()  # the programs of other parametrizations may hold this one
  p2 = np.random.default_rng(0).standard_normal((2, 8, 12, 16))
  features = (jax.device_put(p2), jax.device_put(p2[:, :, ::2, ::2]))  # NCHW P2 and P3
  rois = _rois(48, 1)
  rois = rois[np.argsort(rois[:, 0], kind="stable")]  # box lists keep the rois' order
  first = TV_OPS[op](features, rois[:41])  # K = 41: bucket 48
  assert len(compiles) == 1, compiles
  for k in (42, 45, 48):  # same bucket: nothing compiles
    compiles.clear()
    out = TV_OPS[op](features, rois[:k])
    assert compiles == [], compiles
    assert out.shape[0] == k
    np.testing.assert_array_equal(out[:41], first)  # padding changes no box's result
  traced = jax.jit(lambda x: TV_OPS[op](x, rois[:45]))(features)  # traced: K stays 45, unpadded
  # Another program (K = 45, other chunks): adaptive sums may round differently in the last bit.
  np.testing.assert_allclose(traced, out[:45], rtol=1e-6, atol=1e-6)
