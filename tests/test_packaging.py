"""Packaging: one repository URL, one version, the notebooks' install cell, the sdist, typing."""

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

if sys.version_info >= (3, 11):
  import tomllib
else:  # Python 3.10
  import tomli as tomllib
import tarfile
import venv

import pytest

import roipool_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = PYPROJECT["project"]["urls"]["Repository"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
GITHUB = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+")


def install_cell(notebook: pathlib.Path) -> str:
  """The source of the notebook's first code cell: the install step."""
  cells = json.loads(notebook.read_text())["cells"]
  return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_version_has_one_source():
  assert PYPROJECT["project"]["dynamic"] == ["version"]
  assert "version" not in PYPROJECT["project"]
  assert importlib.metadata.version("roipool_jax") == roipool_jax.__version__
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert f"## [{roipool_jax.__version__}]" in changelog


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_install_from_the_project_urls(notebook):
  cell = install_cell(notebook)
  assert f'REPO_URL = "{REPOSITORY}"' in cell
  assert set(GITHUB.findall(notebook.read_text())) <= {REPOSITORY}
  # Every notebook installs the same way, so one test of the cell covers them all.
  assert cell == install_cell(NOTEBOOKS[0])


def test_readme_badges_and_links_use_the_project_urls():
  readme = (ROOT / "README.md").read_text()
  owner_repo = REPOSITORY.removeprefix("https://github.com/")
  for notebook in NOTEBOOKS:
    badge = (
      f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{notebook.name}"
    )
    assert badge in readme, f"no Colab badge for {notebook.name}"
  for url in GITHUB.findall(readme):
    assert url == REPOSITORY, url
  for url in PYPROJECT["project"]["urls"].values():
    assert url.startswith(REPOSITORY), url


def _wheel(tmp_path) -> pathlib.Path:
  out = tmp_path / "dist"
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
    check=True,
  )
  (wheel,) = out.glob("roipool_jax-*.whl")
  return wheel


@pytest.mark.slow
def test_install_cell_installs_by_name_and_falls_back_to_the_repository(tmp_path):
  """Runs the cell in a fresh environment without roipool_jax: first with an index that has
  the package (a folder holding the built wheel), then with one that does not, where the cell
  must fall back to the repository URL (pointed here at the same wheel, as a file URL)."""
  wheel = _wheel(tmp_path)
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=True)
  python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
  cell = install_cell(NOTEBOOKS[0])
  check = "import importlib.util; assert importlib.util.find_spec('roipool_jax')"

  def run(index: pathlib.Path, source: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index), PIP_NO_DEPS="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run(
      [str(python), "-c", source + "\n" + check],
      env=env,
      cwd=tmp_path,
      capture_output=True,
      text=True,
    )

  # The environment starts without the package.
  assert run(tmp_path, "").returncode != 0
  by_name = run(wheel.parent, cell)
  assert by_name.returncode == 0, by_name.stderr
  assert "installing it from" not in by_name.stdout
  subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "roipool_jax"], check=True)

  empty = tmp_path / "empty_index"
  empty.mkdir()
  assert "git+{REPO_URL}" in cell
  fallback_cell = cell.replace("git+{REPO_URL}", wheel.as_uri())
  fallback = run(empty, fallback_cell)
  assert fallback.returncode == 0, fallback.stderr
  assert f"installing it from {REPOSITORY}" in fallback.stdout


@pytest.mark.slow
def test_sdist_carries_what_its_tests_need(tmp_path):
  subprocess.run(
    [sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(ROOT)],
    check=True,
    capture_output=True,
  )
  (sdist,) = tmp_path.glob("roipool_jax-*.tar.gz")
  with tarfile.open(sdist) as archive:
    names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
  tracked = subprocess.run(
    ["git", "ls-files", "roipool_jax", "tests", "notebooks", "examples", "tools", "docs"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  missing = sorted(set(tracked) - names)
  assert not missing, f"the sdist lacks {missing}"
  assert {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml"} <= names


@pytest.mark.slow
def test_type_checkers_resolve_the_package_and_its_literal_options(tmp_path):
  mypy = pytest.importorskip("mypy.api")
  program = tmp_path / "program.py"
  program.write_text(
    "import jax.numpy as jnp\n"
    "import roipool_jax\n"
    "x, b = jnp.zeros((1, 8, 8, 3)), jnp.zeros((2, 4))\n"
    'ok = roipool_jax.roi_align(x, b, 2, mode="max")\n'
    'bad = roipool_jax.roi_align(x, b, 2, mode="mean")\n'
  )
  stdout, _, status = mypy.run([str(program), "--cache-dir", str(tmp_path / "cache")])
  assert status == 1, stdout
  errors = [line for line in stdout.splitlines() if ": error:" in line]
  assert len(errors) == 1 and "program.py:5" in errors[0] and "mode" in errors[0], stdout


def test_readme_shows_the_committed_benchmark_table():
  # The README's table is benchmarks/results/cpu.md verbatim (run.py writes the latter).
  readme = (ROOT / "README.md").read_text()
  table = (ROOT / "benchmarks" / "results" / "cpu.md").read_text().strip()
  start = readme.index("<!-- benchmarks/results/cpu.md -->\n") + len(
    "<!-- benchmarks/results/cpu.md -->\n"
  )
  end = readme.index("\n<!-- end of benchmarks/results/cpu.md -->")
  assert readme[start:end] == table
  assert (ROOT / "benchmarks" / "results" / "cpu.png").stat().st_size > 10_000
  assert "benchmarks/results/cpu.png" in readme
