"""Parity fixtures (tools/make_torchvision_fixtures.py, tensorflow_parity.py): reading, checking."""

import pathlib

import jax.numpy as jnp
import numpy as np

DIRECTORY = pathlib.Path(__file__).parent / "fixtures"


def load_cases(filename: str) -> dict[str, dict[str, np.ndarray]]:
  """``{case: {field: array}}`` from an npz whose keys are ``"case/field"``."""
  data = np.load(DIRECTORY / filename)
  cases = {}
  for key in data.files:
    case, field = key.split("/")
    cases.setdefault(case, {})[field] = data[key]
  return cases


def assert_gradients_match(vjp, cotangent, expected, tol=1e-5):
  """Checks ``vjp(cotangent)`` against the stored gradients ``expected`` (one per input).

  A gradient cell sums the cotangents of every output that read it, weighted
  by non-negative weights, in another order than the reference library. So each
  cell may differ by ``tol`` times (1 + the sum of the magnitudes of those terms),
  which is what ``vjp(|cotangent|)`` computes.
  """
  grads = vjp(jnp.asarray(cotangent))
  magnitudes = vjp(jnp.abs(jnp.asarray(cotangent)))
  for i, (grad, want, size) in enumerate(zip(grads, expected, magnitudes, strict=True)):
    grad = np.asarray(grad)
    error = np.abs(grad - want)
    bound = tol * (1 + np.asarray(size))
    worst = tuple(int(j) for j in np.unravel_index(np.argmax(error - bound), error.shape))
    assert np.all(error <= bound), (
      f"gradient {i}: {np.sum(error > bound)} of {error.size} cells off; at {worst}"
      f" {grad[worst]} against {want[worst]} (allowed {bound[worst]:.3g})"
    )
