"""Fetch and convert the published artefacts of the FID tables, one command each.

    python -m didistill.prepare list                   # the table below, with the cache paths
    python -m didistill.prepare edm-cifar10-cond       # EDM's CIFAR-10 teacher -> network file
    python -m didistill.prepare edm-imagenet64-cond    # EDM's ImageNet-64 (ADM) teacher
    python -m didistill.prepare inception              # pytorch-fid's FID Inception -> Flax .npz
    python -m didistill.prepare fid-refs cifar10       # EDM's FID reference statistics
    python -m didistill.prepare fid-refs imagenet64

Each download goes from the official address (`--url` for a mirror) into the cache
`--data_dir` (default `$DIDISTILL_DATA_DIR`, else `~/.cache/didistill`) through `<file>.part`,
which is renamed to `<file>` only after its SHA-256 is checked (and, for the statistics, their
content); an interrupted transfer keeps the `.part` and the next run resumes it with an HTTP
Range request (or starts over where the server ignores Range). `file://` addresses work too.
`--force` downloads and converts again. The command prints every file it wrote.

Checksums: none of these artefacts has a published SHA-256 that this project could check
(neither EDM's README nor pytorch-fid publish one), so `SHA256` is None for all of them rather
than an invented value. On the first download the command prints the measured SHA-256 and
records it in `<data_dir>/manifest.json`; later runs (and `--force` downloads) are verified
against that record (trust on first use). Fill in `Artefact.sha256` once a value is checked
against an independent copy.

Artefacts and their licences (the downloads are NOT covered by this project's licence):

    edm-cifar10-cond      edm-cifar10-32x32-cond-vp.pkl   CC BY-NC-SA 4.0 (NVIDIA, EDM)
    edm-imagenet64-cond   edm-imagenet-64x64-cond-adm.pkl CC BY-NC-SA 4.0 (NVIDIA, EDM)
    fid-refs cifar10      cifar10-32x32.npz               CC BY-NC-SA 4.0 (NVIDIA, EDM)
    fid-refs imagenet64   imagenet-64x64.npz              CC BY-NC-SA 4.0 (NVIDIA, EDM)
    inception             pt_inception-2015-12-05-6726825d.pth
                          Apache-2.0 (pytorch-fid's port of TensorFlow's Inception weights)

Conversion. EDM's pickles need EDM's own code (`dnnlib`, `torch_utils`) and torch to load; this
project does not ship that code. With torch installed and `--edm_repo` pointing at a checkout of
NVlabs/edm, the pickle is loaded and its 'ema' network's state dict goes through
`didistill.nets.convert_edm` into `<data_dir>/edm/<name>.msgpack`. Otherwise the command stops
and says how to export the state dict to `.npz` (see `didistill.nets.convert_edm`), after which

    python -m didistill.prepare edm-cifar10-cond --from_npz edm-cifar10-cond.npz

writes the network file (`--config` overrides the preset, e.g. for a smaller network). The
Inception `.pth` needs torch too (no pickled code: `torch.load(weights_only=True)`); without it,
export it to `.npz` as `experiments/convert_inception.py` says and finish with `inception
--from_npz FILE`. The FID reference statistics need no conversion: they are checked with
`didistill.eval.fid.load_stats`.

Every failure (offline, HTTP error, checksum mismatch, missing torch, a file of the wrong kind)
is one line `didistill.prepare: error: ...` naming the file, the address and the cache path to
place the file at by hand, with exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import importlib.util
import json
import os
import pickle
import sys
import urllib.error
import urllib.request
from typing import Any

from didistill.train.files import sha256_file

PROG = "didistill.prepare"
EDM_PRETRAINED = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM_FID_REFS = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"
PYTORCH_FID_WEIGHTS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
EDM_LICENCE = "CC BY-NC-SA 4.0 (NVIDIA, EDM: Karras et al. 2022)"
INCEPTION_LICENCE = "Apache-2.0 (pytorch-fid's port of TensorFlow's Inception weights)"
CHUNK = 1 << 20
TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class Artefact:
    name: str  # the command's name, e.g. 'edm-cifar10-cond', 'fid-refs-cifar10'
    url: str  # official address
    download: str  # cache path of the download, relative to data_dir
    kind: str  # 'edm' | 'inception' | 'fid-refs'
    licence: str
    sha256: str | None = None  # published SHA-256; None: measured once, kept in the manifest
    output: str | None = None  # cache path of the converted file (None: the download is it)
    preset: str | None = None  # convert_edm.PRESETS name of an EDM teacher


def _edm(name: str, filename: str) -> Artefact:
    return Artefact(
        name,
        EDM_PRETRAINED + filename,
        f"edm/{filename}",
        "edm",
        EDM_LICENCE,
        output=f"edm/{name}.msgpack",
        preset=name,
    )


def _refs(which: str, filename: str) -> Artefact:
    url = EDM_FID_REFS + filename
    return Artefact(f"fid-refs-{which}", url, f"fid-refs/{filename}", "fid-refs", EDM_LICENCE)


ARTEFACTS: dict[str, Artefact] = {
    a.name: a
    for a in (
        _edm("edm-cifar10-cond", "edm-cifar10-32x32-cond-vp.pkl"),
        _edm("edm-imagenet64-cond", "edm-imagenet-64x64-cond-adm.pkl"),
        Artefact(
            "inception",
            PYTORCH_FID_WEIGHTS,
            "inception/pt_inception-2015-12-05-6726825d.pth",
            "inception",
            INCEPTION_LICENCE,
            output="inception/inception_fid.npz",
        ),
        _refs("cifar10", "cifar10-32x32.npz"),
        _refs("imagenet64", "imagenet-64x64.npz"),
    )
}
FID_REFS = ("cifar10", "imagenet64")


class PrepareError(Exception):
    """A failure reported as one line `didistill.prepare: error: ...`."""


def default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("DIDISTILL_DATA_DIR") or "~/.cache/didistill")


# ----------------------------------------------------------------------------------------------
# The manifest: measured SHA-256 of downloads without a published one.


def _manifest_path(data_dir: str) -> str:
    return os.path.join(data_dir, "manifest.json")


def read_manifest(data_dir: str) -> dict[str, Any]:
    try:
        with open(_manifest_path(data_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise PrepareError(f"{_manifest_path(data_dir)} is unreadable ({err}); delete it") from None


def _record(data_dir: str, rel: str, url: str, digest: str, size: int) -> None:
    manifest = read_manifest(data_dir)
    manifest[rel] = dict(url=url, sha256=digest, bytes=size)
    path = _manifest_path(data_dir)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def expected_sha256(artefact: Artefact, data_dir: str) -> tuple[str | None, str]:
    """(expected SHA-256 or None, where it comes from: 'published' or 'manifest')."""
    if artefact.sha256:
        return artefact.sha256.lower(), "published"
    entry = read_manifest(data_dir).get(artefact.download) or {}
    return entry.get("sha256"), "manifest"


# ----------------------------------------------------------------------------------------------
# Downloads.


def _by_hand(url: str, dest: str) -> str:
    return (
        f"to place it by hand, download {url} where there is network access and copy it to "
        f"{dest}, then run this command again"
    )


def _discard(path: str) -> None:
    """Remove `path` and its folder when that is left empty (nothing half-written stays)."""
    if os.path.exists(path):
        os.remove(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:  # not empty: other downloads live there
        pass


def _transfer(url: str, part: str) -> None:
    """Append `url`'s bytes to `part`, resuming from its size with a Range request; a server
    that ignores Range (status 200, or a file:// address) makes it start over."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "didistill.prepare"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing past the end: the .part is complete (or bad)
            return
        raise
    with response:
        status = getattr(response, "status", None)
        resumed = have and status == 206
        if resumed:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise ValueError(f"the server answered Range {have}- with {content_range!r}")
            print(f"resuming {os.path.basename(part)} at {have:,} bytes", flush=True)
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        written = 0
        with open(part, "ab" if resumed else "wb") as f:
            while block := response.read(CHUNK):
                f.write(block)
                written += len(block)
        if expected is not None and written < expected:
            raise ConnectionError(f"the transfer stopped after {written:,} of {expected:,} bytes")


def fetch(
    artefact: Artefact,
    data_dir: str,
    *,
    url: str | None = None,
    force: bool = False,
    validate=None,
) -> str:
    """Download `artefact` into `data_dir` (checked, atomic, resumable); returns its path.

    `validate(path)` (raising ValueError) checks the content of the `.part` before it is
    renamed. A file already in the cache is checked against the published or recorded SHA-256.
    """
    url = url or artefact.url
    dest = os.path.join(data_dir, artefact.download)
    part = dest + ".part"
    where = f"{os.path.basename(dest)} from {url}"
    if force:
        for path in (dest, part):
            if os.path.exists(path):
                os.remove(path)
    expected, kind = expected_sha256(artefact, data_dir)
    source = kind
    if kind == "manifest":
        source = f"recorded in {_manifest_path(data_dir)}; delete the entry if the file changed"
    if os.path.exists(dest):
        digest = sha256_file(dest)
        if validate is not None:
            try:
                validate(dest)
            except ValueError as err:
                raise PrepareError(
                    f"the cached {dest} is not the expected file ({err}; {where}); delete it "
                    "or run again with --force"
                ) from None
        if expected and digest != expected:
            raise PrepareError(
                f"the cached {dest} has SHA-256 {digest}, expected {expected} ({source}) "
                f"({where}); delete it or run again with --force"
            )
        if not expected:
            _record(data_dir, artefact.download, url, digest, os.path.getsize(dest))
            print(f"recorded the SHA-256 {digest} of {dest} (placed by hand) in the manifest")
        print(f"found {dest}")
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    print(f"downloading {url}\n  -> {dest}", flush=True)
    try:
        _transfer(url, part)
    except urllib.error.HTTPError as err:
        if not (os.path.exists(part) and os.path.getsize(part)):
            _discard(part)
        msg = f"HTTP {err.code} {err.reason} for {where}"
        raise PrepareError(f"{msg}; {_by_hand(url, dest)}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        # offline, connection refused, cut off, a bad address
        reason = getattr(err, "reason", err)
        kept = (
            f" ({os.path.getsize(part):,} bytes kept in {part}; run again to resume)"
            if os.path.exists(part) and os.path.getsize(part)
            else ""
        )
        if not kept:
            _discard(part)
        msg = f"cannot download {where}: {reason}{kept}"
        raise PrepareError(f"{msg}; {_by_hand(url, dest)}") from None
    digest = sha256_file(part)
    if expected and digest != expected:
        _discard(part)
        raise PrepareError(
            f"SHA-256 mismatch for {where}: got {digest}, expected {expected} ({source}); "
            f"nothing was kept; {_by_hand(url, dest)}"
        )
    if validate is not None:
        try:
            validate(part)
        except ValueError as err:
            _discard(part)
            msg = f"{where} is not the expected file ({err}); nothing was kept"
            raise PrepareError(f"{msg}; {_by_hand(url, dest)}") from None
    os.replace(part, dest)
    size = os.path.getsize(dest)
    if expected:
        print(f"wrote {dest} ({size:,} bytes, SHA-256 {digest} checked against the {kind} value)")
    else:
        _record(data_dir, artefact.download, url, digest, size)
        print(
            f"wrote {dest} ({size:,} bytes); no published SHA-256: measured {digest}, "
            f"recorded in {_manifest_path(data_dir)}"
        )
    return dest


# ----------------------------------------------------------------------------------------------
# Content checks and converters.


def _check_magic(kinds: str, *magics: bytes):
    def check(path: str) -> None:
        with open(path, "rb") as f:
            head = f.read(4)
        if not any(head.startswith(m) for m in magics):
            raise ValueError(f"it does not start like a {kinds} (first bytes {head!r})")

    return check


_check_pickle = _check_magic("pickle", b"\x80")
_check_torch = _check_magic("torch file (zip or pickle)", b"PK", b"\x80")


def _check_refs(path: str) -> None:
    from didistill.eval.fid import load_stats

    mu, _ = load_stats(path)
    print(f"FID reference statistics: {mu.shape[0]} features")


def _config(artefact: Artefact, config: str | None) -> dict[str, Any]:
    from didistill.nets import convert_edm

    text = config or artefact.preset
    try:
        return convert_edm._read_config(text)
    except SystemExit as err:
        raise PrepareError(str(err)) from None


def _save_edm(artefact, state_dict, config, out, source) -> str:
    import jax
    import numpy as np

    from didistill.nets import convert_edm
    from didistill.nets.files import save_model

    try:
        net, image_shape = convert_edm.unet_from_config(config)
        variables = convert_edm.convert_state_dict(
            state_dict, convert_edm.param_template(net, image_shape)
        )
    except ValueError as err:  # StateDictError included
        message = " ".join(str(err).split())
        raise PrepareError(f"{source} does not convert to {artefact.name}: {message}") from None
    save_model(out, variables, config, convert_edm._arch(config), source=os.path.basename(source))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables))
    print(f"wrote {out} ({count:,} parameters; {artefact.licence})")
    print(f"use it with --config.teacher.checkpoint={out}")
    return out


def _read_npz(path: str) -> dict:
    import numpy as np

    if not os.path.isfile(path):
        raise PrepareError(f"--from_npz {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise PrepareError(f"--from_npz {path} is not a readable .npz ({err})") from None


def _export_command(pkl: str, npz: str) -> str:
    return (
        'python -c "import pickle, numpy as np, dnnlib; '
        f"net = pickle.load(open('{pkl}', 'rb'))['ema']; "
        f"np.savez('{npz}', **{{k: v.cpu().numpy() for k, v in net.state_dict().items()}})\""
    )


def _load_edm_pickle(pkl: str, edm_repo: str) -> dict:
    """The 'ema' network's state dict (NumPy) of an EDM pickle, with EDM's code importable."""
    missing = [d for d in ("dnnlib", "torch_utils") if not os.path.isdir(os.path.join(edm_repo, d))]
    if missing:
        raise PrepareError(
            f"--edm_repo {edm_repo} is not a checkout of NVlabs/edm (no {', '.join(missing)}/)"
        )
    sys.path.insert(0, os.path.abspath(edm_repo))
    try:
        with open(pkl, "rb") as f:
            net = pickle.load(f)["ema"]
        return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    except Exception as err:  # unpickling runs EDM's code: report whatever it raises
        raise PrepareError(
            f"cannot load {pkl} with EDM's code from {edm_repo}: {type(err).__name__}: {err}"
        ) from None
    finally:
        sys.path.remove(os.path.abspath(edm_repo))


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def prepare_edm(artefact, data_dir, args) -> list[str]:
    out = os.path.join(data_dir, artefact.output)
    config = _config(artefact, args.config)
    if args.from_npz:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        return [_save_edm(artefact, _read_npz(args.from_npz), config, out, args.from_npz)]
    if os.path.exists(out) and not args.force:
        print(f"found {out} (--force converts again)")
        return [out]
    pkl = fetch(artefact, data_dir, url=args.url, force=args.force, validate=_check_pickle)
    if not (_has_torch() and args.edm_repo):
        npz = os.path.join(data_dir, "edm", f"{artefact.name}.npz")
        need = "torch and EDM's code (--edm_repo)" if not _has_torch() else "EDM's code"
        raise PrepareError(
            f"converting {pkl} needs {need}: either run again with --edm_repo "
            "pointing at a checkout of https://github.com/NVlabs/edm (torch installed), or "
            "export the state dict inside that checkout with "
            f"{_export_command(pkl, npz)} and finish with "
            f"python -m didistill.prepare {artefact.name} --from_npz {npz}"
        )
    state_dict = _load_edm_pickle(pkl, args.edm_repo)
    return [pkl, _save_edm(artefact, state_dict, config, out, pkl)]


def _convert_inception_module():
    """`experiments/convert_inception.py` (not part of the installed package): imported as
    `experiments.convert_inception` from a checkout, else loaded from its path next to
    `didistill/`."""
    try:
        from experiments import convert_inception

        return convert_inception
    except ImportError:
        pass
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "experiments",
        "convert_inception.py",
    )
    if not os.path.isfile(path):
        raise PrepareError(
            f"the Inception converter {path} is missing: run this from a checkout of didistill"
        )
    spec = importlib.util.spec_from_file_location("didistill_convert_inception", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare_inception(artefact, data_dir, args) -> list[str]:
    out = os.path.join(data_dir, artefact.output)
    src = args.from_npz
    written = []
    if src is None:
        if os.path.exists(out) and not args.force:
            print(f"found {out} (--force converts again)")
            return [out]
        src = fetch(artefact, data_dir, url=args.url, force=args.force, validate=_check_torch)
        written.append(src)
        if not _has_torch():
            npz = os.path.join(data_dir, "inception", "pt_inception.npz")
            raise PrepareError(
                f"reading {src} needs torch: install it (pip install torch) and run again, or "
                'export the state dict where torch is installed with python -c "import torch, '
                f"numpy as np; sd = torch.load('{src}', map_location='cpu', weights_only=True); "
                f"np.savez('{npz}', **{{k: v.numpy() for k, v in sd.items()}})\" and finish "
                f"with python -m didistill.prepare inception --from_npz {npz}"
            )
    elif not os.path.isfile(src):
        raise PrepareError(f"--from_npz {src}: no such file")
    convert = _convert_inception_module()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    try:
        convert.convert_file(src, tmp)
        os.replace(tmp, out)
    except (ValueError, ImportError, OSError) as err:
        raise PrepareError(f"{src} does not convert to the FID Inception: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {out} ({artefact.licence})")
    return [*written, out]


def prepare_fid_refs(artefact, data_dir, args) -> list[str]:
    if args.from_npz:
        raise PrepareError("fid-refs need no conversion: --from_npz does not apply")
    dest = fetch(artefact, data_dir, url=args.url, force=args.force, validate=_check_refs)
    print(f"{dest}: {artefact.licence}")
    return [dest]


PREPARE = {"edm": prepare_edm, "inception": prepare_inception, "fid-refs": prepare_fid_refs}


def _list(data_dir: str) -> None:
    manifest = read_manifest(data_dir)
    for a in ARTEFACTS.values():
        sha = a.sha256 or (manifest.get(a.download) or {}).get("sha256")
        sha = sha or "none published (recorded on first download)"
        print(f"{a.name}\n  url      {a.url}\n  cache    {os.path.join(data_dir, a.download)}")
        if a.output:
            print(f"  output   {os.path.join(data_dir, a.output)}")
        print(f"  sha256   {sha}\n  licence  {a.licence}")


def resolve(what: str, which: str | None) -> Artefact:
    if what == "fid-refs":
        if which not in FID_REFS:
            raise PrepareError(f"fid-refs needs one of {', '.join(FID_REFS)}, got {which!r}")
        what = f"fid-refs-{which}"
    elif which is not None:
        raise PrepareError(f"{what} takes no second argument (got {which!r})")
    if what not in ARTEFACTS:
        names = ["list", *(n for n in ARTEFACTS if not n.startswith("fid-refs-")), "fid-refs"]
        raise PrepareError(f"unknown artefact {what!r}; known: {', '.join(names)}")
    return ARTEFACTS[what]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m didistill.prepare",
        description="Download (checked, resumable) and convert the artefacts of the FID tables.",
        epilog="Licences: EDM models and FID refs CC BY-NC-SA 4.0 (NVIDIA); pytorch-fid "
        "Inception weights Apache-2.0. See the module docstring.",
    )
    names = "list, edm-cifar10-cond, edm-imagenet64-cond, inception, fid-refs"
    parser.add_argument("what", help=names)
    parser.add_argument("which", nargs="?", help="for fid-refs: cifar10 or imagenet64")
    default_dir = "$DIDISTILL_DATA_DIR or ~/.cache/didistill"
    parser.add_argument("--data_dir", default=None, help=f"cache (default {default_dir})")
    parser.add_argument("--url", default=None, help="download from this address (a mirror)")
    parser.add_argument("--force", action="store_true", help="download and convert again")
    parser.add_argument("--edm_repo", default=None, help="checkout of NVlabs/edm (needs torch)")
    parser.add_argument("--from_npz", default=None, help="convert this exported state dict")
    config_help = "EDM network config: preset, JSON or .json file (default: the preset)"
    parser.add_argument("--config", default=None, help=config_help)
    args = parser.parse_args(argv)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir or default_data_dir()))
    try:
        if args.what == "list":
            _list(data_dir)
            return 0
        artefact = resolve(args.what, args.which)
        os.makedirs(data_dir, exist_ok=True)
        written = PREPARE[artefact.kind](artefact, data_dir, args)
    except PrepareError as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print("done: " + ", ".join(written))
    return 0


__all__ = ["ARTEFACTS", "Artefact", "PrepareError", "fetch", "main", "sha256_file"]

if __name__ == "__main__":
    sys.exit(main())
