"""The demo's claims hold: without clipping the RNN diverges, with clipping it learns."""

import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "exploding_rnn.py")


def test_demo_diverges_without_clipping_and_learns_with_it():
    proc = subprocess.run(
        [sys.executable, "-W", "error", DEMO, "--no-plot"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = {}
    for line in proc.stdout.splitlines():
        for run in ("no clipping", "clip norm", "clip value"):
            if line.startswith(run) and len(line.split()) >= 6:
                verdicts[run] = line[len(run) :].split()
    assert "diverged" in verdicts["no clipping"]
    assert "converged" in verdicts["clip norm"]
    assert "converged" in verdicts["clip value"]


DP_DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "dp_sgd.py")


def test_dp_demo_learns_privately_and_reports_its_epsilon():
    import re

    import gradclip

    proc = subprocess.run([sys.executable, "-W", "error", DP_DEMO], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    accuracy = dict(re.findall(r"^  (\S+ \S+).*?test accuracy (\d\.\d+)", out, re.M))
    assert set(accuracy) == {"non-private SGD", "DP-SGD (C", "non-private FedAvg", "DP-FedAvg, adaptive"}
    assert float(accuracy["DP-SGD (C"]) >= 0.9 and float(accuracy["non-private SGD"]) >= 0.93
    assert float(accuracy["DP-SGD (C"]) >= float(accuracy["non-private SGD"]) - 0.05
    assert float(accuracy["DP-FedAvg, adaptive"]) >= 0.85
    steps, q = re.search(r"(\d+) steps of Poisson batches \(q = (\d\.\d+)\)", out).groups()
    eps = float(re.search(r"sigma = 1.3\).*epsilon = (\d+\.\d+)", out).group(1))
    assert abs(eps - gradclip.privacy.epsilon(1.3, 128 / 1347, int(steps), 1e-5)) < 0.006
    assert abs(float(q) - 128 / 1347) < 1e-4
    clip = float(re.search(r"clip norm 0.1 -> (\d\.\d+)", out).group(1))
    assert clip > 0.15  # the updates' median norm is above the initial bound: it grew
