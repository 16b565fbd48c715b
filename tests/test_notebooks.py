"""The Colab notebooks: each executes on CPU in small settings, and none is committed with outputs.

Execution: nbclient runs a copy of each notebook (in a temporary folder, so outputs never land
in the repository) with `DIDISTILL_NOTEBOOK_SMALL=1`, `JAX_PLATFORMS=cpu` and the notebook's
work directory under the temporary folder. The kernel is this interpreter (`sys.executable`):
a kernelspec written to a temporary `JUPYTER_PATH` entry, so no global Jupyter kernel is used
or installed. Compile-time settings for the tiny runs (`XLA_FLAGS` without LLVM optimisation,
the cheap-to-compile `unsafe_rbg` PRNG) cut the XLA compile time roughly in half on CPU; the
notebooks themselves do not depend on them. Notebooks alternate between the repository root
and `notebooks/` as their working directory, the two places a user opens them from.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_divergences", "02_image_distillation", "03_text_distillation")
KERNEL_NAME = "didistill-test-python"
CELL_TIMEOUT_S = 300  # one cell, on a busy 2-core CPU
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def test_every_planned_notebook_is_present():
    assert tuple(p.stem for p in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.cells[0].cell_type == "markdown", "the first cell explains the notebook"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    sources = "\n".join(cell.source for cell in code)
    assert "'google.colab' in sys.modules" in sources or '"google.colab" in sys.modules' in sources
    assert 'os.environ.get("DIDISTILL_NOTEBOOK_SMALL", "0") == "1"' in sources
    assert "jax.devices()" in sources
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{path.name}: code cell {i} has outputs; clear them"
        assert cell.execution_count is None, f"{path.name}: code cell {i} has an execution count"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A folder holding a kernelspec that launches this interpreter (for `JUPYTER_PATH`)."""
    base = tmp_path_factory.mktemp("jupyter")
    spec_dir = base / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "didistill tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return base


@pytest.mark.parametrize("index", range(len(NOTEBOOKS)), ids=lambda i: NOTEBOOKS[i].stem)
def test_notebook_executes_in_small_settings(index, jupyter_path, tmp_path, monkeypatch):
    source = NOTEBOOKS[index]
    copy = tmp_path / source.name
    shutil.copyfile(source, copy)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("DIDISTILL_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("DIDISTILL_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)
    monkeypatch.setenv("JAX_DEFAULT_PRNG_IMPL", "unsafe_rbg")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cwd = ROOT if index % 2 else NOTEBOOK_DIR  # both places a user opens a notebook from

    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable

    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(cwd)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, copy)  # the executed copy, for inspection; never the repository's
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{source.name} drew no figure"
    setup = "".join(out.get("text", "") for out in nb.cells[1].outputs)
    assert "SMALL = True" in setup and str(tmp_path / "work") in setup
    assert (tmp_path / "work" / source.stem / "small").is_dir()


# --- Colab: the repository address, the badges, notebooks/colab_setup.py ---------------------

sys.path.insert(0, str(NOTEBOOK_DIR))
import colab_setup  # noqa: E402


def _setup_cfg():
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


REPO_URL = _setup_cfg()["metadata"]["url"]


def colab_url(path: Path) -> str:
    owner_repo = REPO_URL.removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}"


def test_the_repository_address_is_setup_cfgs_url_everywhere():
    for path in NOTEBOOKS:
        setup = nbformat.read(path, as_version=4).cells[1].source
        assert f'"DIDISTILL_REPO_URL", "{REPO_URL}"' in setup, path.name
        assert "google.colab" in setup and "colab_setup.install(REPO)" in setup
    for readme in (ROOT / "README.md", NOTEBOOK_DIR / "README.md"):
        text = readme.read_text()
        for path in NOTEBOOKS:
            assert colab_url(path) in text, f"{readme.name}: no Open in Colab link for {path.name}"
        assert "colab-badge.svg" in text
        found = {u for u in text.split("(") if u.startswith("https://github.com/")}
        assert all(u.startswith(REPO_URL) for u in found), found


def test_colab_setup_knows_setup_cfgs_jax_range():
    from packaging.requirements import Requirement

    lines = _setup_cfg()["options"]["install_requires"].split("\n")
    (jax,) = [Requirement(x) for x in lines if x.strip().startswith("jax")]
    assert str(jax.specifier) == str(Requirement(f"jax{colab_setup.JAX_RANGE}").specifier)


@pytest.mark.parametrize(
    "accelerator,jax_version,target",
    [
        ("gpu", "0.7.2", "/r"),  # Colab's jax is allowed: kept, with its CUDA plugin
        ("tpu", "0.10.2", "/r"),
        (None, "0.7.2", "/r"),
        ("gpu", "0.6.2", "/r[cuda12]"),  # too old: the CUDA build of an allowed jax
        ("tpu", "0.11.0", "/r[tpu]"),  # too new
        ("gpu", None, "/r[cuda12]"),  # no jax at all
        (None, "0.6.0", "/r"),
    ],
)
def test_colab_install_keeps_a_fitting_jax_or_installs_the_right_extra(
    accelerator, jax_version, target
):
    assert colab_setup.install_target("/r", accelerator, jax_version) == target


def test_cpu_only_warning_is_loud_only_when_an_accelerator_is_unused(monkeypatch):
    assert colab_setup.cpu_only_warning("cpu", None) is None
    assert colab_setup.cpu_only_warning("gpu", "gpu") is None
    assert colab_setup.cpu_only_warning("tpu", "tpu") is None
    message = colab_setup.cpu_only_warning("cpu", "gpu")
    assert "has a GPU, but JAX runs on the CPU only" in message and "didistill[cuda12]" in message
    assert "didistill[tpu]" in colab_setup.cpu_only_warning("cpu", "tpu")
    monkeypatch.setattr(colab_setup, "runtime_accelerator", lambda: "gpu")
    with pytest.warns(UserWarning, match="JAX runs on the CPU only"):
        colab_setup.warn_if_cpu_only("cpu")


def test_runtime_accelerator_from_the_environment(monkeypatch):
    assert colab_setup.runtime_accelerator({"COLAB_TPU_ADDR": "10.0.0.2:8470"}) == "tpu"
    monkeypatch.setattr(colab_setup.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(colab_setup.glob, "glob", lambda pattern: [])
    assert colab_setup.runtime_accelerator({}) == "gpu"


def test_set_repo_url_changes_the_address_in_every_file_at_once(tmp_path):
    import set_repo_url  # notebooks/set_repo_url.py

    (tmp_path / "notebooks").mkdir()
    for path in set_repo_url.files_using(ROOT):
        shutil.copy(path, tmp_path / path.relative_to(ROOT))
    with pytest.raises(ValueError, match="OWNER/NAME"):
        set_repo_url.set_url("https://example.org/x", tmp_path)
    changed = set_repo_url.set_url("https://github.com/someone/fork", tmp_path)
    assert len(changed) == len(set_repo_url.files_using(tmp_path))
    assert set_repo_url.current_url(tmp_path) == "https://github.com/someone/fork"
    for path in set_repo_url.files_using(tmp_path):
        text = path.read_text()
        assert REPO_URL.removeprefix("https://github.com/") not in text, path.name
        assert "someone/fork" in text, path.name
