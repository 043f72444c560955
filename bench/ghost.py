"""Ghost norms against Opacus' (issue 16): each example's squared gradient norm of one layer
from its activations and output gradients, on the same tensors.

    .venv/bin/python bench/run.py --only ghost          # with the suite's record and tables
    .venv/bin/python bench/ghost.py [--quick] [--only G1,G3] [--markdown]

Contenders: ``gradclip.dense_sq_norms`` / ``embedding_sq_norms`` on the torch tensors
(zero-copy), and Opacus' own ghost norm functions (``compute_linear_norm_sample``,
``compute_embedding_norm_sample``, what ``GradSampleModuleFastGradientClipping`` calls
per layer) on the same tensors; for a layer with a bias Opacus returns two norms, whose
squares are added (outside the timed call). Calls are interleaved (``timing.py``).

Figures: median and min seconds; Opacus / gradclip (the issue's ratio); the peak extra
memory of one call, measured in a fresh interpreter (inputs made, one call to warm up,
the kernel's peak RSS reset through ``/proc/self/clear_refs``, then ``VmHWM`` minus the
RSS before the call) with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KB, so that freed
blocks go back to the system instead of hiding the next call's allocations; and the
relative error of the squared norms against a float64 reference (the per-example weight
gradients formed one by one, squares summed with ``math.fsum``).
"""

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from timing import Timed, measure_interleaved

SEED = 20261204
QUICK_REPEATS, REPEATS = 3, 5
MMAP_THRESHOLD = 1 << 16


@dataclass(frozen=True)
class GhostWorkload:
    """One layer's tensors: ``dense`` (B, T, d_in) / (B, T, d_out), or ``embedding``."""

    name: str
    title: str
    kind: str
    B: int
    T: int
    d_in: int  # the vocabulary for an embedding
    d_out: int
    bias: bool = False
    target: str = ""
    family: str = "ghost"

    def build(self):
        """``(inputs, output_grads)`` as float32 torch tensors (int64 indices)."""
        import torch

        rng = np.random.default_rng(SEED)
        if self.kind == "embedding":
            inputs = torch.from_numpy(rng.integers(0, self.d_in, (self.B, self.T)))
        else:
            inputs = torch.from_numpy(rng.standard_normal((self.B, self.T, self.d_in), dtype=np.float32))
        grads = torch.from_numpy(rng.standard_normal((self.B, self.T, self.d_out), dtype=np.float32))
        return inputs, grads


WORKLOADS = [
    GhostWorkload("G1", "dense 32 x 256, 768 -> 768, bias (Gram route)", "dense", 32, 256, 768, 768, True,
                  ">= 1.5x Opacus; float64-exact"),
    GhostWorkload("G1-nobias", "the same without a bias", "dense", 32, 256, 768, 768, False,
                  ">= 1.5x Opacus; float64-exact"),
    GhostWorkload("G2", "dense 32 x 2048, 768 -> 768, bias (direct route)", "dense", 32, 2048, 768, 768, True,
                  ">= 3x Opacus' Gram route; extra memory <= 4 MB"),
    GhostWorkload("G2-nobias", "the same without a bias", "dense", 32, 2048, 768, 768, False,
                  ">= 3x Opacus' Gram route; extra memory <= 4 MB"),
    GhostWorkload("G3", "embedding 32 x 512, vocab 50,257, d 768", "embedding", 32, 512, 50257, 768, False,
                  ">= 2x Opacus; no (B, vocab, d) allocation"),
]  # fmt: skip


def contenders(workload):
    """``{name: call(inputs, grads) -> float64 squared norms (B,)}``, gradclip first."""
    import torch
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample
    from opacus.grad_sample.linear import compute_linear_norm_sample

    import gradclip

    if workload.kind == "embedding":
        layer = torch.nn.Embedding(workload.d_in, workload.d_out)
        ours = gradclip.embedding_sq_norms

        def opacus(idx, g):
            return compute_embedding_norm_sample(layer, [idx], g)
    else:
        layer = torch.nn.Linear(workload.d_in, workload.d_out, bias=workload.bias)

        def ours(a, g):
            return gradclip.dense_sq_norms(a, g, bias=workload.bias)

        def opacus(a, g):
            return compute_linear_norm_sample(layer, [a], g)

    def opacus_sq_norms(norms_by_parameter):
        return sum(n.double().numpy() ** 2 for n in norms_by_parameter.values())

    return {"gradclip": (ours, np.asarray), "opacus ghost norm": (opacus, opacus_sq_norms)}


def reference(workload, inputs, grads):
    """Squared per-example norms in float64: each example's gradient formed, squares fsum'd."""
    out = []
    for i in range(workload.B):
        g = grads[i].double().numpy()
        if workload.kind == "embedding":
            rows, inverse = np.unique(inputs[i].numpy(), return_inverse=True)
            weight = np.zeros((rows.size, g.shape[1]))
            np.add.at(weight, inverse, g)
            squares = [weight.ravel() ** 2]
        else:
            weight = g.T @ inputs[i].double().numpy()  # float64 products of float32 values: exact
            squares = [weight.ravel() ** 2] + ([g.sum(axis=0) ** 2] if workload.bias else [])
        out.append(math.fsum(np.concatenate(squares)))
    return np.array(out)


def peak_extra_bytes(workload, contender):
    """The peak extra memory of one call, in a fresh interpreter (see the module notes)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(
        [sys.executable, os.path.join(here, "ghost.py"), "--memory", workload.name, contender],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {workload.name} {contender} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_bytes"]


def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(name, contender):
    workload = next(w for w in WORKLOADS if w.name == name)
    inputs, grads = workload.build()
    call, _ = contenders(workload)[contender]
    call(inputs, grads)  # compiles, starts threads
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before = _status_kb("VmRSS")
    call(inputs, grads)
    print(json.dumps({"extra_bytes": _status_kb("VmHWM") - before}))


def measure(workload, repeats, progress=print):
    """Every figure of one workload (its tensors are freed on return)."""
    inputs, grads = workload.build()
    expected = reference(workload, inputs, grads)
    calls = contenders(workload)
    rows = {}
    for name, (call, as_sq_norms) in calls.items():
        got = as_sq_norms(call(inputs, grads))  # warm-up (compiles) and check
        rows[name] = {"relative_error": float(np.max(np.abs(got - expected) / expected))}
    progress(f"{workload.name} ({workload.title}): {len(calls)} contenders x {repeats} repeats")
    items = [Timed(name, lambda _, call=call: call(inputs, grads)) for name, (call, _) in calls.items()]
    samples = measure_interleaved(items, repeats)
    for name, row in rows.items():
        row.update(median_s=samples[name].median, min_s=samples[name].min, samples_s=samples[name].seconds)
        progress(f"{workload.name}: {name} peak extra memory (fresh interpreter)")
        row["peak_extra_bytes"] = peak_extra_bytes(workload, name)
    rows["gradclip"]["opacus_over_gradclip"] = rows["opacus ghost norm"]["median_s"] / rows["gradclip"]["median_s"]
    return {"name": workload.name, "title": workload.title, "target": workload.target, "contenders": rows}


def selected(tokens):
    """The workloads named by ``tokens`` (lower case names, or "ghost" for all)."""
    return [w for w in WORKLOADS if "ghost" in tokens or w.name.lower() in tokens]


def names():
    return {w.name.lower() for w in WORKLOADS} | {"ghost"}


def render(results, markdown=False):
    import report

    columns = [
        ("workload", "<"), ("contender", "<"), ("median", ">"), ("min", ">"), ("Opacus / gradclip", ">"),
        ("peak extra MB", ">"), ("rel. error", ">"), ("target", "<"),
    ]  # fmt: skip
    rows = []
    for result in results:
        for k, (name, r) in enumerate(result["contenders"].items()):
            ratio = r.get("opacus_over_gradclip")
            rows.append([
                result["name"] if k == 0 else "", name, report.seconds(r["median_s"]), report.seconds(r["min_s"]),
                f"{ratio:.2f}x" if ratio else "", f"{r['peak_extra_bytes'] / 1e6:.1f}",
                f"{r['relative_error']:.1e}", result["target"] if k == 0 else "",
            ])  # fmt: skip
    legend = (
        "Ghost norms (issue 16): squared per-example norms of one layer from its activations and output gradients, "
        "float32 torch tensors. Opacus / gradclip: median over median. peak extra MB: one call's peak RSS above "
        "the RSS before it, in a fresh interpreter. rel. error: largest over the examples, against float64."
    )
    return "\n\n".join([report.format_table(columns, rows, markdown), legend])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} repeats instead of {REPEATS}")
    parser.add_argument("--only", default="ghost", help="comma-separated workloads, e.g. G1,G3")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--memory", nargs=2, metavar=("WORKLOAD", "CONTENDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:
        return _memory_probe(*args.memory)
    tokens = {t.strip().lower() for t in args.only.split(",") if t.strip()}
    if tokens - names():
        parser.error(f"unknown workload(s) {sorted(tokens - names())}; choose from {sorted(names())}")
    repeats = QUICK_REPEATS if args.quick else REPEATS
    results = [measure(w, repeats, lambda m: print(m, file=sys.stderr, flush=True)) for w in selected(tokens)]
    print(render(results, args.markdown))
    return results


if __name__ == "__main__":
    main()
