"""`python -m roipool_jax` reproduces the article's worked example."""

import subprocess
import sys


def test_demo_reproduces_the_article():
  out = subprocess.run(
    [sys.executable, "-m", "roipool_jax"], capture_output=True, text=True, check=True, timeout=120
  ).stdout
  for fact in [
    "16x16x512",
    "296/32 = 9.25  -> floor 9",
    "192/32 = 6.00  -> floor 6",
    "200/32 = 6.25  -> floor 6",
    "145/32 = 4.53  -> floor 4",
    "3x3 bins of 1 row x 2 columns",
    "Rows [(6, 7), (7, 8), (8, 9)], columns [(9, 11), (11, 13), (13, 15)]",
    "the lost bottom row",
    "-> (3, 3, 512) per RoI",
    "Rows [(6, 8), (8, 10), (10, 12)], columns [(9, 12), (11, 15), (14, 16)]",
  ]:
    assert fact in out, fact
