"""Sphinx configuration: API reference from the docstrings, notebooks rendered by myst-nb.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.
The repository URL comes from ``[project.urls]`` in pyproject.toml, the one place it is defined.
"""

import os
import pathlib
import shutil
import sys

if sys.version_info >= (3, 11):
  import tomllib
else:  # Python 3.10
  import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import roipool_jax  # noqa: E402

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REPOSITORY = PROJECT["urls"]["Repository"]

project = "roipool_jax"
author = "The roipool_jax Authors"
copyright = "2026, The roipool_jax Authors"
release = version = roipool_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
  "myst_nb",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "README.md"]

# Google-style docstrings; the field lists of the Flax modules are their "Attributes".
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = False
myst_enable_extensions = ["colon_fence", "dollarmath", "substitution"]
myst_substitutions = {"repository": REPOSITORY}
suppress_warnings = ["myst.header"]

# The notebooks live in notebooks/ (where the tests run them); they are copied here and run as
# the docs build, so every figure on the site is computed by this version of the library.
# ROIPOOL_DOCS_EXECUTE=off renders them without outputs (a quick local build).
NOTEBOOKS = pathlib.Path(__file__).parent / "notebooks"
NOTEBOOKS.mkdir(exist_ok=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
  shutil.copy(notebook, NOTEBOOKS / notebook.name)
nb_execution_mode = os.environ.get("ROIPOOL_DOCS_EXECUTE", "force")
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_merge_streams = True

html_theme = "furo"
html_title = f"roipool_jax {release}"
html_theme_options = {
  "source_repository": REPOSITORY,
  "source_branch": "main",
  "source_directory": "docs/",
}
