"""Tests for `python -m didistill.prepare`, without internet: tiny files of the same formats,
served by a loopback HTTP server (with and without Range support) or as file:// addresses."""

import hashlib
import http.server
import json
import os
import pickle
import re
import socket
import sys
import threading
import types

import numpy as np
import pytest

from didistill import prepare

ERROR = re.compile(r"^didistill\.prepare: error: [^\n]+\n$")  # exactly one line


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        server = self.server
        data = server.files.get(self.path)
        server.requests.append((self.path, self.headers.get("Range")))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:  # an interrupted transfer: half the body, then close
            self.wfile.write(body[: server.cut_after])
            self.close_connection = True
            server.cut_after = None
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.ranges, httpd.cut_after = {}, [], True, None
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05))
    thread.daemon = True
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _short_timeout(monkeypatch):
    monkeypatch.setattr(prepare, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(prepare, "CHUNK", 64)  # several reads per tiny file


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pickle_bytes() -> bytes:
    return pickle.dumps({"ema": list(range(200))}, protocol=4)  # starts with b"\x80"


def _refs_bytes(tmp_path, features=4) -> bytes:
    from didistill.eval.fid import save_stats

    rng = np.random.default_rng(0)
    a = rng.normal(size=(features, features))
    path = save_stats(str(tmp_path / "refs-src.npz"), rng.normal(size=features), a @ a.T)
    with open(path, "rb") as f:
        return f.read()


def _run(argv, capsys):
    code = prepare.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


# ----------------------------------------------------------------------------------------------
# Downloads


class TestFetch:
    def test_http_records_sha_then_verifies(self, server, tmp_path, capsys):
        data = _pickle_bytes()
        server.files["/x.pkl"] = data
        url = f"{server.base}/x.pkl"
        art = prepare.ARTEFACTS["edm-cifar10-cond"]
        dest = prepare.fetch(art, str(tmp_path), url=url, validate=prepare._check_pickle)
        assert open(dest, "rb").read() == data
        assert dest == str(tmp_path / "edm" / "edm-cifar10-32x32-cond-vp.pkl")
        assert _sha(data) in capsys.readouterr().out  # measured and printed
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        assert manifest[art.download] == dict(url=url, sha256=_sha(data), bytes=len(data))
        assert not os.path.exists(dest + ".part")
        # a later --force download is checked against the recorded value
        server.files["/x.pkl"] = data[:-1] + b"!"
        with pytest.raises(prepare.PrepareError, match="SHA-256 mismatch") as err:
            prepare.fetch(art, str(tmp_path), url=url, force=True)
        assert "recorded in" in str(err.value) and url in str(err.value)
        assert _files(tmp_path) == ["manifest.json"]  # nothing half-written left

    def test_published_sha_pass_and_mismatch(self, server, tmp_path, capsys):
        data = b"\x80" + bytes(range(256)) * 3
        server.files["/a.pkl"] = data
        url = f"{server.base}/a.pkl"
        good = prepare.Artefact("t", url, "t/a.pkl", "edm", "L", sha256=_sha(data))
        dest = prepare.fetch(good, str(tmp_path / "ok"))
        assert open(dest, "rb").read() == data
        assert "checked against the published value" in capsys.readouterr().out
        assert not (tmp_path / "ok" / "manifest.json").exists()  # published: nothing recorded

        bad = dataclasses_replace(good, sha256="0" * 64)
        with pytest.raises(prepare.PrepareError) as err:
            prepare.fetch(bad, str(tmp_path / "bad"))
        message = str(err.value)
        assert "SHA-256 mismatch" in message and url in message and "a.pkl" in message
        assert str(tmp_path / "bad" / "t" / "a.pkl") in message  # where to place it by hand
        assert os.listdir(tmp_path / "bad") == []  # no .part, no file, no folder

    def test_resume_with_range(self, server, tmp_path, capsys):
        data = bytes(range(256)) * 8
        server.files["/big.npz"] = data
        art = prepare.Artefact("t", f"{server.base}/big.npz", "t/big.npz", "x", "L", _sha(data))
        part = tmp_path / "t" / "big.npz.part"
        part.parent.mkdir()
        part.write_bytes(data[:700])  # a truncated earlier transfer
        dest = prepare.fetch(art, str(tmp_path))
        assert open(dest, "rb").read() == data and not part.exists()
        assert server.requests == [("/big.npz", "bytes=700-")]
        assert "resuming big.npz.part at 700 bytes" in capsys.readouterr().out

    def test_no_range_support_starts_over(self, server, tmp_path):
        data = bytes(range(256)) * 4
        server.files["/f"], server.ranges = data, False
        art = prepare.Artefact("t", f"{server.base}/f", "t/f", "x", "L", _sha(data))
        part = tmp_path / "t" / "f.part"
        part.parent.mkdir()
        part.write_bytes(b"garbage!" * 10)
        assert open(prepare.fetch(art, str(tmp_path)), "rb").read() == data

    def test_complete_part_answered_416(self, server, tmp_path):
        data = b"\x80complete"
        server.files["/c"] = data
        art = prepare.Artefact("t", f"{server.base}/c", "t/c", "x", "L", _sha(data))
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "c.part").write_bytes(data)
        assert open(prepare.fetch(art, str(tmp_path)), "rb").read() == data

    def test_interrupted_transfer_keeps_part_then_resumes(self, server, tmp_path):
        data = bytes(range(256)) * 4
        server.files["/i"], server.cut_after = data, 300
        art = prepare.Artefact("t", f"{server.base}/i", "t/i", "x", "L", _sha(data))
        with pytest.raises(prepare.PrepareError, match="bytes kept in .*run again to resume"):
            prepare.fetch(art, str(tmp_path))
        assert (tmp_path / "t" / "i.part").stat().st_size == 300
        dest = prepare.fetch(art, str(tmp_path))  # the next run resumes
        assert open(dest, "rb").read() == data
        assert server.requests[-1] == ("/i", "bytes=300-")

    def test_http_404(self, server, tmp_path, capsys):
        url = f"{server.base}/missing.npz"
        code, _, err = _run(["fid-refs", "cifar10", "--data_dir", tmp_path, "--url", url], capsys)
        assert code == 1 and ERROR.match(err), err
        assert "HTTP 404" in err and url in err
        assert str(tmp_path / "fid-refs" / "cifar10-32x32.npz") in err
        assert os.listdir(tmp_path) == []  # not even an empty folder

    def test_offline(self, tmp_path, capsys):
        with socket.socket() as s:  # an unused port: connection refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}/edm-imagenet-64x64-cond-adm.pkl"
        code, _, err = _run(["edm-imagenet64-cond", "--data_dir", tmp_path, "--url", url], capsys)
        assert code == 1 and ERROR.match(err), err
        assert "cannot download edm-imagenet-64x64-cond-adm.pkl" in err and url in err
        assert "to place it by hand" in err
        assert str(tmp_path / "edm" / "edm-imagenet-64x64-cond-adm.pkl") in err
        assert os.listdir(tmp_path) == []  # not even an empty folder

    def test_file_url_and_cached(self, tmp_path, capsys):
        src = tmp_path / "src" / "cifar10-32x32.npz"
        src.parent.mkdir()
        src.write_bytes(_refs_bytes(tmp_path))
        data_dir = tmp_path / "cache"
        argv = ["fid-refs", "cifar10", "--data_dir", data_dir, "--url", src.as_uri()]
        code, out, err = _run(argv, capsys)
        assert code == 0, err
        dest = data_dir / "fid-refs" / "cifar10-32x32.npz"
        assert dest.read_bytes() == src.read_bytes()
        assert "4 features" in out and "CC BY-NC-SA 4.0" in out and f"wrote {dest}" in out
        code, out, _ = _run(argv, capsys)  # cached: checked against the manifest, not fetched
        assert code == 0 and f"found {dest}" in out

    def test_fid_refs_wrong_file(self, server, tmp_path, capsys):
        server.files["/r.npz"] = b"not an npz at all"
        url = f"{server.base}/r.npz"
        code, _, err = _run(
            ["fid-refs", "imagenet64", "--data_dir", tmp_path, "--url", url], capsys
        )
        assert code == 1 and ERROR.match(err), err
        assert "is not the expected file" in err and "imagenet-64x64.npz" in err and url in err
        assert os.listdir(tmp_path) == []  # not even an empty folder

    def test_wrong_kind_of_pickle(self, server, tmp_path, capsys):
        server.files["/p.pkl"] = b"<html>not found</html>"
        url = f"{server.base}/p.pkl"
        code, _, err = _run(["edm-cifar10-cond", "--data_dir", tmp_path, "--url", url], capsys)
        assert code == 1 and ERROR.match(err) and "does not start like a pickle" in err
        assert os.listdir(tmp_path) == []  # not even an empty folder


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ----------------------------------------------------------------------------------------------
# Conversion

TINY_UNET = dict(
    model_channels=8,
    channel_mult=[1],
    num_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
    label_dim=3,
    augment_dim=0,
    img_resolution=4,
    img_channels=1,
)


@pytest.fixture(scope="module")
def tiny_state_dict():
    import jax

    from didistill.nets import convert_edm

    net, shape = convert_edm.unet_from_config(TINY_UNET)
    template = convert_edm.param_template(net, shape)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), template)
    return variables, convert_edm.export_state_dict(variables)


class TestEDM:
    def test_from_npz(self, tiny_state_dict, tmp_path, capsys):
        import jax

        from didistill.nets.convert_edm import load_unet

        variables, sd = tiny_state_dict
        npz = tmp_path / "export.npz"
        np.savez(npz, **sd)
        argv = ["edm-cifar10-cond", "--data_dir", tmp_path / "d", "--from_npz", npz]
        code, out, err = _run([*argv, "--config", json.dumps(TINY_UNET)], capsys)
        assert code == 0, err
        out_path = tmp_path / "d" / "edm" / "edm-cifar10-cond.msgpack"
        assert f"wrote {out_path}" in out and "CC BY-NC-SA 4.0" in out
        assert f"--config.teacher.checkpoint={out_path}" in out
        _, loaded, meta = load_unet(str(out_path))
        assert meta["source"] == "export.npz" and meta["net"]["label_dim"] == 3
        jax.tree.map(np.testing.assert_array_equal, loaded, variables)

    def test_from_npz_mismatch(self, tiny_state_dict, tmp_path, capsys):
        npz = tmp_path / "export.npz"
        np.savez(npz, **tiny_state_dict[1])  # a tiny net is not the preset's network
        code, _, err = _run(
            ["edm-cifar10-cond", "--data_dir", tmp_path / "d", "--from_npz", npz], capsys
        )
        assert code == 1 and ERROR.match(err), err
        assert "does not convert to edm-cifar10-cond" in err and "missing array" in err
        assert not (tmp_path / "d" / "edm" / "edm-cifar10-cond.msgpack").exists()

    def test_without_torch_says_how_to_export(self, server, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(prepare, "_has_torch", lambda: False)
        server.files["/e.pkl"] = _pickle_bytes()
        url = f"{server.base}/e.pkl"
        code, out, err = _run(["edm-cifar10-cond", "--data_dir", tmp_path, "--url", url], capsys)
        assert code == 1 and ERROR.match(err), err
        pkl = tmp_path / "edm" / "edm-cifar10-32x32-cond-vp.pkl"
        assert pkl.exists() and f"wrote {pkl}" in out  # the checked download is kept
        assert "needs torch" in err and "--edm_repo" in err and "np.savez(" in err
        npz = tmp_path / "edm" / "edm-cifar10-cond.npz"
        assert f"python -m didistill.prepare edm-cifar10-cond --from_npz {npz}" in err

    def test_edm_repo_with_fake_torch(self, tiny_state_dict, server, tmp_path, capsys, monkeypatch):
        """The --edm_repo path with stand-ins: a fake checkout whose module unpickles into an
        object with a torch-like state_dict(), and torch reported as installed."""
        from didistill.nets.convert_edm import load_unet

        repo = tmp_path / "edm"
        for d in ("dnnlib", "torch_utils"):
            (repo / d).mkdir(parents=True)
            (repo / d / "__init__.py").write_text("")
        (repo / "fake_edm_net.py").write_text(
            "class T:\n"
            "    def __init__(self, a): self.a = a\n"
            "    def detach(self): return self\n"
            "    def cpu(self): return self\n"
            "    def numpy(self): return self.a\n"
            "class Net:\n"
            "    def __init__(self, sd): self.sd = sd\n"
            "    def state_dict(self): return {k: T(v) for k, v in self.sd.items()}\n"
        )
        monkeypatch.syspath_prepend(str(repo))
        import fake_edm_net

        data = pickle.dumps({"ema": fake_edm_net.Net(tiny_state_dict[1])}, protocol=4)
        monkeypatch.delitem(sys.modules, "fake_edm_net")
        sys.path.remove(str(repo))  # prepare must put it there itself
        monkeypatch.setattr(prepare, "_has_torch", lambda: True)
        server.files["/e.pkl"] = data
        argv = ["edm-cifar10-cond", "--data_dir", tmp_path / "d", "--url", f"{server.base}/e.pkl"]
        argv += ["--edm_repo", repo, "--config", json.dumps(TINY_UNET)]
        code, out, err = _run(argv, capsys)
        assert code == 0, err
        out_path = tmp_path / "d" / "edm" / "edm-cifar10-cond.msgpack"
        assert load_unet(str(out_path))[2]["source"] == "edm-cifar10-32x32-cond-vp.pkl"
        assert str(repo) not in sys.path
        code, out, _ = _run(argv, capsys)  # converted already
        assert code == 0 and f"found {out_path}" in out

    def test_edm_repo_not_a_checkout(self, server, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(prepare, "_has_torch", lambda: True)
        server.files["/e.pkl"] = _pickle_bytes()
        argv = ["edm-cifar10-cond", "--data_dir", tmp_path, "--url", f"{server.base}/e.pkl"]
        code, _, err = _run([*argv, "--edm_repo", tmp_path], capsys)
        assert code == 1 and ERROR.match(err) and "not a checkout of NVlabs/edm" in err


class TestInception:
    def test_pth_without_torch(self, server, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(prepare, "_has_torch", lambda: False)
        server.files["/w.pth"] = b"PK\x03\x04 a zip-format torch file"
        argv = ["inception", "--data_dir", tmp_path, "--url", f"{server.base}/w.pth"]
        code, _, err = _run(argv, capsys)
        assert code == 1 and ERROR.match(err), err
        npz = tmp_path / "inception" / "pt_inception.npz"
        assert "needs torch" in err and f"inception --from_npz {npz}" in err
        assert (tmp_path / "inception" / "pt_inception-2015-12-05-6726825d.pth").exists()

    def test_from_npz_uses_the_converter(self, tmp_path, capsys, monkeypatch):
        module = prepare._convert_inception_module()
        assert hasattr(module, "convert_file") and hasattr(module, "convert_state_dict")
        calls = []

        def convert_file(src, dst):  # the real one needs the full 24M-parameter network
            calls.append(src)
            with open(dst, "wb") as f:
                f.write(b"converted")
            return dst

        fake = types.SimpleNamespace(convert_file=convert_file)
        monkeypatch.setattr(prepare, "_convert_inception_module", lambda: fake)
        npz = tmp_path / "pt_inception.npz"
        npz.write_bytes(b"x")
        code, out, err = _run(["inception", "--data_dir", tmp_path, "--from_npz", npz], capsys)
        assert code == 0, err
        out_path = tmp_path / "inception" / "inception_fid.npz"
        assert calls == [str(npz)] and out_path.read_bytes() == b"converted"
        assert (
            "Apache-2.0" in out and not (tmp_path / "inception" / "inception_fid.npz.tmp").exists()
        )

    def test_from_npz_wrong_file(self, tmp_path, capsys):
        npz = tmp_path / "wrong.npz"
        np.savez(npz, a=np.zeros(2))
        code, _, err = _run(["inception", "--data_dir", tmp_path, "--from_npz", npz], capsys)
        assert code == 1 and ERROR.match(err) and "does not convert to the FID Inception" in err
        assert _files(tmp_path / "inception") == []


class TestCommand:
    def test_list_and_licences(self, tmp_path, capsys):
        code, out, _ = _run(["list", "--data_dir", tmp_path], capsys)
        assert code == 0
        for art in prepare.ARTEFACTS.values():
            assert art.url in out and art.sha256 is None  # no invented checksums
        assert out.count("CC BY-NC-SA 4.0") == 4 and out.count("Apache-2.0") == 1
        assert (
            "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl" in out
        )

    def test_unknown_names(self, tmp_path, capsys):
        code, _, err = _run(["fid-refs", "mnist", "--data_dir", tmp_path], capsys)
        assert code == 1 and ERROR.match(err) and "cifar10, imagenet64" in err
        code, _, err = _run(["edm-ffhq", "--data_dir", tmp_path], capsys)
        assert code == 1 and ERROR.match(err) and "unknown artefact" in err

    def test_default_data_dir(self, monkeypatch, tmp_path):
        monkeypatch.setenv("DIDISTILL_DATA_DIR", str(tmp_path))
        assert prepare.default_data_dir() == str(tmp_path)
        monkeypatch.delenv("DIDISTILL_DATA_DIR")
        assert prepare.default_data_dir() == os.path.expanduser("~/.cache/didistill")
