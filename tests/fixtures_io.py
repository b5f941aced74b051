"""Reads the committed torchvision parity fixtures (tools/make_torchvision_fixtures.py)."""

import pathlib

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
