"""Setup helpers of the notebooks (no JAX import here): install on Colab, accelerator check,
Google Drive work directory. Cell 1 of each notebook imports this file from `notebooks/`.

- `install(repo)`: `pip install -e <repo>` keeps Colab's preinstalled jax (with its CUDA plugin
  or libtpu) when its version is in `JAX_RANGE`, the range setup.cfg allows; otherwise it
  installs `<repo>[cuda12]` on a GPU runtime, `<repo>[tpu]` on a TPU runtime (the matching jax
  build), plain `<repo>` on a CPU runtime.
- `runtime_accelerator()`: "tpu" or "gpu" when the machine has one, judged from the runtime
  (devices, nvidia-smi, TPU variables), not from JAX, so that `warn_if_cpu_only` can say loudly
  when an accelerator runtime shows only JAX's CPU backend (a jax without the plugin).
- `mount_drive()`: mounts Google Drive and returns a folder in it for the runs (they then
  outlive the Colab runtime).
"""

from __future__ import annotations

import glob
import importlib.metadata
import os
import shutil
import subprocess
import sys
import warnings

JAX_RANGE = ">=0.7.2,<0.11"  # setup.cfg's jax range (tests/test_notebooks.py checks)
DRIVE_WORKDIR = "/content/drive/MyDrive/didistill_runs"


def runtime_accelerator(environ=os.environ) -> str | None:
    """'tpu', 'gpu' or None: what the machine offers, whatever JAX will use."""
    if environ.get("COLAB_TPU_ADDR") or environ.get("TPU_NAME") or glob.glob("/dev/accel*"):
        return "tpu"
    if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0"):
        return "gpu"
    return None


def installed_jax() -> str | None:
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return None


def jax_fits(version: str | None) -> bool:
    from packaging.specifiers import SpecifierSet

    return version is not None and version in SpecifierSet(JAX_RANGE)


def install_target(repo: str, accelerator: str | None, jax_version: str | None) -> str:
    """What to `pip install -e`: the repository, with the accelerator's jax extra if needed."""
    if jax_fits(jax_version):
        return repo  # pip keeps the installed jax: it satisfies the requirement
    extra = {"gpu": "cuda12", "tpu": "tpu"}.get(accelerator)
    return f"{repo}[{extra}]" if extra else repo


def install(repo: str) -> None:
    accelerator, jax_version = runtime_accelerator(), installed_jax()
    target = install_target(repo, accelerator, jax_version)
    kept = "keeping" if target == repo and jax_fits(jax_version) else "replacing"
    print(
        f"runtime: {accelerator or 'cpu'}; jax {jax_version} ({kept} it); pip install -e {target}"
    )
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", target], check=True)
    if "jax" in sys.modules and installed_jax() != jax_version:
        warnings.warn("jax was imported before it was reinstalled: restart the runtime (Runtime "
                      "> Restart session) and run the notebook again", stacklevel=2)  # fmt: skip


def cpu_only_warning(backend: str, accelerator: str | None) -> str | None:
    """The warning to show when the runtime has an accelerator that JAX does not use."""
    if accelerator is None or backend != "cpu":
        return None
    extra = {"gpu": "cuda12", "tpu": "tpu"}[accelerator]
    return (
        f"\n{'!' * 78}\nThis runtime has a {accelerator.upper()}, but JAX runs on the CPU only.\n"
        f"Install the matching jax build, e.g. pip install 'didistill[{extra}]' (or "
        f"'jax[{extra}]'), restart the runtime and run the notebook again. Check that "
        f"JAX_PLATFORMS is not set to cpu (it is {os.environ.get('JAX_PLATFORMS')!r}).\n"
        f"{'!' * 78}"
    )


def warn_if_cpu_only(backend: str) -> None:
    message = cpu_only_warning(backend, runtime_accelerator())
    if message:
        print(message, file=sys.stderr)
        warnings.warn(message.strip("\n!"), stacklevel=2)


def mount_drive(folder: str = DRIVE_WORKDIR) -> str:
    from google.colab import drive  # only on Colab

    drive.mount("/content/drive")
    os.makedirs(folder, exist_ok=True)
    return folder
