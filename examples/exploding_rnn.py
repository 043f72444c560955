"""Exploding gradients in a vanilla RNN, and how gradient clipping tames them.

A small reproduction of the experiment in Pascanu, Mikolov & Bengio (2013),
"On the difficulty of training recurrent neural networks":

* Model: a vanilla tanh RNN, h_t = tanh(W_hh h_{t-1} + W_xh x_t + b), with a
  linear readout y = W_out h_T + b_out of the last hidden state and a
  mean-squared-error loss. Forward pass and backpropagation through time are
  written by hand in NumPy and vectorised over the batch.
* Task: the adding problem (Hochreiter & Schmidhuber 1997). Every step feeds
  (value ~ U[0, 1], marker in {0, 1}); exactly two steps are marked, one in
  each half of the sequence, and the target is the sum of the two marked
  values. Always predicting 1.0 scores an MSE of about 1/6 = 0.167; a network
  that remembers only the later value scores 1/12 = 0.083; the task counts as
  learned below an MSE of 0.05 on held-out sequences.
* W_hh starts as the identity (spectral radius 1): long-range gradients
  survive, but so do long-range gradient *spikes*.
* Training: plain SGD from one seed (same initial weights, same batches)
  three ways: no clipping, ``gradclip.clip_grad_norm_`` and
  ``gradclip.clip_grad_value_``. The step size decays linearly to zero; an
  "epoch" is a block of freshly sampled batches.

What to look for: the gradient norm (measured with ``gradclip.grad_norm``
before any clipping) is mostly a few units, but the recurrence makes it jump
by an order of magnitude now and then, here within the first few batches.
Without clipping, the SGD step taken on such a jump inflates W_hh; from then
on loss and gradients grow geometrically until the loss or the gradient norm
overflows to inf, and the run is stopped as diverged within the first epoch. Clipping
bounds every step: by norm it rescales the whole gradient, by value it clamps
each entry (with this clip value some entry is clamped on every step, which
also bends the update's direction). Both clipped runs learn the task. The
verdicts in the final table are computed from the numbers, not asserted.
Each run records its norms in a ``gradclip.NormMonitor``; with matplotlib
installed, each monitor plots them on a log scale to
``examples/exploding_rnn_<run>.png`` (the clip threshold, spikes and
non-finite steps marked).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

# The matrices here are tiny: BLAS threads only add overhead, and thrash badly on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import gradclip  # noqa: E402

LEARNED_MSE = 0.05  # held-out MSE below which the task counts as learned
BLOWN_UP_MSE = 10.0  # held-out MSE above which a finite run counts as diverged
TEST_SEQUENCES = 1000
PLOT_DIR = Path(__file__).parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps-per-epoch", type=int, default=250)
    parser.add_argument("--lr", type=float, default=0.1, help="initial SGD step size")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--clip-value", type=float, default=0.01)
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args()


def make_adding_batch(rng: np.random.Generator, batch_size: int, seq_len: int):
    """Adding-problem inputs, shape (seq_len, batch, 2), and targets, shape (batch, 1)."""
    values = rng.uniform(0.0, 1.0, size=(batch_size, seq_len))
    half = seq_len // 2
    first = rng.integers(0, half, size=batch_size)
    second = rng.integers(half, seq_len, size=batch_size)
    rows = np.arange(batch_size)
    markers = np.zeros((batch_size, seq_len))
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    inputs = np.stack([values, markers], axis=-1).transpose(1, 0, 2)
    targets = (values[rows, first] + values[rows, second])[:, None]
    return inputs, targets


def init_params(rng: np.random.Generator, hidden_size: int) -> dict[str, np.ndarray]:
    return {
        "W_xh": rng.standard_normal((hidden_size, 2)),
        "W_hh": np.eye(hidden_size),
        "b": np.zeros(hidden_size),
        "W_out": rng.normal(0.0, 1.0 / np.sqrt(hidden_size), size=(1, hidden_size)),
        "b_out": np.ones(1),  # the mean target
    }


def hidden_states(params, inputs) -> np.ndarray:
    """All hidden states h_0 .. h_T, shape (T + 1, batch, hidden); h_0 = 0."""
    seq_len, batch_size, _ = inputs.shape
    input_drive = inputs @ params["W_xh"].T + params["b"]
    w_hh_t = params["W_hh"].T
    states = np.zeros((seq_len + 1, batch_size, w_hh_t.shape[0]))
    for t in range(seq_len):
        states[t + 1] = np.tanh(input_drive[t] + states[t] @ w_hh_t)
    return states


def predict(params, last_state) -> np.ndarray:
    return last_state @ params["W_out"].T + params["b_out"]


def mse(params, inputs, targets) -> float:
    return float(np.mean((predict(params, hidden_states(params, inputs)[-1]) - targets) ** 2))


def loss_and_grads(params, inputs, targets):
    """MSE of one batch and its gradient for every parameter (backprop through time)."""
    states = hidden_states(params, inputs)
    errors = predict(params, states[-1]) - targets
    d_output = 2.0 * errors / len(targets)
    d_preactivations = np.empty_like(states[1:])
    d_state = d_output @ params["W_out"]
    for t in reversed(range(len(inputs))):
        d_preactivations[t] = d_state * (1.0 - states[t + 1] ** 2)
        d_state = d_preactivations[t] @ params["W_hh"]
    hidden_size = states.shape[-1]
    d_pre_flat = d_preactivations.reshape(-1, hidden_size)
    grads = {
        "W_xh": d_pre_flat.T @ inputs.reshape(-1, inputs.shape[-1]),
        "W_hh": d_pre_flat.T @ states[:-1].reshape(-1, hidden_size),
        "b": d_pre_flat.sum(axis=0),
        "W_out": d_output.T @ states[-1],
        "b_out": d_output.sum(axis=0),
    }
    return float(np.mean(errors**2)), grads


# A clipping strategy takes the raw gradients, may clip them in place and returns
# (gradient norm before clipping, whether this step was clipped or None if it never clips).
def no_clipping(grads):
    return gradclip.grad_norm(grads), None


def clip_by_norm(max_norm):
    def clip(grads):
        total_norm = gradclip.clip_grad_norm_(grads, max_norm)
        return total_norm, total_norm > max_norm

    return clip


def clip_by_value(clip_value):
    def clip(grads):
        norm = gradclip.grad_norm(grads)
        exceeded = any(np.abs(g).max() > clip_value for g in grads.values())
        gradclip.clip_grad_value_(grads, clip_value)
        return norm, exceeded

    return clip


@dataclass
class RunResult:
    name: str
    monitor: gradclip.NormMonitor = field(default_factory=gradclip.NormMonitor)
    steps: int = 0
    step_was_clipped: list[bool] = field(default_factory=list)
    hit_nonfinite: bool = False
    final_test_mse: float = float("nan")

    @property
    def verdict(self) -> str:
        if self.hit_nonfinite or not self.final_test_mse < BLOWN_UP_MSE:
            return "diverged"
        return "converged" if self.final_test_mse < LEARNED_MSE else "did not learn"

    @property
    def clipped_share(self) -> str:
        if not self.step_was_clipped:
            return "-"
        return f"{np.mean(self.step_was_clipped):.0%}"


def train(name, clip, threshold, args, seeds, test_set) -> RunResult:
    """SGD on the adding problem; identical init and batches for every strategy.

    ``threshold``: the norm the strategy clips to, drawn in the run's plot (None if none).
    """
    init_seed, batch_seed = seeds
    params = init_params(np.random.default_rng(init_seed), args.hidden)
    batch_rng = np.random.default_rng(batch_seed)
    total_steps = args.epochs * args.steps_per_epoch
    result = RunResult(name)
    print(f"\n[{name}]")
    for epoch in range(1, args.epochs + 1):
        epoch_losses, epoch_norms = [], []
        for _ in range(args.steps_per_epoch):
            inputs, targets = make_adding_batch(batch_rng, args.batch, args.seq_len)
            loss, grads = loss_and_grads(params, inputs, targets)
            norm, clipped = clip(grads)
            epoch_losses.append(loss)
            epoch_norms.append(norm)
            result.steps += 1
            result.monitor.record(norm, threshold=threshold)
            if clipped is not None:
                result.step_was_clipped.append(clipped)
            if not (np.isfinite(norm) and np.isfinite(loss)):
                result.hit_nonfinite = True
                break
            step_size = args.lr * (1.0 - (result.steps - 1) / total_steps)
            for key, grad in grads.items():
                params[key] -= step_size * grad
        result.final_test_mse = mse(params, *test_set)
        print(
            f"epoch {epoch:2d}  train MSE {np.mean(epoch_losses):9.4g}  "
            f"test MSE {result.final_test_mse:9.4g}  "
            f"grad norm mean {np.mean(epoch_norms):9.4g}  max {np.max(epoch_norms):9.4g}"
        )
        if result.hit_nonfinite:
            print(
                f"step {result.steps}: loss {loss:.4g}, gradient norm {norm:.4g}; "
                "not finite, stopping this run"
            )
            break
    return result


def print_verdicts(results: list[RunResult], baseline_mse: float) -> None:
    print(
        f"\nheld-out MSE of always predicting 1.0: {baseline_mse:.3f}; "
        f"'converged' means held-out MSE < {LEARNED_MSE}"
    )
    header = (
        f"{'run':<16} {'verdict':<13} {'steps':>5} {'final MSE':>10} "
        f"{'max grad norm':>13} {'steps clipped':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<16} {r.verdict:<13} {r.steps:>5} {r.final_test_mse:>10.4g} "
            f"{r.monitor.summary()['max']:>13.4g} {r.clipped_share:>13}"
        )


def save_plots(results: list[RunResult]) -> None:
    """Each run's gradient norms on a log scale, drawn by its NormMonitor."""
    for r in results:
        path = PLOT_DIR / f"exploding_rnn_{'_'.join(r.name.split()[:2])}.png"
        try:
            r.monitor.plot(path)
        except ImportError as error:
            print(f"plots skipped: {error}")
            return
        print(f"plot of '{r.name}' saved to {path}")


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    init_seed, batch_seed, test_seed = np.random.SeedSequence(args.seed).spawn(3)
    test_set = make_adding_batch(np.random.default_rng(test_seed), TEST_SEQUENCES, args.seq_len)
    baseline_mse = float(np.mean((test_set[1] - 1.0) ** 2))
    print(
        f"adding problem, T={args.seq_len}; tanh RNN, {args.hidden} hidden units; "
        f"SGD lr {args.lr} -> 0 over {args.epochs} x {args.steps_per_epoch} batches of {args.batch}; "
        f"seed {args.seed}"
    )
    strategies = [
        ("no clipping", no_clipping, None),
        (f"clip norm {args.max_norm:g}", clip_by_norm(args.max_norm), args.max_norm),
        (f"clip value {args.clip_value:g}", clip_by_value(args.clip_value), None),
    ]
    with np.errstate(over="ignore", invalid="ignore"):
        results = [train(*strategy, args, (init_seed, batch_seed), test_set) for strategy in strategies]
    print_verdicts(results, baseline_mse)
    if args.no_plot:
        print("plots skipped: --no-plot")
    else:
        save_plots(results)
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
