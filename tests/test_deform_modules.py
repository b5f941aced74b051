"""Tests of the learned deformable RoI pooling modules (Linen and NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import roipool_jax
from roipool_jax import linen as roi_linen
from roipool_jax import nnx as roi_nnx
from tests.devices import run_on_cpu_devices
from tests.quick import some

# mmcv's tests/test_ops/test_deform_roi_pool.py (DeformRoIPoolPack, 2x2 bins,
# sampling_ratio=2, zero-initialized offsets): NCHW input, box, output, input
# gradient of out.sum().
MMCV_CASES = [
  (
    [[[[1.0, 2.0], [3.0, 4.0]]]],
    [0.0, 0.0, 1.0, 1.0],
    [[[[1, 1.25], [1.5, 1.75]]]],
    [[[[3.0625, 0.4375], [0.4375, 0.0625]]]],
  ),
  (
    [[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]],
    [0.0, 0.0, 1.0, 1.0],
    [[[[1.0, 1.25], [1.5, 1.75]], [[4, 3.75], [3.5, 3.25]]]],
    [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]],
  ),
  (
    [[[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0], [9.0, 10.0, 13.0, 14.0], [11, 12, 15, 16]]]],
    [0.0, 0.0, 3.0, 3.0],
    [[[[1.9375, 4.75], [7.5625, 10.375]]]],
    [
      [
        [
          [0.47265625, 0.4296875, 0.4296875, 0.04296875],
          [0.4296875, 0.390625, 0.390625, 0.0390625],
          [0.4296875, 0.390625, 0.390625, 0.0390625],
          [0.04296875, 0.0390625, 0.0390625, 0.00390625],
        ]
      ]
    ],
  ),
]
OPTIONS = dict(sampling_ratio=2, deform_fc_channels=16)


def nhwc(x):
  return np.asarray(x, np.float32).transpose(0, 2, 3, 1)


def _linen(modulated, **options):
  cls = roi_linen.ModulatedDeformRoIPool if modulated else roi_linen.DeformRoIPool
  return cls(**{"output_size": 2, **OPTIONS, **options})


def _nnx(modulated, channels, **options):
  cls = roi_nnx.ModulatedDeformRoIPool if modulated else roi_nnx.DeformRoIPool
  return cls(2, channels, **{**OPTIONS, **options}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "case, modulated", some([(c, m) for c in range(len(MMCV_CASES)) for m in (False, True)], 2)
)
def test_fresh_modules_give_mmcv_published_values(case, modulated):
  features, box, expected, grad = (np.asarray(x, np.float32) for x in MMCV_CASES[case])
  features, expected, grad = nhwc(features), nhwc(expected), nhwc(grad)
  boxes = box[None]
  scale = 0.5 if modulated else 1.0  # the mask starts at sigmoid(0)
  layer = _linen(modulated)
  params = layer.init(jax.random.key(0), features, boxes)
  out, vjp = jax.vjp(lambda f: layer.apply(params, f, boxes), features)
  np.testing.assert_allclose(out, scale * expected, rtol=1e-6)
  np.testing.assert_allclose(vjp(jnp.ones_like(out))[0], scale * grad, rtol=1e-6)
  module = _nnx(modulated, features.shape[-1])
  np.testing.assert_allclose(module(features, boxes), scale * expected, rtol=1e-6)


def _problem():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((2, 12, 14, 3)).astype(np.float32)
  lo = rng.uniform(0, 60, (5, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(8, 50, (5, 2))], 1).astype(np.float32)
  return features, boxes, np.array([0, 1, 1, 0, 1], np.int32)


@pytest.mark.parametrize("modulated", some([False, True]))
def test_training_moves_the_offsets_and_the_output(modulated):
  features, boxes, indices = _problem()
  layer = _linen(modulated, spatial_scale=0.25)
  params = layer.init(jax.random.key(0), features, boxes, indices)
  target = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2, 2, 3)), jnp.float32)

  def loss(p):
    return jnp.mean((layer.apply(p, features, boxes, indices) - target) ** 2)

  grads = jax.grad(loss)(params)
  last = grads["params"]["offset_fc3"]["kernel"]
  assert np.count_nonzero(np.asarray(last)) > 0  # zero weights, non-zero gradient
  opt = optax.adam(1e-2)
  state = opt.init(params)
  step = jax.jit(lambda p, s: _step(opt, loss, p, s))
  first = loss(params)
  for _ in range(20):
    params, state = step(params, state)
  assert loss(params) < first
  moved = params["params"]["offset_fc3"]["kernel"]
  assert np.abs(np.asarray(moved)).max() > 0


def _step(opt, loss, params, state):
  grads = jax.grad(loss)(params)
  updates, state = opt.update(grads, state)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("modulated", [False, True])
def test_linen_and_nnx_agree_with_the_same_weights(modulated):
  features, boxes, indices = _problem()
  layer = _linen(modulated, spatial_scale=0.25, sampling_ratio=0)
  rng = np.random.default_rng(2)
  params = jax.tree.map(
    lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, x.dtype),
    layer.init(jax.random.key(0), features, boxes, indices),
  )
  module = _nnx(modulated, 3, spatial_scale=0.25, sampling_ratio=0)
  for name, leaves in params["params"].items():
    getattr(module, name).kernel[...] = leaves["kernel"]
    getattr(module, name).bias[...] = leaves["bias"]
  want = layer.apply(params, features, boxes, indices)
  np.testing.assert_allclose(module(features, boxes, indices), want, rtol=1e-6, atol=1e-6)
  # The offsets are used: not plain RoIAlign any more.
  plain = roipool_jax.roi_align(
    features, boxes, 2, spatial_scale=0.25, aligned=True, box_indices=indices
  )
  assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 1e-3


def test_init_and_apply_under_jit_inside_a_model():
  features, boxes, indices = _problem()

  class Head(nn.Module):
    @nn.compact
    def __call__(self, f, b, i):
      pooled = roi_linen.DeformRoIPool(output_size=2, spatial_scale=0.25, deform_fc_channels=8)(
        f, b, i
      )
      return nn.Dense(4)(pooled.reshape(pooled.shape[0], -1))

  head = Head()
  params = jax.jit(head.init)(jax.random.key(0), features, boxes, indices)
  assert params["params"]["DeformRoIPool_0"]["offset_fc1"]["kernel"].shape == (12, 8)
  out = jax.jit(head.apply)(params, features, boxes, indices)
  assert out.shape == (5, 4)
  module = _nnx(True, 3, spatial_scale=0.25)
  jitted = nnx.jit(lambda m, f: m(f, boxes, indices))(module, features)
  np.testing.assert_allclose(jitted, module(features, boxes, indices), rtol=1e-6, atol=1e-7)


def test_wrong_channels_and_options_raise_clear_errors():
  features, boxes, indices = _problem()
  with pytest.raises(ValueError, match=r"`features`.*C = 4 channels.*\(2, 12, 14, 3\)"):
    _nnx(False, 4)(features, boxes, indices)
  with pytest.raises(ValueError, match="`deform_fc_channels`"):
    _nnx(False, 3, deform_fc_channels=0)
  with pytest.raises(TypeError, match="`channels`"):
    roi_nnx.DeformRoIPool(2, 3.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`gamma`"):
    _linen(False, gamma=float("nan")).init(jax.random.key(0), features, boxes, indices)
  with pytest.raises(ValueError, match="`output_size`"):
    _linen(False, output_size=0).init(jax.random.key(0), features, boxes, indices)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from roipool_jax import linen as roi_linen
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
features = rng.standard_normal((2, 12, 14, 4)).astype(np.float32)
lo = rng.uniform(0, 60, (16, 2))
boxes = np.concatenate([lo, lo + rng.uniform(8, 50, (16, 2))], 1).astype(np.float32)
indices = (np.arange(16) % 2).astype(np.int32)
layer = roi_linen.ModulatedDeformRoIPool(output_size=2, spatial_scale=0.25, deform_fc_channels=32)
params = layer.init(jax.random.key(0), features, boxes, indices)
params = jax.tree.map(lambda x: x + 0.01, params)  # non-zero offsets
want = layer.apply(params, features, boxes, indices)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
def place(path, x):  # hidden layers split over "model", the rest replicated
  spec = P(None, "model") if x.ndim == 2 and x.shape[1] == 32 else P()
  return jax.device_put(x, NamedSharding(mesh, spec))
sharded = jax.tree_util.tree_map_with_path(place, params)
b = jax.device_put(boxes, NamedSharding(mesh, P("data")))
i = jax.device_put(indices, NamedSharding(mesh, P("data")))
got = jax.jit(layer.apply)(sharded, features, b, i)
np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply(p, features, b, i) ** 2)))(sharded)
k = grads["params"]["offset_fc1"]["kernel"]
assert k.sharding.spec == P(None, "model") or k.sharding.is_fully_replicated is False, k.sharding
print("sharded == single")
"""


@pytest.mark.slow  # a subprocess with 8 devices; the example's sharded step runs in the quick run
def test_parameters_shard_like_any_flax_parameter():
  assert "sharded == single" in run_on_cpu_devices(SHARDED)
