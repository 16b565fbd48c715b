"""Installation metadata: version ranges, the lock and the oldest pins, the resolution of the
dependencies for Python 3.12 and 3.13 (a dry run against the package index), the compat shims.

The dry runs need the package index; they are skipped, saying so, when it cannot be reached.
"""

import configparser
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
OLDEST = ROOT / "requirements" / "oldest.txt"
SUPPORTED_PYTHONS = ("3.11", "3.12", "3.13")


def _setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def _requirements(text: str) -> list[Requirement]:
    return [Requirement(line) for line in text.strip().splitlines() if line.strip()]


def install_requires() -> list[Requirement]:
    return _requirements(_setup_cfg()["options"]["install_requires"])


def extras() -> dict[str, list[Requirement]]:
    return {k: _requirements(v) for k, v in _setup_cfg()["options.extras_require"].items()}


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_python_311_to_313_are_allowed_and_listed():
    cfg = _setup_cfg()
    allowed = SpecifierSet(cfg["options"]["python_requires"])
    for version in SUPPORTED_PYTHONS:
        assert Version(version) in allowed
        assert f"Python :: {version}" in cfg["metadata"]["classifiers"]
    assert Version("3.10") not in allowed


def test_libraries_state_ranges_not_exact_versions():
    for req in install_requires():
        assert not any(spec.operator == "==" for spec in req.specifier), req
        assert any(spec.operator == ">=" for spec in req.specifier), f"{req}: no lower bound"


def test_accelerator_extras_pull_jax_builds_with_the_same_range():
    jax = next(r for r in install_requires() if r.name == "jax")
    for extra in ("cuda12", "tpu"):
        (req,) = extras()[extra]
        assert req.name == "jax" and req.extras == {extra} and req.specifier == jax.specifier


def test_scikit_learn_is_a_runtime_dependency():
    assert "scikit-learn" in {r.name for r in install_requires()}


def test_torch_is_only_the_optional_peers_extra():
    """benchmarks/peers.py's PyTorch side: an extra, never in the lock `make test` installs."""
    (req,) = extras()["peers"]
    assert req.name == "torch" and Version("2.4") in req.specifier
    assert "torch" not in _pins(LOCK)
    assert "torch" not in {r.name for r in install_requires()}


def test_the_lock_satisfies_every_range_of_setup_cfg():
    lock = _pins(LOCK)
    reqs = install_requires() + [r for name in ("test", "notebooks") for r in extras()[name]]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not pinned in {LOCK.name}"
        assert lock[name] in req.specifier, f"{LOCK.name}: {name}=={lock[name]} not in {req}"


def test_the_lock_is_what_the_test_environment_runs():
    """When run in the environment `make test` built (.venv), every pin is installed as is."""
    from importlib import metadata

    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not running in this checkout's .venv (make test builds it from the lock)")
    for name, version in _pins(LOCK).items():
        assert Version(metadata.version(name)) == version, name


def test_the_oldest_pins_are_the_lower_bounds():
    oldest = _pins(OLDEST)
    for req in install_requires() + extras()["tensorboard"]:
        name = canonicalize_name(req.name)
        (lower,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert oldest.get(name) == lower, f"{OLDEST.name}: {name} should be =={lower}"
    assert oldest["jaxlib"] == oldest["jax"]


def test_make_test_and_ci_install_the_lock_and_run_the_oldest_versions():
    makefile = (ROOT / "Makefile").read_text()
    assert "-c $(LOCK)" in makefile and "LOCK := requirements/lock.txt" in makefile
    assert "-c $(OLDEST)" in makefile and "test-oldest:" in makefile
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in ci if line.startswith("make")]
    assert commands == ["make test", "make test-oldest"]


def test_compat_enable_x64():
    import jax
    import jax.numpy as jnp

    from didistill import compat

    with compat.enable_x64(True):
        assert jnp.zeros(2, jnp.float64).dtype == jnp.float64
    assert not jax.config.jax_enable_x64


def _index_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/jax/", timeout=15).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sdist_wheels(tmp_path_factory):
    """Wheels of the pure-Python dependencies published only as sdists (promise, of tfds), so
    that the resolution can run with --only-binary=:all:, which --python-version requires."""
    if not _index_reachable():
        pytest.skip("the package index (pypi.org) cannot be reached: dependency resolution not run")
    out = tmp_path_factory.mktemp("wheels")
    pins = _pins(LOCK)
    sdist_only = [f"promise=={pins['promise']}"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), *sdist_only],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def _resolve(python: str, wheels: Path, tmp_path: Path, *args: str) -> dict[str, str]:
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
        "--python-version", python, "--only-binary=:all:", "--find-links", str(wheels),
        "--report", str(report), *args,
    ]  # fmt: skip
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    errors = [line for line in proc.stderr.splitlines() if "Location 'file:" not in line]
    assert proc.returncode == 0, "\n".join(errors[-30:])
    installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_the_ranges_resolve_for_python(python, sdist_wheels, tmp_path):
    got = _resolve(python, sdist_wheels, tmp_path, *map(str, install_requires()))
    for req in install_requires():
        assert Version(got[canonicalize_name(req.name)]) in req.specifier


@pytest.mark.parametrize("python", ["3.12", "3.13"])
def test_the_lock_resolves_for_python(python, sdist_wheels, tmp_path):
    """`make test` on 3.12 or 3.13 gets exactly the lock's versions."""
    got = _resolve(python, sdist_wheels, tmp_path, "-c", str(LOCK), "-e", ".[test,notebooks]")
    lock = {k: str(v) for k, v in _pins(LOCK).items()}
    assert {k: v for k, v in got.items() if k != "didistill"} == lock


def test_installed_package_runs_a_shipped_config_from_any_directory(tmp_path):
    """A real (non-editable) install of this checkout, used from a directory outside the
    repository: the shipped configs and teachers travel as package data, and `--config=NAME`
    finds them. Built and installed without the network (--no-deps, --no-build-isolation);
    the dependencies come from the test environment."""
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(wheels.glob("didistill-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    where = subprocess.run(
        [sys.executable, "-c", "import didistill.assets; print(didistill.__file__)"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(site))
    run = subprocess.run(
        [
            sys.executable, "-m", "didistill.main", "--config=toy2d:jensen_shannon,smoke",
            "--workdir=run", "--config.train.num_steps=2", "--config.eval.num_samples=64",
        ],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    config = json.loads((cwd / "run" / "config.json").read_text())
    assert config["teacher"]["checkpoint"].startswith(str(site))  # the installed asset
    assert (cwd / "run" / "eval.json").is_file()
