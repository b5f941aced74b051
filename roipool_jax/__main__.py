"""Runs the article's worked example: ``python -m roipool_jax``."""

from roipool_jax._src.demo import main

if __name__ == "__main__":
  main()
