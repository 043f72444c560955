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
