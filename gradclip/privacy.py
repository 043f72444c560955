"""Privacy accounting for DP-SGD / DP-FedAvg (SPEC §9), through Google's ``dp-accounting``.

The mechanism is the one `gradclip.clipped_sum` runs each step: Poisson sampling of
examples with probability ``sample_rate``, clipping, and Gaussian noise of std
``noise_multiplier`` times the clip norm, composed over ``steps`` steps. Nothing here is
hand-written accounting: the events go to ``dp_accounting``'s RDP accountant (Mironov
2017, with its default orders) or its privacy-loss-distribution accountant. Install
with ``pip install 'gradclip[dp]'``; ``import gradclip`` does not import it.
"""

from . import _checks


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as error:
        raise _checks.dp_accounting_missing(error) from None
    return dp_accounting


def _event(dp_accounting, noise_multiplier, sample_rate, steps):
    if not steps:
        return dp_accounting.NoOpDpEvent()
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _accountant(dp_accounting, accountant):
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    return dp_accounting.pld.PLDAccountant()


def _steps_and_rates(sample_rate, steps, delta):
    sample_rate = _checks.open_unit("sample_rate", sample_rate, closed_above=True)
    steps = _checks.count("steps", steps, 0)
    delta = _checks.open_unit("delta", delta)
    return sample_rate, steps, delta


def epsilon(noise_multiplier, sample_rate, steps, delta, accountant="rdp"):
    """The ε of ``steps`` noised, Poisson-subsampled steps at the given δ.

    Parameters
    ----------
    noise_multiplier : float
        The noise std over the clip norm, finite and >= 0 (0: ε is inf).
    sample_rate : float
        The probability that an example is in a step's batch, in (0, 1].
    steps : int
        >= 0.
    delta : float
        In (0, 1).
    accountant : {"rdp", "pld"}
        ``dp_accounting``'s RDP accountant (with its default orders; the bound Opacus'
        default accountant gives), or its privacy-loss-distribution one (tighter).

    Returns
    -------
    float

    Raises
    ------
    ImportError
        ``dp-accounting`` is not installed.

    Examples
    --------
    >>> import gradclip
    >>> eps = gradclip.privacy.epsilon(1.1, 256 / 60_000, 60 * 60_000 // 256, 1e-5)  # 60 epochs
    >>> round(eps, 2)
    2.6
    """
    noise_multiplier = _checks.finite_nonnegative("noise_multiplier", noise_multiplier)
    sample_rate, steps, delta = _steps_and_rates(sample_rate, steps, delta)
    accountant = _checks.accountant(accountant)
    dp_accounting = _dp_accounting()
    ledger = _accountant(dp_accounting, accountant)
    ledger.compose(_event(dp_accounting, noise_multiplier, sample_rate, steps))
    return float(ledger.get_epsilon(delta))


def noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant="rdp"):
    """The smallest noise multiplier whose `epsilon` is at most ``target_epsilon``.

    Parameters
    ----------
    target_epsilon : float
        > 0, finite.
    delta, sample_rate, steps, accountant
        As in `epsilon`.

    Returns
    -------
    float
        Found by ``dp_accounting.calibrate_dp_mechanism`` (a bracketed search); 0 for no
        steps.

    Examples
    --------
    >>> import gradclip
    >>> sigma = gradclip.privacy.noise_multiplier(3.0, 1e-5, 256 / 60_000, 14_062)
    >>> gradclip.privacy.epsilon(sigma, 256 / 60_000, 14_062, 1e-5) <= 3.0
    True
    """
    target_epsilon = _checks.finite_positive("target_epsilon", target_epsilon)
    sample_rate, steps, delta = _steps_and_rates(sample_rate, steps, delta)
    accountant = _checks.accountant(accountant)
    dp_accounting = _dp_accounting()
    if not steps:
        return 0.0
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(dp_accounting, accountant),
            lambda sigma: _event(dp_accounting, sigma, sample_rate, steps),
            target_epsilon,
            delta,
        )
    )
