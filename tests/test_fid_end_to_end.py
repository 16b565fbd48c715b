"""FID end to end on tiny files the test writes: training with periodic evaluation and kept
checkpoints, the Inception-FID block of eval.json, `python -m didistill.evaluate` over the
checkpoints (fid.json, sample grid, export), `python -m didistill.sample` from the exported
generator, bf16 mixed precision, and one clear error per bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill import evaluate, sample
from didistill.configs import digits_distill
from didistill.data import images
from didistill.distill import get_method
from didistill.distill.one_step.image_generator import from_network_file, load_generator
from didistill.eval import fid
from didistill.train.loop import train
from tests.fid_files import fid_files
from tests.teachers import RBG, random_data, save_tiny_unet_teacher

SHAPE = (8, 8, 3)


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
    data = random_data(SHAPE, 10)
    monkeypatch.setattr(images, "load_arrays", lambda data_cfg, split="train": data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return fid_files(tmp_path_factory.mktemp("files"), SHAPE, label_dim=10)


def tiny_config(files, arg="dmd2,smoke"):
    teacher, features, reference = files
    config = digits_distill.get_config(arg)
    config.teacher.checkpoint = teacher
    config.discriminator.resolutions = (8,)
    config.eval.teacher_nfe = 0
    config.eval.fid.update(dict(inception=features, reference=reference, num_samples=8))
    return config


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    """A 3-step run: periodic evaluation every step, checkpoints every step, 1 latest + every
    2nd kept."""
    mp = pytest.MonkeyPatch()
    mp.setattr(images, "load_arrays", lambda data_cfg, split="train": random_data(SHAPE, 10))
    config = tiny_config(files)
    config.train.num_steps = 3
    config.train.checkpoint_every = 1
    config.train.keep_checkpoints = 1
    config.train.keep_period = 2
    config.eval.every = 1
    workdir = str(tmp_path_factory.mktemp("run"))
    result = train(get_method(config), config, workdir)
    mp.undo()
    return workdir, result


class TestTraining:
    def test_eval_json_holds_the_inception_fid_and_its_protocol(self, run, files):
        workdir, result = run
        with open(os.path.join(workdir, "eval.json")) as f:
            record = json.load(f)
        assert record["step"] == 3 and np.isfinite(record["student/fid"])
        protocol = record["fid_protocol"]
        assert protocol["num_samples"] == 8 and protocol["sample_indices"] == [[0, 7]]
        assert protocol["reference"]["file"] == os.path.abspath(files[2])
        assert len(protocol["reference"]["sha256"]) == 64

    def test_periodic_evaluation_and_kept_checkpoints(self, run):
        workdir, _ = run
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        evals = [line for line in lines if "eval/fid" in line]
        assert [line["step"] for line in evals] == [1, 2, 3]
        assert all(np.isfinite(line["eval/fid"]) for line in evals)
        for step in (1, 2, 3):
            assert os.path.isfile(os.path.join(workdir, "samples", f"step_{step:08d}.png"))
        steps = sorted(
            int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()
        )
        assert steps == [2, 3]  # the latest, and every keep_period = 2


class TestEvaluateAndSample:
    def test_evaluate_every_checkpoint_then_export_and_sample(self, run, tmp_path):
        workdir, result = run
        exported = str(tmp_path / "student.msgpack")
        out = evaluate.main(
            [f"--workdir={workdir}", "--steps=all", "--seeds=2", f"--export={exported}"]
        )
        assert sorted(out) == [2, 3]
        with open(os.path.join(workdir, "eval.json")) as f:
            final = json.load(f)
        # the same protocol (indices 0..7) on the same EMA generator as the training's eval
        np.testing.assert_allclose(
            out[3]["fid_per_seed_set"][0], final["student/fid_per_seed_set"][0], rtol=1e-5
        )
        assert out[3]["fid"] == min(out[3]["fid_per_seed_set"])
        for step in (2, 3):
            assert os.path.isfile(os.path.join(workdir, "eval", str(step), "fid.json"))
            assert os.path.isfile(os.path.join(workdir, "eval", str(step), "samples.png"))
        with open(os.path.join(workdir, "eval", "fid_vs_step.json")) as f:
            assert sorted(json.load(f)) == ["2", "3"]

        generator, params, meta = load_generator(exported)
        assert meta["source"]["step"] == 3
        ema = result["state"].generator_ema
        same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, ema)
        assert all(jax.tree.leaves(same))
        images_, labels = sample.main(
            [f"--params={exported}", f"--out={tmp_path / 'out'}", "--num_samples=5"]
        )
        assert images_.shape == (5, *SHAPE) and images_.dtype == np.uint8
        assert labels.shape == (5,)
        assert os.path.isfile(tmp_path / "out" / "samples.png")
        again, _ = sample.draw(exported, 5)
        np.testing.assert_array_equal(again, images_)
        fixed, fixed_labels = sample.draw(exported, 4, labels=[3])
        assert list(fixed_labels) == [3, 3, 3, 3]


def one_line_error(capsys, main, argv, pattern):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert pattern in err, err
    return err


class TestBadInput:
    def test_checkpoint_of_another_architecture(self, run, tmp_path, capsys):
        other = save_tiny_unet_teacher(tmp_path / "other.msgpack", channels=3, channel_mult=(2,))
        one_line_error(
            capsys,
            evaluate.main,
            [f"--workdir={run[0]}", f"--teacher={other}"],
            "is it the teacher this run was trained from",
        )

    def test_missing_files_and_a_reference_of_another_resolution(self, run, tmp_path, capsys):
        workdir = run[0]
        one_line_error(
            capsys,
            evaluate.main,
            [f"--workdir={workdir}", f"--inception={tmp_path / 'none.npz'}"],
            "config.eval.fid.inception=",
        )
        one_line_error(
            capsys,
            evaluate.main,
            [f"--workdir={workdir}", f"--reference={tmp_path / 'none.npz'}"],
            "config.eval.fid.reference=",
        )
        named = str(tmp_path / "cifar10-32x32.npz")
        with open(os.path.join(workdir, "config.json")) as f:
            reference = json.load(f)["eval"]["fid"]["reference"]
        fid.save_stats(named, *fid.load_stats(reference))
        one_line_error(
            capsys,
            evaluate.main,
            [f"--workdir={workdir}", f"--reference={named}"],
            "32x32 images, but the generator makes 8x8",
        )

    def test_no_run_no_step_and_not_a_generator_file(self, run, tmp_path, capsys, files):
        one_line_error(capsys, evaluate.main, [f"--workdir={tmp_path}"], "no config.json")
        one_line_error(
            capsys, evaluate.main, [f"--workdir={run[0]}", "--steps=7"], "no checkpoint at [7]"
        )
        one_line_error(
            capsys,
            sample.main,
            [f"--params={files[0]}", f"--out={tmp_path}"],
            "not an exported one-step generator",
        )
        one_line_error(
            capsys,
            sample.main,
            [f"--params={files[1]}", f"--out={tmp_path}"],
            "holds a 'classifier' network",
        )

    def test_training_refuses_missing_fid_files_before_any_step(self, files, tmp_path):
        from didistill.train.errors import ConfigError

        config = tiny_config(files)
        config.eval.fid.reference = str(tmp_path / "missing.npz")
        with pytest.raises(ConfigError, match="config.eval.fid.reference="):
            get_method(config)


class TestMixedPrecision:
    def test_bf16_steps_are_finite_and_outputs_close_to_float32(self, files):
        teacher = files[0]
        generator, params = from_network_file(teacher, sigma=2.5)
        z = jax.random.normal(jax.random.key(0), (4, *SHAPE))
        y = jnp.arange(4)
        x32 = generator(params, z, y)
        x16 = generator.with_dtype("bfloat16")(params, z, y)
        assert x16.dtype == jnp.float32
        scale = float(jnp.abs(x32).max())
        assert float(jnp.abs(x16 - x32).max()) < 0.05 * scale
        assert not np.array_equal(np.asarray(x16), np.asarray(x32))  # bf16 did compute

        # a bf16 f-distill step (float32 steps are run by every other test)
        config = tiny_config(files, "f_distill,forward_kl,smoke")
        config.model.compute_dtype = "bfloat16"
        method = get_method(config)
        state = method.init(jax.random.key(0, **RBG))
        batch = next(method.batches(0))
        state, metrics = jax.jit(method.step)(state, batch, jax.random.key(1, **RBG), 0)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        leaves = jax.tree.leaves(state.generator)
        assert all(leaf.dtype == jnp.float32 for leaf in leaves)  # master weights
        assert all(v.dtype == jnp.float32 for v in metrics.values())

    def test_bad_dtype_names_the_key(self, files):
        config = tiny_config(files)
        config.model.compute_dtype = "float16"
        with pytest.raises(ValueError, match=r"config\.model\.compute_dtype='float16'"):
            get_method(config)
