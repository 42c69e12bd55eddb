"""
Tests for toy_bandit.py: the paper's closed forms (1), (3), (3b), (4) and the step (5b) of the loss we
run, each against an independent reference (a hand derivation, a brute-force minimiser written here,
a limit). CPU only, numpy and torch, no transformers of its own:

    python -m pytest -q test_toy_bandit.py

Equation numbers are pmd_mean.py's (see toy_bandit.py's docstring).
"""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pmd_mean as pm
import toy_bandit as tb

HERE = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Helpers: W₀ on its whole domain, the KL–χ² objectives, and a brute-force minimiser on the simplex


def lambert_w(x):
    """Principal branch W₀(x) for x ≥ −1/e (nan below), elementwise; numpy array or torch tensor.

    x > 0 goes through tb._log_w_of_exp(log x) (the solver the script uses, stable for huge x).
    −1/e ≤ x ≤ 0 uses Halley's method on f(w) = w·e^w − x from the branch-point series
    w ≈ −1 + p − p²/3 + 11p³/72, p = √(2(e·x + 1)).
    """
    x0, back = tb._as_numpy(x)
    xn = np.atleast_1d(x0)                                                 # (n,)
    w = np.full(xn.shape, np.nan)
    pos = xn > 0
    w[pos] = np.exp(tb._log_w_of_exp(np.log(xn[pos])))
    neg = (xn <= 0) & (xn >= -1.0 / math.e)
    if neg.any():
        xm = xn[neg]
        p = np.sqrt(np.maximum(2.0 * (math.e * xm + 1.0), 0.0))
        wn = -1.0 + p - p**2 / 3.0 + 11.0 / 72.0 * p**3
        for _ in range(50):
            ew = np.exp(wn)
            f = wn * ew - xm
            # Halley: w ← w − f / (f' − f·f''/(2f')),  f' = e^w·(w + 1),  f'' = e^w·(w + 2)
            denom = ew * (wn + 1.0) - (wn + 2.0) * f / (2.0 * (wn + 1.0) + 1e-300)
            step = np.where(denom != 0, f / np.where(denom == 0, 1.0, denom), 0.0)
            wn = wn - step
            if np.all(np.abs(step) < 1e-15):
                break
        w[neg] = wn
    return back(w.reshape(x0.shape))


def chi2(p, q, lengths=None):
    """Pearson χ²(p‖q) = Σ q·(p/q − 1)²; with lengths, the length-weighted Σ q·|y|·(p/q − 1)²."""
    ell = 1.0 if lengths is None else np.asarray(lengths, dtype=np.float64)
    return float(np.sum(q * ell * (p / q - 1.0) ** 2))


def kl_chi2_objective(pi_new, pi, r, tau, lam, lengths=None):
    """The objective (4), E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t); with lengths, the one (5b) maximises,
    E_π[r − λ·|y|] − τ·KL(π‖π_t) − (λ/2)·χ²_|y|(π‖π_t)."""
    token_cost = 0.0 if lengths is None else lam * float(pi_new @ lengths)
    return float(pi_new @ r - token_cost - tau * tb.kl(pi_new, pi) - 0.5 * lam * chi2(pi_new, pi, lengths))


def minimise_on_simplex(f, pi0, iters=2000):
    """argmin of f over the interior of the simplex, by Levenberg–Marquardt-damped Newton on softmax logits.

    f takes log π, a (N,) float64 tensor, and returns a scalar tensor. Logit 0 is pinned, so the
    N − 1 free logits have a non-singular Hessian where f is strictly convex; elsewhere the damping μ
    grows until the step (H + μ·I)⁻¹·g decreases f, and shrinks again after each success, so far from
    the optimum it is gradient descent and near it Newton's method. Steps are capped at 1 nat per
    logit: a full Newton leap can push an arm to 1e-16, where softmax's gradient vanishes and the
    search stalls. Nothing from toy_bandit.
    """
    phi = torch.tensor(np.log(pi0[1:]) - np.log(pi0[0]), dtype=torch.float64)  # (N − 1,)
    eye = torch.eye(len(phi), dtype=torch.float64)                         # (N − 1, N − 1)

    def F(phi):
        theta = torch.cat([torch.zeros(1, dtype=torch.float64), phi])      # (N,)
        return f(torch.log_softmax(theta, 0))

    mu = 1e-3
    for _ in range(iters):
        val = F(phi)
        g = torch.autograd.functional.jacobian(F, phi)                     # (N − 1,)
        H = torch.autograd.functional.hessian(F, phi)                      # (N − 1, N − 1)
        scale = float(H.diagonal().abs().max()) + 1e-300
        while mu < 1e20:
            step = -torch.linalg.solve(H + mu * scale * eye, g)
            step = step / max(1.0, float(step.abs().max()))                # at most 1 nat per logit: no leaps
            if float(F(phi + step)) < float(val):                          # into softmax's flat corners
                break
            mu *= 4.0
        else:
            break                                                          # no step decreases f: done
        phi = phi + step
        mu = max(mu / 3.0, 1e-12)
        if float(step.abs().max()) < 1e-13:
            break
    theta = torch.cat([torch.zeros(1, dtype=torch.float64), phi])
    return torch.softmax(theta, 0).numpy()


def population_loss(pi, r, tau, lengths, b):
    """E_{π_t}[(5)] as a function of log π, through the real pmd_mean.pmd_loss: every arm once, with the
    per-sequence weight N·π_t (so the plain mean over arms is the π_t-weighted sum)."""
    pi_t = torch.tensor(pi, dtype=torch.float64)                           # (N,)
    adv = torch.tensor(r - b, dtype=torch.float64)                         # (N,) A = r − b
    ell = torch.tensor(lengths, dtype=torch.float64)                       # (N,) |y|
    return lambda logp: pm.pmd_loss(logp, pi_t.log(), adv, tau, ell, len(pi) * pi_t)


def random_length_cases(seed, n_cases=12):
    """(π_t, r, |y|, τ): random N, π_t, rewards in [0, 1] (graded or binary), integer lengths 1..30."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        n = int(rng.integers(2, 9))
        pi = rng.dirichlet(np.ones(n))
        r = rng.uniform(0, 1, n) if i % 2 == 0 else (rng.uniform(0, 1, n) < 0.4).astype(float)
        if np.ptp(r) == 0:
            r[0] = 1.0 - r[0]
        lengths = rng.integers(1, 31, n).astype(float)
        cases.append((pi, r, lengths, (0.05, 0.3, 1.0)[i % 3]))
    return cases


def _cases():
    """(π_t, r) pairs: the script's bandit, and random ones with graded and with binary rewards."""
    rng = np.random.default_rng(0)
    cases = [(tb.PI_T, tb.R_GRADED), (tb.PI_T, tb.R_BINARY)]
    for n in (2, 5, 12):
        pi = rng.dirichlet(np.ones(n))
        cases.append((pi, rng.uniform(0, 1, n)))
        cases.append((pi, (rng.uniform(0, 1, n) < 0.3).astype(float)))
    return [(p, r) for p, r in cases if np.ptp(r) > 0]


TAUS = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)


# -----------------------------------------------------------------------------
# Lambert W


def test_lambert_w_inverts_over_many_orders_of_magnitude():
    x = np.logspace(-300, 300, 601)                                        # (601,)
    w = lambert_w(x)
    # w·e^w = x, checked in log space (w + log w = log x) so nothing overflows
    np.testing.assert_allclose(w + np.log(w), np.log(x), rtol=1e-14, atol=1e-14)
    # directly too; e^w amplifies w's rounding by w (up to ~690 here), hence the looser rtol
    np.testing.assert_allclose(w * np.exp(w), x, rtol=1e-12)
    # the negative part of the principal branch, down to the branch point
    xn = np.linspace(-1 / math.e, 0, 201)
    wn = lambert_w(xn)
    assert np.all(wn >= -1 - 1e-7)
    np.testing.assert_allclose(wn * np.exp(wn), xn, atol=1e-13)
    # known values: the omega constant, W(e) = 1, W(0) = 0, W(−1/e) = −1, below −1/e undefined
    vals = lambert_w(np.array([1.0, math.e, 0.0, -1 / math.e, -0.5]))
    np.testing.assert_allclose(vals[:4], [0.5671432904097838, 1.0, 0.0, -1.0], atol=1e-7)
    assert np.isnan(vals[4])


def test_lambert_w_of_exp_is_stable_for_huge_arguments():
    z = np.array([-1e3, -50.0, 0.0, 1.0, 50.0, 1e3, 1e5, 1e8])             # x = e^z overflows past ~709
    s = tb._log_w_of_exp(z)
    # s = log W(e^z) solves e^s + s = z
    np.testing.assert_allclose(np.exp(s) + s, z, rtol=1e-14, atol=1e-15)


def test_lambert_w_accepts_tensors():
    x = torch.tensor([0.5, 2.0, 1e10], dtype=torch.float64)
    w = lambert_w(x)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64
    np.testing.assert_allclose((w * w.exp()).numpy(), x.numpy(), rtol=1e-13)


# -----------------------------------------------------------------------------
# The closed forms, equal lengths: (1), (3), (3a), (3b), (4)


@pytest.mark.parametrize("tau", TAUS)
def test_population_update_normalised_and_stationary(tau):
    for pi, r in _cases():
        new, lam = tb.pmd_mean_population_update(pi, r, tau)
        assert lam > 0
        assert abs(new.sum() - 1) < 1e-12
        assert np.all(new >= 0)
        # stationarity (3a): τ·log u + λ·u = r − r̄, from the log-space ratio (u can underflow)
        log_u, lam2 = tb._pmd_mean_log_u(pi, r, tau)
        assert lam2 == lam
        np.testing.assert_allclose(tau * log_u + lam * np.exp(log_u), r - pi @ r, atol=1e-11)


@pytest.mark.parametrize("tau", TAUS)
def test_population_update_is_the_kl_chi2_step(tau):
    rng = np.random.default_rng(1)
    for pi, r in _cases():
        new, lam = tb.pmd_mean_population_update(pi, r, tau)
        ref = tb.kl_chi2_update(pi, r, tau, lam)                           # no Lambert W inside
        np.testing.assert_allclose(new, ref, atol=1e-11)
        # and it really is the maximiser of (4): no nearby point of the simplex does better
        best = kl_chi2_objective(new, pi, r, tau, lam)
        for eps in (1e-4, 1e-2, 0.2):
            for _ in range(20):
                other = (1 - eps) * new + eps * rng.dirichlet(np.ones(len(pi)))
                assert kl_chi2_objective(other, pi, r, tau, lam) <= best + 1e-12


@pytest.mark.parametrize("tau", TAUS)
def test_lambda_is_tau_times_kl(tau):
    for pi, r in _cases():
        new, lam = tb.pmd_mean_population_update(pi, r, tau)
        tkl = tau * np.sum(pi * (np.log(pi) - np.log(new)))
        assert lam == pytest.approx(tkl, rel=1e-9)                        # (3b)


def test_population_update_minimises_the_regression_objective():
    """Brute force on two arms: minimise E_{π_t}[(r − r̄ − τ·log(π/π_t))²] over p′ by golden section."""
    for tau in (1.0, 0.1, 0.02):
        for p in (0.01, 0.2, 0.7):
            pi, r = np.array([p, 1 - p]), np.array([1.0, 0.0])
            rbar = p

            def f(logit):
                # log q and log(1 − q) for q = sigmoid(logit), without forming 1 − q
                log_q, log_1mq = -np.logaddexp(0, -logit), -np.logaddexp(0, logit)
                return (p * (1 - rbar - tau * (log_q - math.log(p))) ** 2
                        + (1 - p) * (0 - rbar - tau * (log_1mq - math.log(1 - p))) ** 2)

            lo, hi = -40.0, 40.0
            g = (math.sqrt(5) - 1) / 2
            for _ in range(200):
                a, b = hi - g * (hi - lo), lo + g * (hi - lo)
                if f(a) < f(b):
                    hi = b
                else:
                    lo = a
            q_ref = 1 / (1 + math.exp(-(lo + hi) / 2))
            new, _ = tb.pmd_mean_population_update(pi, r, tau)
            assert new[0] == pytest.approx(q_ref, abs=1e-7)


def test_exact_pmd_against_direct_formula_and_small_tau():
    pi, r = tb.PI_T, tb.R_GRADED
    for tau in (2.0, 0.5):
        direct = pi * np.exp(r / tau) / np.sum(pi * np.exp(r / tau))
        np.testing.assert_allclose(tb.pmd_exact_update(pi, r, tau), direct, rtol=1e-13)
    tiny = tb.pmd_exact_update(pi, r, 1e-4)                                # e^{1/τ} would overflow
    assert np.all(np.isfinite(tiny)) and tiny[0] == pytest.approx(1.0)


def test_large_tau_both_updates_agree():
    pi, r = tb.PI_T, tb.R_GRADED
    ratios = []
    for tau in (10.0, 100.0, 1000.0):
        exact = tb.pmd_exact_update(pi, r, tau)
        mean, _ = tb.pmd_mean_population_update(pi, r, tau)
        move = tb.tv(exact, pi)                                            # O(1/τ)
        gap = tb.tv(exact, mean)                                           # O(1/τ²)
        ratios.append(gap / move)
    assert ratios[2] < 1e-3
    # relative to the step itself, the gap shrinks like 1/τ
    assert ratios[0] > 5 * ratios[1] > 25 * ratios[2]


def test_constant_rewards_leave_policy_unchanged():
    new, lam = tb.pmd_mean_population_update(tb.PI_T, np.full(6, 0.4), 0.1)
    assert lam == 0.0
    np.testing.assert_allclose(new, tb.PI_T)


def test_binary_pmd_mean_never_beats_exact_pmd():
    for tau in (10.0, 1.0, 0.3, 0.1, 0.03, 0.01):
        for p in np.logspace(-4, math.log10(0.999), 40):
            pe, pm_, lam = tb.binary_update(p, tau)
            assert p <= pm_ <= pe + 1e-12
            assert lam > 0


def test_binary_numbers_from_the_independent_derivation():
    # τ = 0.1: p = 0.01 → 0.9955 vs 0.260; p = 0.1 → 0.9996 vs 0.746; p = 0.5 → 1.0 vs 0.997
    for p, pe_ref, pm_ref in ((0.01, 0.9955, 0.260), (0.1, 0.9996, 0.746), (0.5, 1.0, 0.997)):
        pe, pm_, _ = tb.binary_update(p, 0.1)
        assert pe == pytest.approx(pe_ref, abs=5e-5)
        assert pm_ == pytest.approx(pm_ref, abs=5e-4)


def test_tensor_in_tensor_out():
    pi, r = torch.tensor(tb.PI_T), torch.tensor(tb.R_GRADED)
    new, lam = tb.pmd_mean_population_update(pi, r, 0.1)
    assert isinstance(new, torch.Tensor)
    np.testing.assert_allclose(new.numpy(), tb.pmd_mean_population_update(tb.PI_T, tb.R_GRADED, 0.1)[0])
    assert isinstance(tb.pmd_exact_update(pi, r, 0.1), torch.Tensor)
    assert isinstance(tb.kl_chi2_update(pi, r, 0.1, lam), torch.Tensor)
    with_len, _ = tb.pmd_mean_population_update(pi, r, 0.1, lengths=torch.arange(1.0, 7.0))
    assert isinstance(with_len, torch.Tensor)


def test_any_baseline_below_log_z_gives_the_kl_chi2_step_on_the_bandit():
    # pmd_mean.py section 9's population claim: the regression (2) with a fixed baseline b ≤ τ·log Z_t has the
    # Lambert-W solution with r − b in place of r − r̄, which is the KL–χ² step at its λ, with
    # λ = τ·KL(π_t‖π_{t+1}) − (b − r̄) (take E_{π_t} of τ·log u + λ·u = r − b). Limits: b = r̄ is
    # PMD-mean, b = τ·log Z_t exact PMD.
    tau, pi, r = 0.1, tb.PI_T, tb.R_BINARY
    mean_b, part_b = tb.population_baseline(pi, r, tau, "mean"), tb.population_baseline(pi, r, tau, "partition")
    assert part_b == pytest.approx(tau * math.log(pi @ np.exp(r / tau)))
    for tau_b in (0.1, 0.2, 0.3, 1.0, 1e6):
        b = tb.population_baseline(pi, r, tau, "tempered", tau_b)
        assert mean_b - 1e-9 <= b <= part_b + 1e-12
        new, lam = tb.pmd_mean_population_update(pi, r, tau, b)
        assert new.sum() == pytest.approx(1.0, abs=1e-12)
        assert lam == pytest.approx(tau * tb.kl(pi, new) - (b - mean_b), abs=1e-9)
        assert np.abs(new - tb.kl_chi2_update(pi, r, tau, lam)).max() < 1e-9
    at_tau = tb.pmd_mean_population_update(pi, r, tau, tb.population_baseline(pi, r, tau, "tempered", tau))[0]
    assert np.abs(at_tau - tb.pmd_exact_update(pi, r, tau)).max() < 1e-9
    far = tb.pmd_mean_population_update(pi, r, tau, tb.population_baseline(pi, r, tau, "tempered", 1e6))[0]
    assert np.abs(far - tb.pmd_mean_population_update(pi, r, tau)[0]).max() < 1e-5


# -----------------------------------------------------------------------------
# Unequal lengths: (5), (5a), (5b) and the length-weighted KL–χ² step


def test_length_weighted_step_is_the_minimiser_of_the_loss_we_run():
    # The reference never sees a closed form: Newton on softmax logits of E_{π_t}[pmd_loss], the real
    # loss (5) with its 1/|y|. (3), which ignores the lengths, must miss it by far in some case.
    worst_blind = 0.0
    for pi, r, lengths, tau in random_length_cases(seed=4):
        ref = minimise_on_simplex(population_loss(pi, r, tau, lengths, pi @ r), pi)
        new, lam = tb.pmd_mean_population_update(pi, r, tau, lengths=lengths)
        assert lam > 0
        np.testing.assert_allclose(new, ref, atol=1e-9)
        worst_blind = max(worst_blind, np.abs(tb.pmd_mean_population_update(pi, r, tau)[0] - ref).max())
    assert worst_blind > 0.1


def test_length_weighted_step_is_stationary_and_stable_for_small_tau_and_long_responses():
    for pi, r in _cases():
        lengths = np.geomspace(1, 1e4, len(pi))                            # up to 10⁴ tokens
        for tau in (1.0, 0.01, 0.001):
            log_u, lam = tb._pmd_mean_log_u(pi, r, tau, lengths=lengths)
            assert lam > 0 and np.all(np.isfinite(log_u))
            assert pi @ np.exp(log_u) == pytest.approx(1.0, abs=1e-12)
            # (5a): τ·log u + λ·|y|·u = r − r̄
            np.testing.assert_allclose(tau * log_u + lam * lengths * np.exp(log_u), r - pi @ r, atol=1e-11)


def test_no_lengths_is_any_constant_length_and_todays_step():
    for pi, r in _cases():
        for tau in (1.0, 0.1, 0.01):
            new, lam = tb.pmd_mean_population_update(pi, r, tau)
            one, lam1 = tb.pmd_mean_population_update(pi, r, tau, lengths=np.ones(len(pi)))
            assert np.array_equal(one, new) and lam1 == lam                # bit for bit
            for c in (3.0, 17.5):
                const, lam_c = tb.pmd_mean_population_update(pi, r, tau, lengths=np.full(len(pi), c))
                np.testing.assert_allclose(const, new, atol=1e-12)
                assert lam_c == pytest.approx(lam / c, rel=1e-9)           # λ·|y| is what (3) calls λ
    # the step as it was before lengths existed, to the last bit (values printed by the earlier code)
    todays = ((tb.R_GRADED, 0.1, None, [0.12558217818107137, 0.22560548646956904, 0.37350099615343785,
                                        0.18244100491948023, 0.058564268970251666, 0.034306065306190084],
               0.09448429719854563),
              (tb.R_BINARY, 0.01, None, [0.2854733721065949, 0.7136834302664873, 0.00011786633494564523,
                                         0.00018133282299330036, 0.00022666602874162544, 0.0003173324402382756],
               0.06329247652747935),
              (tb.R_GRADED, 0.1, 0.37439963999410525, [0.20053094716087072, 0.3089618349397217,
                                                       0.38559677586797303, 0.08102021657208312,
                                                       0.0156855845898131, 0.008204640869538628],
               0.03940306815264888))
    for r, tau, b, pi_ref, lam_ref in todays:
        new, lam = tb.pmd_mean_population_update(tb.PI_T, r, tau, b)
        assert new.tolist() == pi_ref and lam == lam_ref


def test_length_weighted_step_maximises_kl_chi2_with_a_token_cost():
    # (5b) = argmax E_π[r − λ·|y|] − τ·KL(π‖π_t) − (λ/2)·χ²_|y|(π‖π_t): checked against the brute-force
    # maximiser, against kl_chi2_update (no W inside), and against perturbations on the simplex.
    rng = np.random.default_rng(5)
    naive_beaten = 0
    for pi, r, lengths, tau in random_length_cases(seed=6, n_cases=9):
        new, lam = tb.pmd_mean_population_update(pi, r, tau, lengths=lengths)
        pi_t, rr, ell = (torch.tensor(a, dtype=torch.float64) for a in (pi, r, lengths))

        def neg_objective(logp):
            q = logp.exp()                                                 # (N,)
            chi2_len = torch.sum(pi_t * ell * (q / pi_t - 1) ** 2)
            return -(q @ rr - lam * (q @ ell) - tau * torch.sum(q * (logp - pi_t.log())) - 0.5 * lam * chi2_len)

        np.testing.assert_allclose(new, minimise_on_simplex(neg_objective, pi), atol=1e-9)
        np.testing.assert_allclose(new, tb.kl_chi2_update(pi, r, tau, lam, lengths), atol=1e-11)
        best = kl_chi2_objective(new, pi, r, tau, lam, lengths)
        for eps in (1e-4, 1e-2, 0.2):
            for _ in range(20):
                other = (1 - eps) * new + eps * rng.dirichlet(np.ones(len(pi)))
                assert kl_chi2_objective(other, pi, r, tau, lam, lengths) <= best + 1e-12
                # without the token cost (χ²_|y| alone) (5b) is not the maximiser: some point beats it
                naive = other @ r - tau * tb.kl(other, pi) - 0.5 * lam * chi2(other, pi, lengths)
                naive_beaten += naive > new @ r - tau * tb.kl(new, pi) - 0.5 * lam * chi2(new, pi, lengths) + 1e-12
    assert naive_beaten > 0


def test_worked_example_short_and_long_successes():
    # 4 arms, r = (1, 1, 0, 0), |y| = (2, 20, 2, 20), π_t = (0.05, 0.15, 0.3, 0.5), b = r̄
    pi, r, lengths = tb.LENGTH_PI, tb.LENGTH_R, tb.LENGTH_LEN
    new, _ = tb.pmd_mean_population_update(pi, r, 0.1, lengths=lengths)
    blind, _ = tb.pmd_mean_population_update(pi, r, 0.1)
    assert (round(new[0], 3), round(new[1], 3)) == (0.649, 0.266)          # (5b): the short success wins
    assert (round(blind[0], 3), round(blind[1], 3)) == (0.227, 0.681)      # (3) keeps the 1 : 3 ratio
    new1, _ = tb.pmd_mean_population_update(pi, r, 1.0, lengths=lengths)
    blind1, _ = tb.pmd_mean_population_update(pi, r, 1.0)
    assert round(np.abs(new1 - blind1).max(), 3) == 0.015


def test_lambda_identity_with_lengths_and_any_baseline():
    # E_{π_t} of (5a): λ·E_{π_{t+1}}[|y|] = τ·KL(π_t‖π_{t+1}) − (b − r̄)
    for pi, r, lengths, tau in random_length_cases(seed=7):
        rbar = pi @ r
        for b in (rbar, tb.population_baseline(pi, r, tau, "tempered", 3 * tau)):
            new, lam = tb.pmd_mean_population_update(pi, r, tau, b, lengths)
            assert lam * (new @ lengths) == pytest.approx(tau * tb.kl(pi, new) - (b - rbar), rel=1e-9, abs=1e-13)


def test_fit_exact_expectation_with_lengths_lands_on_the_length_weighted_step():
    # part E's "GD on (5)" column: the script's own gradient descent on pmd_loss, real lengths
    for tau in (0.1, 1.0):
        fit = tb.fit_exact_expectation(tb.LENGTH_PI, tb.LENGTH_R, tau, "mean", 2000, tb.LENGTH_LEN)
        target, _ = tb.pmd_mean_population_update(tb.LENGTH_PI, tb.LENGTH_R, tau, lengths=tb.LENGTH_LEN)
        assert np.abs(fit - target).max() < 1e-8


# -----------------------------------------------------------------------------
# The real loss


def test_weights_give_the_expected_loss_with_real_lengths():
    """The trick in fit_exact_expectation: weights N·π_t turn pmd_loss's mean into E_{π_t}[L], L = (5)."""
    rng = np.random.default_rng(2)
    pi = torch.tensor(rng.dirichlet(np.ones(7)))
    logp, logp_old, adv = (torch.tensor(rng.normal(size=7)) for _ in range(3))
    lengths = torch.tensor(rng.integers(1, 30, 7), dtype=torch.float64)
    for ell in (torch.ones(7, dtype=torch.float64), lengths):
        expected = sum(pi[i] * pm.pmd_loss(logp[i:i + 1], logp_old[i:i + 1], adv[i:i + 1], 0.3, ell[i:i + 1])
                       for i in range(7))
        got = pm.pmd_loss(logp, logp_old, adv, 0.3, ell, 7 * pi)
        assert float(got) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("tau", (1.0, 0.1, 0.01))
def test_gradient_descent_on_pmd_loss_lands_on_closed_form(tau):
    rng = np.random.default_rng(3)
    cases = [(tb.PI_T, tb.R_GRADED), (rng.dirichlet(np.ones(5) * 2), rng.uniform(0, 1, 5))]
    for pi, r in cases:
        fit = tb.fit_exact_expectation(pi, r, tau, "mean")
        assert tb.tv(fit, tb.pmd_mean_population_update(pi, r, tau)[0]) < 1e-4
        fit = tb.fit_exact_expectation(pi, r, tau, "partition")
        assert tb.tv(fit, tb.pmd_exact_update(pi, r, tau)) < 1e-4


def test_sampled_fit_approaches_population_target_with_many_samples():
    gen = torch.Generator().manual_seed(0)
    pis = np.tile(tb.PI_T, (32, 1))                                        # (S, N)
    target = tb.pmd_mean_population_update(tb.PI_T, tb.R_GRADED, 1.0)[0]
    errs = {}
    for K in (4, 256):
        fit, b, idx = tb.fit_sampled(pis, tb.R_GRADED, 1.0, "mean", K, gen)
        assert fit.shape == (32, 6) and b.shape == idx.shape == (32, K)
        np.testing.assert_allclose(fit.sum(1), 1.0)
        errs[K] = tb.tv(fit, target).mean()
    assert errs[256] < 0.02 < errs[4]


# -----------------------------------------------------------------------------
# The script: bad input, both figures, and no transformers


@pytest.mark.parametrize("argv,needle", [(["--out", "/proc/x"], "--out /proc/x"), (["--seeds", "0"], "--seeds"),
                                         (["--seeds", "100000000"], "--seeds must be between"),
                                         (["--seed", "-1"], "--seed"), (["--seeds", "1e3"], "invalid int")])
def test_toy_bandit_bad_input_exits_2_with_one_sentence(argv, needle, capsys):
    assert tb.main(argv) == 2                                              # at once, before the work
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err


def test_script_writes_both_figures(tmp_path, monkeypatch, capsys):
    # 5 gradient steps per sampled fit instead of 500 (undone after the test): the figures, not the
    # sampled numbers, are under test, and the run takes seconds instead of half a minute
    monkeypatch.setattr(tb, "FIT_STEPS_SAMPLED", 5)
    assert tb.main(["--out", str(tmp_path), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "== E. Unequal lengths" in out
    for name in ("toy_bandit.png", "chi2_cap.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_toy_bandit_runs_without_transformers():
    # The bandit needs numpy, torch and pmd_mean's math only: with transformers unimportable, the script
    # still imports and runs (5 gradient steps per sampled fit, in the child process only, for speed).
    code = ("import sys; sys.modules['transformers'] = None; import toy_bandit as tb; "
            "tb.FIT_STEPS_SAMPLED = 5; sys.exit(tb.main(['--no-plot', '--seeds', '4']))")
    res = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "== H. Beyond the paper" in res.stdout and "done in" in res.stdout
