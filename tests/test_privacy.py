"""gradclip.privacy (SPEC §9): the same ε as dp_accounting called directly, Opacus' RDP
accountant's ε on Abadi et al.'s MNIST settings, and noise multipliers that reach a target."""

import sys
import warnings

import dp_accounting
import pytest

import gradclip as gc
from helpers import raises_with


def _direct(sigma, q, steps, delta, accountant):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    ledger = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    ledger.compose(event)
    return ledger.get_epsilon(delta)


SETTINGS = [(1.1, 256 / 60_000, 2_000, 1e-5), (0.8, 0.004, 500, 1e-6), (3.0, 4096 / 50_000, 300, 1e-5)]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS)
def test_epsilon_is_dp_accountings(sigma, q, steps, delta, accountant):
    expected = _direct(sigma, q, steps, delta, accountant)
    assert gc.privacy.epsilon(sigma, q, steps, delta, accountant=accountant) == expected


@pytest.mark.parametrize("sigma", [2.0, 4.0, 8.0])
def test_epsilon_agrees_with_opacus_rdp(sigma):
    """Abadi et al. 2016's MNIST runs: lots of 600 of 60,000 examples (q = 0.01), noise
    2, 4 or 8, δ = 1e-5; here 100 epochs (10,000 steps)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(sigma, 0.01, 10_000)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns when the best order is at the end of its range
        theirs = accountant.get_epsilon(1e-5)
    ours = gc.privacy.epsilon(sigma, 0.01, 10_000, 1e-5)
    assert abs(ours - theirs) <= 1e-6 * theirs


def test_more_noise_less_epsilon_and_no_noise_no_privacy():
    eps = [gc.privacy.epsilon(sigma, 0.01, 1000, 1e-5) for sigma in (0.7, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0
    assert gc.privacy.epsilon(0.0, 0.01, 1000, 1e-5) == float("inf")
    assert gc.privacy.epsilon(1.0, 0.01, 0, 1e-5) == 0.0
    assert gc.privacy.noise_multiplier(1.0, 1e-5, 0.01, 0) == 0.0


@pytest.mark.parametrize(
    "accountant, target, q, steps",
    [("rdp", 2.0, 256 / 60_000, 500), ("pld", 1.0, 0.2, 20)],  # PLD's search is slow: a small problem
)
def test_noise_multiplier_reaches_the_target(accountant, target, q, steps):
    sigma = gc.privacy.noise_multiplier(target, 1e-5, q, steps, accountant=accountant)
    assert gc.privacy.epsilon(sigma, q, steps, 1e-5, accountant=accountant) <= target
    assert gc.privacy.epsilon(0.97 * sigma, q, steps, 1e-5, accountant=accountant) > target  # not far above


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: gc.privacy.epsilon(-1.0, 0.1, 10, 1e-5), ValueError, "noise_multiplier must be a finite number >= 0"),
        (lambda: gc.privacy.epsilon(1.0, 0.0, 10, 1e-5), ValueError, "sample_rate must be in (0, 1]"),
        (lambda: gc.privacy.epsilon(1.0, 1.5, 10, 1e-5), ValueError, "sample_rate must be in (0, 1]"),
        (lambda: gc.privacy.epsilon(1.0, 0.1, -1, 1e-5), ValueError, "steps must be >= 0"),
        (lambda: gc.privacy.epsilon(1.0, 0.1, 2.5, 1e-5), TypeError, "steps must be an int"),
        (lambda: gc.privacy.epsilon(1.0, 0.1, 10, 1.0), ValueError, "delta must be in (0, 1)"),
        (lambda: gc.privacy.epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp"), ValueError, "must be 'rdp' or 'pld'"),
        (lambda: gc.privacy.noise_multiplier(0.0, 1e-5, 0.1, 10), ValueError, "target_epsilon must be a finite"),
    ],
)
def test_bad_arguments(call, error, fragment):
    with raises_with(error, fragment):
        call()


def test_without_dp_accounting(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails
    with raises_with(ImportError, "dp-accounting", "pip install 'gradclip[dp]'"):
        gc.privacy.epsilon(1.0, 0.01, 10, 1e-5)
