"""`python -m benchmarks.peers --tiny`: the PyTorch transcriptions compute what this library
computes (same losses, same generator update, same samples), and the report has every field.

The real test is the equality: the DMD fake-score losses and FastGen's VSD value, the MDLM
loss, the generator's parameter update, with the GAN branch also the discriminator losses,
the generator's GAN term and the discriminator's update, the DiDi-Instruct discriminator and
student losses (policy gradient, KL, entropy), the images of the 1- and 4-step students and
the text sampler's tokens must agree between our jitted JAX and the plain-PyTorch reference
(`benchmarks/peer_torch/`). Timings are only checked to be positive (machine-dependent).
Skips without torch (the optional `peers` extra); `make test` never installs it.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch", reason="the peer benchmark needs the optional 'peers' extra (torch)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = (
    "name", "settings", "ours_steps_per_s", "ref_steps_per_s", "ratio", "ours_compile_s",
    "ours_peak_rss_mib", "ref_peak_rss_mib", "ours_loss", "ref_loss", "loss_abs_diff",
)  # fmt: skip


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(tmp_path, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "benchmarks.peers", *args]
    # generous: on a loaded 2-core machine the tiny setting is mostly XLA compile (minutes)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def _report(tmp_path_factory, only):
    out = tmp_path_factory.mktemp("peers") / "peers.json"
    proc = _run(out.parent, "--tiny", "--repeats=1", f"--only={only}", f"--json={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _report(tmp_path_factory, "dmd,mdlm,sampling")


@pytest.fixture(scope="module")
def training_report(tmp_path_factory):  # the lines with a discriminator, in their own process
    return _report(tmp_path_factory, "dmd_gan,didi")


@pytest.mark.parametrize("which, count", [("report", 5), ("training_report", 2)])
def test_report_has_every_field(which, count, request):
    results, stdout = request.getfixturevalue(which)
    env = results["environment"]
    assert env["jax_version"] and env["torch_version"] and env["threads"] >= 1
    assert env["setting"] == "tiny" and "commit" in env
    names = [r["name"] for r in results["lines"]]
    # dmd, mdlm, 1-step and 4-step images, text sampler; dmd + GAN, didi
    assert len(names) == count
    for row in results["lines"]:
        for field in FIELDS:
            assert field in row, (row["name"], field)
        for field in ("ours_steps_per_s", "ref_steps_per_s", "ratio", "ours_compile_s"):
            assert _positive(row[field]), (row["name"], field)
        # RSS increases: finite, may be slightly negative when a side reuses freed memory
        assert math.isfinite(row["ours_peak_rss_mib"]) and math.isfinite(row["ref_peak_rss_mib"])
        assert row["name"] in stdout
    assert "| line |" in stdout


def _line(report, prefix):
    (row,) = [r for r in report[0]["lines"] if r["name"].startswith(prefix)]
    return row


def test_dmd_step_computes_the_same_losses_and_update(report):
    dmd = _line(report, "dmd step (")
    ours, ref = dmd["ours_loss"], dmd["ref_loss"]
    assert len(ours["fake_score"]) == len(ref["fake_score"]) >= 1
    for a, b in zip(ours["fake_score"], ref["fake_score"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert ours["vsd"] == pytest.approx(ref["vsd"], rel=1e-4)
    assert dmd["generator_update_rel_gap"] < 1e-2


def test_mdlm_step_computes_the_same_loss(report):
    mdlm = _line(report, "mdlm")
    assert mdlm["ours_loss"] == pytest.approx(mdlm["ref_loss"], rel=1e-5)
    assert mdlm["loss_abs_diff"] < 1e-4


def test_samplers_draw_the_same_samples(report):
    one, four, text = (_line(report, p) for p in ("1-step", "4-step", "text sampler"))
    assert one["max_abs_image_diff"] < 1e-4 and four["max_abs_image_diff"] < 1e-4
    assert text["ours_nfe"] == text["ref_nfe"] >= 1
    assert text["token_agreement"] == 1.0


def test_dmd_gan_step_computes_the_same_losses_and_updates(training_report):
    """FastGen's discriminator on the teacher's features: fake-score and discriminator losses
    of the critic update, VSD and the generator's GAN term, and both parameter updates."""
    row = _line(training_report, "dmd step + GAN")
    ours, ref = row["ours_loss"], row["ref_loss"]
    for key in ("fake_score", "discriminator"):
        assert len(ours[key]) == len(ref[key]) >= 1
        for a, b in zip(ours[key], ref[key], strict=True):
            assert a == pytest.approx(b, rel=1e-4)
    assert ours["vsd"] == pytest.approx(ref["vsd"], rel=1e-4)
    assert ours["gan_generator"] == pytest.approx(ref["gan_generator"], rel=1e-5)
    assert row["generator_update_rel_gap"] < 1e-2
    assert row["discriminator_update_rel_gap"] < 1e-3


def test_didi_step_computes_the_same_losses(training_report):
    """The discriminator loss (before its update) and the student's losses (after it: the
    reward reads the updated, spectrally normalised discriminator) agree."""
    row = _line(training_report, "didi")
    ours, ref = row["ours_loss"], row["ref_loss"]
    assert ours["kl_to_teacher"] > 0  # the student starts away from the teacher
    for key in ("discriminator_loss", "pg_loss", "kl_to_teacher", "entropy", "student_loss"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only=dmd,gan"], "--only"),
        (["--repeats=-1"], "--repeats"),
        (["--dit_width=30", "--dit_heads=4"], "--dit_width"),
        (["--batch=0"], "--batch"),
        (["--tiny", "--published"], "--published"),
    ],
)
def test_bad_arguments_end_in_one_line(tmp_path, args, message):
    proc = _run(tmp_path, *args)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("usage:") is False and message in last
