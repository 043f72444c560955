"""DP-SGD's clipped gradient sum in JAX by ghost clipping: per-example norms without
per-example gradients.

    .venv/bin/python examples/ghost_jax.py

A plain-function model on token sequences, ``(B, T, d_in)`` inputs: a dense layer applied
at every position (``x @ W1 + b1``, a sequence axis), tanh, a mean over the sequence, and
a dense layer without one (``h @ W2 + b2``) into class logits. One ``jax.vjp`` of the
per-example losses with respect to the two layers' outputs gives each example's output
gradients (a zero "probe" added to each output is what the vjp differentiates); with the
layers' inputs they give every example's squared gradient norm through
``gradclip.dense_sq_norms``, without forming a ``(B, d_in, h)`` array. ``clip_factors``
turns the norms into loss weights, and one ``jax.grad`` of ``Σ_i f_i loss_i`` is the
clipped sum. The script checks it against ``jax.vmap(jax.grad(...))`` per-example
gradients clipped one by one, then takes a few DP-SGD steps (Gaussian noise of
``noise_multiplier · max_norm`` added to the clipped sum).
"""

import jax
import jax.numpy as jnp
import numpy as np

import gradclip

jax.config.update("jax_enable_x64", True)  # the check below compares in float64

B, T, D_IN, HIDDEN, CLASSES = 16, 24, 32, 64, 5
MAX_NORM, NOISE_MULTIPLIER, LR, STEPS = 1.6, 1.0, 0.5, 30


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
        "b2": jnp.zeros(CLASSES),
    }


def forward(params, x, labels, probes=None):
    """Per-example cross-entropy losses ``(B,)`` and the two dense layers' inputs; ``probes``
    (zeros shaped like the layers' outputs) are added to those outputs."""
    p1, p2 = probes if probes is not None else (0.0, 0.0)
    hidden = jnp.tanh(x @ params["w1"] + params["b1"] + p1)  # (B, T, HIDDEN)
    pooled = hidden.mean(axis=1)  # (B, HIDDEN)
    logits = pooled @ params["w2"] + params["b2"] + p2  # (B, CLASSES)
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    return losses, (x, pooled)


def ghost_clipped_sum(params, x, labels):
    """``(Σ_i f_i ∇loss_i, norms)``: one vjp for the output gradients, ghost norms, and a
    second backward pass of the reweighted loss."""
    probes = (jnp.zeros((B, T, HIDDEN)), jnp.zeros((B, CLASSES)))
    losses, vjp, (a1, a2) = jax.vjp(lambda p: forward(params, x, labels, p), probes, has_aux=True)
    (g1, g2) = vjp(jnp.ones_like(losses))[0]  # d loss_i / d output_i: example i's own gradient
    sq_norms = gradclip.dense_sq_norms(a1, g1, bias=True) + gradclip.dense_sq_norms(a2, g2, bias=True)
    factors = jnp.asarray(gradclip.clip_factors(sq_norms, MAX_NORM))
    clipped = jax.grad(lambda p: jnp.sum(factors * forward(p, x, labels)[0]))(params)
    return clipped, np.sqrt(sq_norms)


def materialised_clipped_sum(params, x, labels):
    """The same from per-example gradients (``jax.vmap(jax.grad)``), for the check."""

    def loss(p, x_i, y_i):
        return forward(p, x_i[None], y_i[None])[0][0]

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, labels)
    norms = np.sqrt(sum(np.sum(np.reshape(g, (B, -1)) ** 2, axis=1) for g in per_example.values()))
    factors = np.minimum(1.0, MAX_NORM / (norms + 1e-6))
    return {k: jnp.tensordot(factors, g, axes=1) for k, g in per_example.items()}, norms


def batch(key):
    kx, ky = jax.random.split(key)
    labels = jax.random.randint(ky, (B,), 0, CLASSES)
    x = jax.random.normal(kx, (B, T, D_IN)) + 0.5 * jax.nn.one_hot(labels, D_IN)[:, None, :]
    return x, labels


def main():
    key = jax.random.PRNGKey(0)
    params = init(key)
    x, labels = batch(jax.random.PRNGKey(1))
    ghost, ghost_norms = ghost_clipped_sum(params, x, labels)
    reference, reference_norms = materialised_clipped_sum(params, x, labels)
    norm_error = np.max(np.abs(ghost_norms - reference_norms) / reference_norms)
    sum_error = max(float(jnp.max(jnp.abs(ghost[k] - reference[k]))) for k in params)
    print(f"per-example norms: {ghost_norms.min():.3f} .. {ghost_norms.max():.3f} (max_norm {MAX_NORM})")
    print(f"ghost vs per-example gradients: norms {norm_error:.1e} relative, clipped sum {sum_error:.1e} absolute")
    assert norm_error < 1e-12 and sum_error < 1e-12

    first = float(forward(params, x, labels)[0].mean())
    for step in range(STEPS):
        key, noise_key = jax.random.split(key)
        x, labels = batch(jax.random.PRNGKey(100 + step))
        clipped, _ = ghost_clipped_sum(params, x, labels)
        keys = jax.random.split(noise_key, len(params))
        noisy = {
            k: (g + NOISE_MULTIPLIER * MAX_NORM * jax.random.normal(kk, g.shape)) / B
            for (k, g), kk in zip(clipped.items(), keys)
        }
        params = {k: params[k] - LR * noisy[k] for k in params}
    x, labels = batch(jax.random.PRNGKey(1))
    print(f"DP-SGD, {STEPS} steps: mean loss {first:.3f} -> {float(forward(params, x, labels)[0].mean()):.3f}")


if __name__ == "__main__":
    main()
