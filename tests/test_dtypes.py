"""The 16-bit conversions the kernels use in place of XLA's converts are exact."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import roipool_jax
from roipool_jax._src import dtypes


def _float32_edge_cases():
  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
  ties = (bits & 0xFFFF0000) | 0x8000  # exactly halfway between two bfloat16s
  near = np.concatenate([ties - 1, ties + 1])
  x = np.concatenate([bits, ties, near]).view(np.float32)
  special = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-45, 65504.0]
  return np.concatenate([x, np.array(special, np.float32)])


def test_narrow_rounds_to_bfloat16_like_numpy():
  x = _float32_edge_cases()
  got = np.asarray(dtypes.narrow(jnp.asarray(x), jnp.bfloat16))
  with np.errstate(invalid="ignore"):  # NaN inputs
    want = x.astype(ml_dtypes.bfloat16)
  assert got.dtype == want.dtype
  nan = np.isnan(want.astype(np.float32))
  np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
  np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))
  bits = dtypes.narrow_bits(jnp.asarray(x), jnp.bfloat16)
  assert bits.dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(dtypes.from_bits(bits, jnp.bfloat16))[~nan], got[~nan])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_narrow_is_astype_for_other_dtypes(dtype):
  x = jnp.asarray(_float32_edge_cases())
  np.testing.assert_array_equal(dtypes.narrow(x, dtype), x.astype(dtype))
  np.testing.assert_array_equal(
    dtypes.from_bits(dtypes.narrow_bits(x, dtype), dtype), x.astype(dtype)
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_order_keys_sort_every_16_bit_pattern_as_its_value(dtype):
  bits = np.arange(2**16, dtype=np.uint16)
  values = bits.view(dtype).astype(np.float64)
  keys = np.asarray(dtypes.order_keys(jnp.asarray(bits), dtype)).astype(np.int64)
  nan = np.isnan(values)
  assert nan.sum() > 0 and np.all(keys[nan] == 0xFFFF)
  assert np.all(keys[~nan] < 0xFFFF) and keys.min() > 0  # 0 is below every value
  # Sorted by value, the keys rise exactly where the values do: equal values (+0 and
  # -0 included) have equal keys, larger values larger keys.
  order = np.argsort(values[~nan], kind="stable")
  step_v, step_k = np.diff(values[~nan][order]), np.diff(keys[~nan][order])
  assert np.all(step_k[step_v > 0] > 0) and np.all(step_k[step_v == 0] == 0)
  assert keys[0x8000] == keys[0] == 0x8000  # -0 and +0
  back = np.asarray(dtypes.key_bits(jnp.asarray(keys.astype(np.uint16)))).view(dtype)
  back = back.astype(np.float64)
  np.testing.assert_array_equal(back[~nan], values[~nan])
  assert np.all(np.isnan(back[nan]))
  assert not np.any(np.signbit(back[values == 0]))  # zeros come back +0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gather_rows_reads_exact_values(dtype):
  x = _float32_edge_cases()[: 40 * 7].reshape(40, 7)
  table = jnp.asarray(x).astype(dtype)
  cells = jnp.asarray([[3, 0, 39], [3, 17, 5]], jnp.int32)
  rows = dtypes.gather_rows(table, cells)
  assert rows.shape == (2, 3, 7) and rows.dtype == dtypes.row_dtype(dtype)
  want = np.asarray(table.astype(rows.dtype))[np.asarray(cells)]
  np.testing.assert_array_equal(np.asarray(rows), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gather_rows_reads_a_lane_table_as_its_transpose(dtype):
  x = _float32_edge_cases()[: 8 * 7 * 5].reshape(8, 7, 5)  # [M, C, P]: 8 * 5 rows of 7
  table = jnp.asarray(x).astype(dtype)
  assert dtypes.table_rows(table) == 40
  cells = jnp.asarray([[0, 4, 5, 39], [23, 23, 1, 38]], jnp.int32)
  rows = dtypes.gather_rows(table, cells)
  assert rows.shape == (2, 4, 7) and rows.dtype == dtypes.row_dtype(dtype)
  transposed = np.swapaxes(np.asarray(table.astype(rows.dtype)), 1, 2).reshape(40, 7)
  np.testing.assert_array_equal(np.asarray(rows), transposed[np.asarray(cells)])


def test_narrow_differentiates_as_astype():
  x = jnp.asarray(np.linspace(-3, 3, 11), jnp.float32)
  cot = jnp.asarray(np.arange(11), jnp.bfloat16)
  grad = jax.grad(lambda v: jnp.vdot(dtypes.narrow(v, jnp.bfloat16), cot).astype(jnp.float32))
  want = jax.grad(lambda v: jnp.vdot(v.astype(jnp.bfloat16), cot).astype(jnp.float32))
  np.testing.assert_array_equal(grad(x), want(x))
  assert np.any(np.asarray(grad(x)) != 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_feature_gradients_agree_across_impls(dtype):
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.standard_normal((1, 6, 7, 2)), dtype)
  boxes = jnp.asarray([[0.7, 1.6, 5.2, 4.0], [6.0, -0.1, 11.6, 1.3], [0.8, 2.3, 1.6, 4.2]])
  cot = jnp.asarray(rng.standard_normal((3, 2, 2, 2)), jnp.float32)

  def grad(impl):
    def loss(f):
      out = roipool_jax.roi_align(f, boxes, 2, sampling_ratio=-1, impl=impl)
      return jnp.vdot(out.astype(jnp.float32), cot)

    return np.asarray(jax.grad(loss)(features), np.float32)

  gather, einsum = grad("gather"), grad("einsum")
  assert np.abs(gather).max() > 0.1
  np.testing.assert_allclose(einsum, gather, rtol=2e-2, atol=2e-2)
