import os

os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Every new shape recompiles: few examples, shapes drawn from small sets, no deadline. The
# examples are derandomized (the same on every run) except in "thorough".
#   quick:    the default run (`-m "not slow"`): every property, with few examples;
#   default:  the full suite (`pytest`);
#   thorough: a long local run with fresh examples (HYPOTHESIS_PROFILE=thorough).
hypothesis.settings.register_profile("quick", max_examples=6, deadline=None, derandomize=True)
hypothesis.settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.register_profile("thorough", max_examples=300, deadline=None)


def pytest_collection_modifyitems(config, items):
  """Notebooks 02 (trains a detector) and 03 (the torchvision port, whose parity the quick run
  tests in tests/test_torchvision_heads.py) run in the full suite; notebook 01 is the quick
  run's notebook smoke test."""
  for item in items:
    if item.nodeid.startswith(("notebooks/02_", "notebooks/03_")):
      item.add_marker(pytest.mark.slow)


def pytest_configure(config):
  quick = "not slow" in (config.getoption("markexpr") or "")
  profile = os.environ.get("HYPOTHESIS_PROFILE", "quick" if quick else "default")
  hypothesis.settings.load_profile(profile)
  if quick:
    # Tiny test shapes spend most of their time in XLA's LLVM passes: the quick run compiles
    # without them (a quarter less time; the same HLO and results). The full suite compiles
    # as users do. XLA reads the flags when the backend starts, after this hook.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """Drop compiled executables after each test module: thousands accumulate over the suite,
  and a process holding them all compiles and runs markedly slower."""
  yield
  jax.clear_caches()
