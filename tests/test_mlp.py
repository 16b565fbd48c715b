"""Tests for didistill.nets.mlp: shapes, preconditioning, features, head, generator use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from didistill.diffusion import edm
from didistill.nets.mlp import MLPDenoiser, MLPHead, sinusoidal_embedding


@pytest.fixture(scope="module")
def net_and_params():
    net = MLPDenoiser(width=32, depth=2, emb_dim=16, sigma_data=1.3)
    x = jnp.zeros((4, 2))
    params = net.init(jax.random.key(0), x, jnp.ones((4,)))
    # Randomise the zero-initialised output layer so F is not identically 0.
    noisy = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
    return net, params, noisy


def test_embedding_shape_and_range():
    emb = sinusoidal_embedding(jnp.linspace(-2, 2, 5), 16)
    assert emb.shape == (5, 16)
    assert np.all(np.abs(emb) <= 1.0)


def test_output_and_feature_shapes(net_and_params):
    net, _, params = net_and_params
    x = jax.random.normal(jax.random.key(2), (7, 2))
    sigma = jnp.full((7,), 0.5)
    apply = jax.jit(net.apply, static_argnames="features")
    denoised, feats = apply(params, x, sigma, features=True)
    assert denoised.shape == (7, 2) and feats.shape == (7, 32)
    np.testing.assert_allclose(apply(params, x, sigma), denoised, rtol=1e-6)
    np.testing.assert_allclose(apply(params, x, 0.5), denoised, rtol=1e-6)


def test_input_dim_from_data():
    net = MLPDenoiser(width=16, depth=1, emb_dim=8)
    x = jnp.ones((3, 5))
    out, _ = jax.eval_shape(net.init_with_output, jax.random.key(0), x, jnp.ones((3,)))
    assert out.shape == (3, 5)


def test_zero_init_output_gives_c_skip_x(net_and_params):
    net, params, _ = net_and_params
    x = jax.random.normal(jax.random.key(3), (5, 2))
    sigma = jnp.array([0.01, 0.1, 1.0, 10.0, 80.0])
    c = edm.preconditioning(sigma, net.sigma_data)
    np.testing.assert_allclose(
        jax.jit(net.apply)(params, x, sigma), c.c_skip[:, None] * x, rtol=1e-6
    )


def test_preconditioned_output(net_and_params):
    # D = c_skip x + c_out F, so as sigma -> 0 the output tends to x whatever F is.
    net, _, params = net_and_params
    x = jax.random.normal(jax.random.key(4), (5, 2))
    apply = jax.jit(net.apply)
    np.testing.assert_allclose(apply(params, x, 1e-4), x, atol=1e-3)
    assert not np.allclose(apply(params, x, 1.0), x, atol=1e-2)


def test_one_step_generator_use(net_and_params):
    net, _, params = net_and_params
    sigma_g = 2.5
    z = jax.random.normal(jax.random.key(5), (6, 2))
    generate = jax.jit(lambda p, z: net.apply(p, sigma_g * z, sigma_g))
    assert generate(params, z).shape == (6, 2)
    grads = jax.grad(lambda p: jnp.sum(generate(p, z) ** 2))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_head_on_features(net_and_params):
    net, _, params = net_and_params
    x = jax.random.normal(jax.random.key(6), (9, 2))
    _, feats = jax.jit(net.apply, static_argnames="features")(
        params, x, jnp.full((9,), 0.3), features=True
    )
    head = MLPHead(width=16, depth=2)
    head_params = jax.jit(head.init)(jax.random.key(7), feats)
    logits = jax.jit(head.apply)(head_params, feats)
    assert logits.shape == (9,)
    loss = lambda hp: jnp.mean(jax.nn.softplus(-head.apply(hp, feats)))
    grads = jax.jit(jax.grad(loss))(head_params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
