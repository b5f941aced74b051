import os

os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Every new shape recompiles: few examples, shapes drawn from small sets, no deadline.
hypothesis.settings.register_profile("default", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.register_profile("thorough", max_examples=300, deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """Drop compiled executables after each test module: thousands accumulate over the suite,
  and a process holding them all compiles and runs markedly slower."""
  yield
  jax.clear_caches()
