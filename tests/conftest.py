"""Fixtures shared by the test files: tiny teachers built once per test session (per xdist
worker) instead of once per file."""

import pytest

from tests.teachers import save_tiny_text_teacher


@pytest.fixture(scope="session")
def tiny_text_teacher(tmp_path_factory):
    """A random (perturbed, so not uniform) 2-block DiT teacher for markov_tiny (V = 4, L = 8)."""
    return save_tiny_text_teacher(tmp_path_factory.mktemp("text_teacher"), depth=2)


@pytest.fixture(scope="session")
def tiny_text_teacher_1block(tmp_path_factory):
    """The same with one DiT block (step halving's tests)."""
    return save_tiny_text_teacher(tmp_path_factory.mktemp("text_teacher_1block"), depth=1)


@pytest.fixture(scope="session")
def tiny_toy_teacher(tmp_path_factory):
    """A tiny ring8 EDM teacher trained by the engine in a few seconds (smoke settings)."""
    from didistill.configs import toy_teacher
    from didistill.distill import get_method
    from didistill.train.loop import train

    workdir = tmp_path_factory.mktemp("toy_teacher")
    config = toy_teacher.get_config("ring8,smoke")
    config.train.progress = False
    train(get_method(config), config, str(workdir))
    return str(workdir / "teacher_params.msgpack")
