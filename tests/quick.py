"""How many cases a test runs: fewer in the quick default run (``pytest -m "not slow"``).

The quick run keeps every kind of check but fewer cases of each: :func:`some`
turns a parameter list into ``pytest.param`` entries and marks all but a few,
spread over the list, ``slow``. The full suite (plain ``pytest``) runs them all.
:func:`examples` gives a property whose every example compiles several programs
a share of the hypothesis profile's examples (tests/conftest.py sets the profile).
"""

from __future__ import annotations

from collections.abc import Sequence

import hypothesis
import pytest


def some(values: Sequence, keep: int = 1, start: int = 0) -> list:
  """``values`` as pytest params, all but ``keep`` of them (first, last, evenly between) slow.

  ``start`` rotates the kept ones (tests of one family keep different values).
  A tuple value is unpacked into several arguments, as a multi-name
  ``parametrize`` expects.
  """
  values = list(values)
  if keep >= len(values):
    chosen = set(range(len(values)))
  elif keep == 1:
    chosen = {0}
  else:
    chosen = {round(i * (len(values) - 1) / (keep - 1)) for i in range(keep)}
  chosen = {(i + start) % len(values) for i in chosen}
  params = []
  for i, value in enumerate(values):
    marks = () if i in chosen else (pytest.mark.slow,)
    args = value if isinstance(value, tuple) else (value,)
    params.append(pytest.param(*args, marks=marks))
  return params


def examples(divisor: int) -> int:
  """``max_examples`` for a costly property: the profile's ``max_examples // divisor``, >= 1.

  A property that compiles new programs for every example (new shapes and
  static options) spends seconds per example; its share scales with the
  profile, so a ``thorough`` run still draws many fresh examples.
  """
  return max(1, hypothesis.settings().max_examples // divisor)
