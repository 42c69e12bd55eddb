"""
toy_bandit.py: PMD-mean's implicit KL–χ² regulariser, seen exactly on a bandit and with the real loss.

    python toy_bandit.py                       # tables on stdout + toy_bandit.png here (~35 s, CPU)
    python toy_bandit.py --out /tmp --no-plot  # tables only

One prompt, N arms (think: N possible responses), reward r(y) ∈ [0, 1], current policy π_t. Sampling
and sequence log-probs, the expensive parts of an LLM, are array lookups here, so the update that the
paper (arXiv 2602.05933) analyses can be computed exactly and set against what `pmd_mean.pmd_loss`, the
loss the LLM trainer uses, actually does.

Symbols and shapes
------------------
    N   arms (responses), 6 here         K   samples per iteration (the group size in pmd_mean.py)
    S   independent seeds, run side by side as the P "prompts" of pmd_mean.compute_baseline
    π_t current policy (N,)              u   = π_{t+1}/π_t, the likelihood ratio (N,)
    r̄   = E_{π_t}[r]                     Z_t = E_{π_t}[e^{r/τ}]
    λ   PMD-mean's χ² weight             θ   logits of a tabular softmax policy, (N,) or (S, N)

The math, in the order the output follows it
--------------------------------------------
1. Exact PMD, argmax_π E_π[r] − τ·KL(π‖π_t), has the closed form π_{t+1} = π_t·e^{r/τ}/Z_t.

2. PMD-mean at the population level minimises, over normalised π,

       E_{π_t}[(r − r̄ − τ·log u)²]     subject to  Σ_y π_t(y)·u(y) = 1.

   With a multiplier μ for the constraint, the derivative in u(y) is
   π_t(y)·[−2τ·(r − r̄ − τ·log u)/u + μ] = 0, i.e. r − r̄ − τ·log u = λ·u with λ = μ/(2τ):

       τ·log u + λ·u = r − r̄.                                                              (S)

   Put v = (λ/τ)·u: log v + v = log(λ/τ) + (r − r̄)/τ, so v·e^v = (λ/τ)·e^{(r−r̄)/τ} and

       π_{t+1} = π_t·(τ/λ)·W₀((λ/τ)·e^{(r − r̄)/τ}),                                          (W)

   W₀ the principal Lambert W, λ the one scalar that makes Σ π_{t+1} = 1. Taking E_{π_t} of (S),
   with E_{π_t}[u] = 1 and E_{π_t}[r − r̄] = 0, gives τ·E_{π_t}[log u] + λ = 0:

       λ = τ·KL(π_t ‖ π_{t+1})  > 0.                                                        (λ)

3. The equivalence. argmax_π E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t), with χ² = Σ π²/π_t − 1, is a
   strictly concave problem whose stationarity condition is r − τ·(log u + 1) − λ·u + ν = 0: again
   τ·log u + λ·u = r + const, the constant fixed by normalisation. At the λ of (W) the two problems
   therefore have the same solution: PMD-mean is mirror descent with the regulariser τ·KL + (λ/2)·χ².
   `kl_chi2_update` solves the KL–χ² problem without Lambert W (bisection on the normaliser, Newton
   per arm) and the script prints the largest difference.

4. Binary rewards: u depends on an arm only through its reward, so any number of arms reduces to two
   (success with mass p, failure with 1 − p). From (S), a success has τ·log u + λ·u = 1 − p: when
   p is small and τ is small exact PMD moves nearly all mass to the success (p′ → 1), while PMD-mean
   is held back by the λ·u term.

5. The real loss. A tabular softmax policy is fitted by gradient descent on `pmd_mean.pmd_loss`:
   (a) with exact expectations over arms it lands on (W) (and, with the log-partition baseline, on
   exact PMD); (b) with K sampled responses and `pmd_mean.compute_baseline`, as an LLM would.

6. Finite samples: over S seeds, the noise and bias of each baseline's regression targets, the
   fitted policy's distance from its own population target, and multi-iteration learning curves.

7. Beyond the paper (pmd_mean.py's docstring, section 9). (S) with any baseline b in place of r̄
   gives (W) with r − b, and taking E_{π_t} gives λ = τ·KL(π_t‖π_{t+1}) − (b − r̄) ≥ 0 for
   b ≤ τ·log Z_t. The tempered baseline (τ_b·log E e^{r/τ_b}, between r̄ and τ·log Z_t) and the
   corrected one (τ·log Z_t in the limit) are set against the three above: one step at p = 0.01,
   0.1, 0.5, the bias of their targets, and the reward after 12 iterations, all leave-one-out.

Departures from the paper and from pmd_mean.py (read these before quoting a number)
-----------------------------------------------------------------------------------
  1. A tabular softmax policy over N arms stands in for the LLM: log π(y) is one log-softmax entry,
     so every response has length 1 (pmd_loss gets lengths = 1 in the sampled runs).
  2. "Exact expectations" (5a) is the population loss E_{π_t}[L], which an LLM never sees. We get it
     from one pmd_loss call by passing each arm the "length" 1/(N·π_t(y)): the loss divides by
     length, so its plain mean over the N arms becomes the π_t-weighted sum.
  3. Each regression is plain full-batch gradient descent from θ_t for a fixed number of steps
     (2000 exact, 500 sampled), not 1–2 AdamW steps per batch as in train_math.py: we look at what
     the loss converges to, not at an optimiser's first steps. Sampled results depend on this
     budget (see 4): the K = 8 learning curves end (iteration 12, 400 seeds) at E[r] = 0.77, 0.76,
     0.70, 0.68 for sampled PMD-mean with 50, 100, 500, 1000 steps, and at 0.78–0.79 for PMD-part.
  4. With K samples the loss does not pin down the arms that were not sampled: they enter only
     through the softmax normaliser, so the minimiser is not unique, and when the sampled targets ask
     for more than the total mass, gradient descent keeps draining the unsampled arms. An LLM is in
     the same position (almost every response goes unsampled); here it is easy to see.
  5. The sampled runs (5b, learning curves) use the plain group baselines (leave_one_out=False), the
     form the paper analyses; pmd_mean.py defaults to leave-one-out, shown as extra rows in 6.
  6. W₀ is computed by Newton's method on log W(e^z) and λ by bisection on log λ; both are written
     here (no scipy) and checked in the tests.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

import pmd_mean

torch.set_num_threads(1)  # tensors here have a few hundred entries: threads only add overhead


# -----------------------------------------------------------------------------
# numpy in, numpy out; tensor in, tensor out (all the math runs in float64 numpy)


def _as_numpy(x):
    """Return (float64 array, function that turns an array back into x's kind)."""
    if isinstance(x, torch.Tensor):
        dtype, device = x.dtype, x.device
        back_dtype = dtype if dtype.is_floating_point else torch.float64
        return (x.detach().cpu().double().numpy(),
                lambda a: torch.as_tensor(a, dtype=back_dtype, device=device))
    return np.asarray(x, dtype=np.float64), lambda a: a


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p‖q) = Σ p·log(p/q), with 0·log 0 = 0."""
    m = p > 0
    return float(np.sum(p[m] * (np.log(p[m]) - np.log(q[m]))))


def chi2(p: np.ndarray, q: np.ndarray) -> float:
    """χ²(p‖q) = Σ p²/q − 1."""
    return float(np.sum(p * p / q) - 1.0)


def tv(p, q) -> np.ndarray:
    """Total variation ½·Σ|p − q| over the last axis."""
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum(-1)


# -----------------------------------------------------------------------------
# Lambert W₀, without scipy


def _log_w_of_exp(z: np.ndarray) -> np.ndarray:
    """s = log W₀(e^z) for any real z, elementwise; never forms e^z, so z = 10⁴ is fine.

    w = W(e^z) solves w·e^w = e^z, i.e. w + log w = z; with s = log w:  e^s + s = z.
    h(s) = e^s + s − z is increasing and convex, so Newton from a point where h ≥ 0 decreases
    monotonically to the root. s₀ = min(z, max(0, log z)) is such a point:
      s₀ = z:        h = e^z > 0;
      s₀ = log z ≥ 0: h = log z ≥ 0;
      s₀ = 0 (0<z<1): h = 1 − z > 0.
    and it is already close (W(x) ≈ x for small x, W(x) ≈ log x for large x).
    """
    z = np.asarray(z, dtype=np.float64)
    s = np.minimum(z, np.maximum(0.0, np.log(np.maximum(z, 1e-300))))
    for _ in range(100):
        es = np.exp(s)
        # Newton step on h(s) = e^s + s − z,  h'(s) = e^s + 1
        step = (es + s - z) / (es + 1.0)
        s = s - step
        if np.all(np.abs(step) <= 1e-15 * np.maximum(1.0, np.abs(s))):
            break
    return s


def lambert_w(x):
    """Principal branch W₀(x) for x ≥ −1/e (nan below), elementwise; numpy array or torch tensor.

    x > 0 goes through _log_w_of_exp(log x) (stable for huge x). −1/e ≤ x ≤ 0 uses Halley's method
    on f(w) = w·e^w − x from the branch-point series w ≈ −1 + p − p²/3 + 11p³/72, p = √(2(e·x + 1)).
    """
    x0, back = _as_numpy(x)
    xn = np.atleast_1d(x0)                                                 # (n,)
    w = np.full(xn.shape, np.nan)
    pos = xn > 0
    w[pos] = np.exp(_log_w_of_exp(np.log(xn[pos])))
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


# -----------------------------------------------------------------------------
# The three closed forms: exact PMD, population PMD-mean, and the KL–χ² step


def pmd_exact_update(pi, r, tau: float):
    """Exact PMD: π_{t+1} = π_t·e^{r/τ}/Z_t, computed in log space (stable for τ → 0)."""
    p, back = _as_numpy(pi)
    rn, _ = _as_numpy(r)
    # log π_{t+1} = log π_t + r/τ − log Σ π_t·e^{r/τ}
    with np.errstate(divide="ignore"):  # an arm with π_t = 0 stays at 0
        logits = np.log(p) + rn / tau                                      # (N,)
    m = logits.max()
    log_z = m + np.log(np.sum(np.exp(logits - m)))
    return back(np.exp(logits - log_z))


def _pmd_mean_log_u(p: np.ndarray, r: np.ndarray, tau: float, b: float | None = None) -> tuple[np.ndarray, float]:
    """log u = log(π_{t+1}/π_t) of (W), and λ. Works in log space so small τ never overflows.

    b is the baseline, r̄ = E_{π_t}[r] by default (PMD-mean). Any b ≤ τ·log Z_t gives the same
    Lambert-W form with r − b in place of r − r̄ (section 7); b = τ·log Z_t gives λ = 0, exact PMD."""
    b = p @ r if b is None else b
    # d = (r − b)/τ
    d = (r - b) / tau                                                      # (N,)
    if np.max(r) - np.min(r) < 1e-13:  # all rewards equal: nothing to learn, u = 1, λ = 0
        return np.zeros_like(p), 0.0
    # Σ π_t·e^d = e^{(τ·log Z_t − b)/τ}: at or below 1 the baseline is τ·log Z_t (or above it, which
    # no normalised u fits with λ ≥ 0), and the step is exact PMD's
    with np.errstate(divide="ignore"):                                     # an arm with π_t = 0 stays at 0
        log_mass_at_0 = _log_sum_exp(np.log(p) + d)                        # log Σ π_t·e^d
    if log_mass_at_0 <= 1e-12:
        return d - log_mass_at_0, 0.0                                      # log u of exact PMD (λ = 0)

    def log_u_at(a):
        # a = log(λ/τ):  log u = log W(e^{a + d}) − a           (from (W): u = (τ/λ)·W((λ/τ)·e^d))
        return _log_w_of_exp(a + d) - a                                    # (N,)

    def log_mass(a):
        # log Σ π_t·u, strictly decreasing in λ (from (S): (τ/u + λ)·du = −u·dλ); 0 at the answer
        lu = log_u_at(a)
        m = lu.max()
        return m + np.log(p @ np.exp(lu - m))

    # As λ → 0, u → e^d and Σ π_t·e^d > 1 (checked above; Jensen for b = r̄); as λ → ∞, u → 0.
    lo, hi = -40.0, 10.0
    while log_mass(lo) < 0:
        lo -= 40.0
    while log_mass(hi) > 0:
        hi += 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if log_mass(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(mid)):
            break
    a = 0.5 * (lo + hi)
    return log_u_at(a), tau * math.exp(a)


def _log_sum_exp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.sum(np.exp(x - m))))


def pmd_mean_population_update(pi, r, tau: float, b: float | None = None):
    """PMD-mean's population step (W), or with baseline b the same regression's. Returns (π_{t+1}, λ);
    for b = r̄, λ = τ·KL(π_t‖π_{t+1})."""
    p, back = _as_numpy(pi)
    rn, _ = _as_numpy(r)
    log_u, lam = _pmd_mean_log_u(p, rn, tau, b)
    return back(p * np.exp(log_u)), lam


def population_baseline(pi: np.ndarray, r: np.ndarray, tau: float, kind: str,
                        baseline_tau: float | None = None) -> float:
    """The K → ∞ limit of pmd_mean.compute_baseline: r̄ (mean), τ·log Z_t (partition, and corrected,
    whose correction is O(1/K)), τ_b·log E_{π_t}[e^{r/τ_b}] (tempered)."""
    t = {"mean": None, "partition": tau, "corrected": tau, "tempered": baseline_tau}[kind]
    with np.errstate(divide="ignore"):
        return float(pi @ r) if t is None else t * _log_sum_exp(np.log(pi) + r / t)


def kl_chi2_update(pi, r, tau: float, lam: float):
    """argmax_π E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t), solved without Lambert W.

    The objective is strictly concave on the simplex, so its maximiser is the unique point where
        r − τ·(log u + 1) − λ·u + ν = 0,   u = π/π_t,  Σ π = 1.
    For a fixed c (= ν − τ) each arm's equation τ·v + λ·e^v = r + c (v = log u) has one root, found
    by Newton from the right (the left side is convex and increasing in v); c is then bisected until
    Σ π_t·e^v = 1. u_i ≤ 1 exactly when c ≤ λ − r_i, so c ∈ [λ − max r, λ − min r].
    """
    p, back = _as_numpy(pi)
    rn, _ = _as_numpy(r)
    if lam <= 0:  # pure KL: the exact PMD step
        return back(_as_numpy(pmd_exact_update(p, rn, tau))[0])

    def log_u_at(c):
        rhs = rn + c                                                       # (N,)
        # start where h(v) = τ·v + λ·e^v − rhs ≥ 0 (same argument as in _log_w_of_exp)
        v = np.minimum(rhs / tau, np.maximum(0.0, np.log(np.maximum(rhs, 1e-300) / lam)))
        for _ in range(200):
            ev = lam * np.exp(v)
            step = (tau * v + ev - rhs) / (tau + ev)
            v = v - step
            if np.all(np.abs(step) <= 1e-15 * np.maximum(1.0, np.abs(v))):
                break
        return v

    lo, hi = lam - rn.max(), lam - rn.min()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if p @ np.exp(log_u_at(mid)) > 1.0:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 4e-16 * max(1.0, abs(mid)):
            break
    return back(p * np.exp(log_u_at(0.5 * (lo + hi))))


def kl_chi2_objective(pi_new, pi, r, tau: float, lam: float) -> float:
    """E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t), for checking that a point is the maximiser."""
    return float(pi_new @ r - tau * kl(pi_new, pi) - 0.5 * lam * chi2(pi_new, pi))


def binary_update(p: float, tau: float) -> tuple[float, float, float]:
    """Binary rewards, success probability p: (p′ exact, p′ PMD-mean, λ).

    u depends on an arm only through its reward, so N arms collapse to two: success (mass p, r = 1)
    and failure (mass 1 − p, r = 0).
    """
    pi, r = np.array([p, 1.0 - p]), np.array([1.0, 0.0])
    pm, lam = pmd_mean_population_update(pi, r, tau)
    return float(pmd_exact_update(pi, r, tau)[0]), float(pm[0]), lam


# -----------------------------------------------------------------------------
# The real loss: fit a tabular softmax policy with pmd_mean.pmd_loss


def fit_exact_expectation(pi: np.ndarray, r: np.ndarray, tau: float, kind: str,
                          steps: int = 2000) -> np.ndarray:
    """Minimise E_{y~π_t}[pmd_loss] over logits θ by gradient descent, expectations exact.

    b = r̄ (kind "mean") or τ·log Z_t (kind "partition"): the K → ∞ limits of compute_baseline.
    The softmax family covers every interior point of the simplex, so the minimiser over θ is the
    minimiser over normalised π: (W) for "mean", exact PMD for "partition". Returns π_θ, (N,).
    """
    pi_t = torch.tensor(pi, dtype=torch.float64)                           # (N,)
    rr = torch.tensor(r, dtype=torch.float64)                              # (N,)
    logp_old = pi_t.log()                                                  # (N,)
    if kind == "mean":
        b = pi_t @ rr                                                      # r̄
    else:
        b = tau * torch.logsumexp(logp_old + rr / tau, 0)                  # τ·log Z_t
    adv = rr - b                                                           # (N,) A = r − b
    # pmd_loss returns mean_y L(y)/|y|. Giving response y the "length" 1/(N·π_t(y)) turns that plain
    # mean into Σ_y π_t(y)·L(y) = E_{π_t}[L]: the loss of a batch in which every arm appears exactly
    # in proportion to π_t (departure 2). The lengths here are importance weights, nothing more.
    weights_as_lengths = 1.0 / (len(pi) * pi_t)                            # (N,)
    # Step size. In log π the squared residual has curvature τ·π_t(y); the softmax normaliser adds
    # Σ_y π_t(y)·(A − τ·Δ), which at PMD-mean's fixed point is exactly λ, and λ ≤ max A⁺ by (S) at the
    # arm with the largest u (u ≥ 1 there). lr = 1/(τ + max A⁺) kept plain gradient descent stable
    # for every τ we tried; lr = 1/τ never converged at τ = 0.01 for PMD-mean, where λ ≈ 10·τ.
    lr = 1.0 / (tau + float(adv.max().clamp(min=0)))
    theta = logp_old.clone().requires_grad_(True)                          # (N,) start at π_θ = π_t
    for _ in range(steps):
        logp = torch.log_softmax(theta, 0)                                 # (N,)
        loss = pmd_mean.pmd_loss(logp, logp_old, adv, tau, weights_as_lengths)
        (g,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * g
    return torch.softmax(theta.detach(), 0).numpy()


def fit_sampled(pi: np.ndarray, r: np.ndarray, tau: float, kind: str, K: int, gen: torch.Generator,
                leave_one_out: bool = False, steps: int = 500, baseline_tau: float | None = None):
    """One PMD iteration from K samples, for S seeds at once (each seed is one "prompt").

    The LLM recipe on a tiny policy: sample K responses from π_t, baseline them with
    pmd_mean.compute_baseline, minimise pmd_mean.pmd_loss over θ by gradient descent from θ_t.
    pi: (S, N) or (N,). Returns π_fit (S, N), baselines b (S, K), sampled arms (S, K).
    """
    pi_t = torch.tensor(np.atleast_2d(pi), dtype=torch.float64)           # (S, N)
    S = pi_t.shape[0]
    rr = torch.tensor(r, dtype=torch.float64)                              # (N,)
    idx = torch.multinomial(pi_t, K, replacement=True, generator=gen)      # (S, K) sampled arms
    rewards = rr[idx]                                                      # (S, K)
    b = pmd_mean.compute_baseline(rewards, tau, kind, leave_one_out, baseline_tau)  # (S, K)
    # A = r − b; the loss asks each sampled response's log-ratio Δ to equal A/τ
    adv = (rewards - b).reshape(-1)                                        # (B,) = (S·K,)
    logp_old = pi_t.log().gather(1, idx).reshape(-1)                       # (B,)
    ones = torch.ones(S * K, dtype=torch.float64)                          # (B,) every response has length 1
    theta = pi_t.log().clone().requires_grad_(True)                        # (S, N)
    # same step-size rule as fit_exact_expectation, per seed
    lr = 1.0 / (tau + adv.reshape(S, K).max(1, keepdim=True).values.clamp(min=0))  # (S, 1)
    for _ in range(steps):
        logp = torch.log_softmax(theta, 1).gather(1, idx).reshape(-1)      # (B,)
        # pmd_loss averages over all S·K responses; ×S makes each seed's gradient its own K-mean
        loss = S * pmd_mean.pmd_loss(logp, logp_old, adv, tau, ones)
        (g,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= lr * g
    return torch.softmax(theta.detach(), 1).numpy(), b.numpy(), idx.numpy()


# -----------------------------------------------------------------------------
# The bandit used throughout: six arms, the good ones rare under π_t

R_GRADED = np.array([1.0, 0.8, 0.6, 0.3, 0.1, 0.0])       # (N,) graded rewards, E_{π_t}[r] = 0.223
R_BINARY = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])       # (N,) pass/fail, success probability 0.07
PI_T = np.array([0.02, 0.05, 0.13, 0.20, 0.25, 0.35])     # (N,) π_t
TAU_SAMPLED = 0.1          # τ of the sampled runs: small enough that the two baselines differ
KS = (4, 8, 16)            # group sizes K
FIT_STEPS_EXACT = 2000     # gradient steps, exact-expectation fits (converged: TV ≤ 4e-6)
FIT_STEPS_SAMPLED = 500    # gradient steps per sampled fit (departure 3)
CURVE_ITERS = 12           # PMD iterations in the learning curves


def _fmt(c, w):
    if isinstance(c, str):
        return f"{c:>{w}}"
    return f"{c:>{w}.4g}"


def _row(cells, widths):
    """One table row; widths is an int or one width per cell."""
    if isinstance(widths, int):
        widths = [widths] * len(cells)
    return "".join(_fmt(c, w) for c, w in zip(cells, widths))


# -----------------------------------------------------------------------------
# Sections 1–3: the closed forms and the KL–χ² equivalence


def section_closed_forms():
    taus = (1.0, 0.1, 0.01)
    print("== 1-2. One step on a graded bandit: exact PMD (π_t·e^{r/τ}/Z_t) vs population PMD-mean (W) ==")
    step = {t: (pmd_exact_update(PI_T, R_GRADED, t), *pmd_mean_population_update(PI_T, R_GRADED, t)) for t in taus}
    w = [5, 6, 7] + [11] * 6
    print(" " * 18 + "".join(f"{'τ = ' + format(t, 'g'):^22}" for t in taus))
    print(_row(["arm", "r", "π_t"] + ["exact", "PMD-mean"] * 3, w))
    for i in range(len(PI_T)):
        print(_row([str(i), R_GRADED[i], PI_T[i]] + [step[t][j][i] for t in taus for j in (0, 1)], w))
    print(_row(["E[r]", "", PI_T @ R_GRADED] + [step[t][j] @ R_GRADED for t in taus for j in (0, 1)], w))
    print(_row(["λ", "", ""] + [x for t in taus for x in ("", step[t][2])], w))
    print("PMD-mean moves less mass to the rare good arms, and much less when τ is small.\n")

    print("== 3. PMD-mean = argmax E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t), with λ = τ·KL(π_t‖π_{t+1}) ==")
    print("   (the KL–χ² problem solved independently: bisection on the normaliser, Newton per arm, no W)")
    w = [8, 7, 10, 15, 12, 18, 15, 10]
    print(_row(["rewards", "τ", "λ", "τ·KL(π_t‖π')", "rel. diff", "max|π_W − π_KLχ²|", "resid. of (S)", "Σπ' − 1"], w))
    worst = 0.0
    for name, r in (("graded", R_GRADED), ("binary", R_BINARY)):
        for tau in (1.0, 0.1, 0.01, 0.001):
            pm, lam = pmd_mean_population_update(PI_T, r, tau)
            pk = kl_chi2_update(PI_T, r, tau, lam)
            tkl = tau * kl(PI_T, pm)
            # residual of (S), τ·log u + λ·u − (r − r̄), from the log-space solver (u may underflow)
            log_u, _ = _pmd_mean_log_u(PI_T, r, tau)
            resid = np.max(np.abs(tau * log_u + lam * np.exp(log_u) - (r - PI_T @ r)))
            diff = np.max(np.abs(pm - pk))
            worst = max(worst, diff)
            print(_row([name, f"{tau:g}", lam, tkl, f"{abs(lam - tkl) / lam:.1e}", f"{diff:.1e}",
                        f"{resid:.1e}", f"{pm.sum() - 1:.1e}"], w))
    print(f"largest |π_W − π_KLχ²| over all rows: {worst:.1e}  (τ = 0.001 shows the log-space W is stable)\n")


# -----------------------------------------------------------------------------
# Section 4: binary rewards, where PMD-mean is conservative


def section_binary():
    taus = (1.0, 0.1, 0.01)
    print("== 4. Binary rewards, success probability p: p′ after one step, and λ ==")
    w = [8] + [10] * 9
    print(" " * 8 + "".join(f"{'τ = ' + format(t, 'g'):^30}" for t in taus))
    print(_row(["p"] + ["exact p′", "mean p′", "λ"] * 3, w))
    for p in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 0.9):
        cells = [f"{p:g}"]
        for t in taus:
            pe, pm, lam = binary_update(p, t)
            cells += [f"{pe:.4f}", f"{pm:.4f}", f"{lam:.4f}"]
        print(_row(cells, w))
    print("In every row PMD-mean's p′ is at most exact PMD's, and far below it at small p and τ.")

    p0, n, tlist = 0.01, 6, (1.0, 0.1)
    traj = {(t, k): [p0] for t in tlist for k in (0, 1)}
    for _ in range(n):
        for t in tlist:
            for k in (0, 1):
                traj[(t, k)].append(binary_update(traj[(t, k)][-1], t)[k])
    print(f"\nIterating from p = {p0}: success probability after each step")
    w = [6] + [16] * 4
    print(_row(["step"] + [f"τ={t:g} {k}" for t in tlist for k in ("exact", "PMD-mean")], w))
    for i in range(n + 1):
        print(_row([str(i)] + [f"{traj[(t, k)][i]:.4f}" for t in tlist for k in (0, 1)], w))
    print()
    grid = np.logspace(-3, math.log10(0.95), 80)                          # (80,) for the figure
    curves = {t: np.array([binary_update(p, t) for p in grid]) for t in taus}  # τ → (80, 3)
    return grid, curves


# -----------------------------------------------------------------------------
# Sections 5–6: the real loss, with exact expectations and with K samples


def section_real_loss(seeds: int, seed: int):
    print("== 5a. Gradient descent on pmd_mean.pmd_loss, exact expectations over arms (graded rewards) ==")
    w = [6, 11, 15, 22, 10, 13]
    print(_row(["τ", "baseline", "target", "TV(fit, closed form)", "E_fit[r]", "E_target[r]"], w))
    for tau in (1.0, 0.1, 0.01):
        for kind, name, target in (("mean", "W (PMD-mean)", pmd_mean_population_update(PI_T, R_GRADED, tau)[0]),
                                   ("partition", "exact PMD", pmd_exact_update(PI_T, R_GRADED, tau))):
            fit = fit_exact_expectation(PI_T, R_GRADED, tau, kind, FIT_STEPS_EXACT)
            print(_row([f"{tau:g}", kind, name, f"{tv(fit, target):.1e}", fit @ R_GRADED, target @ R_GRADED], w))
    print("The population fixed point of the loss the LLM trainer minimises is the Lambert-W step.\n")

    tau = TAU_SAMPLED
    gen = torch.Generator().manual_seed(seed)
    target = {"mean": pmd_mean_population_update(PI_T, R_GRADED, tau)[0],
              "partition": pmd_exact_update(PI_T, R_GRADED, tau)}          # each baseline's population target
    pop_b = {"mean": PI_T @ R_GRADED, "partition": tau * math.log(PI_T @ np.exp(R_GRADED / tau))}
    pis = np.tile(PI_T, (seeds, 1))                                        # (S, N)
    runs = {}
    for K in KS:
        for kind in ("mean", "partition"):
            for loo in (False, True):
                fit, b, _ = fit_sampled(pis, R_GRADED, tau, kind, K, gen, loo, FIT_STEPS_SAMPLED)
                runs[(K, kind, loo)] = dict(fit=fit, b0=b[:, 0], tv=tv(fit, target[kind]))

    print(f"== 5b. The same loss on K sampled responses, {seeds} seeds, τ = {tau}, plain group baselines ==")
    print(f"   population targets: PMD-mean (W) E[r] = {target['mean'] @ R_GRADED:.3f}, "
          f"τ·KL = λ = {tau * kl(PI_T, target['mean']):.3f};  exact PMD E[r] = "
          f"{target['partition'] @ R_GRADED:.3f}, τ·KL = {tau * kl(PI_T, target['partition']):.3f}")
    w = [4, 11, 16, 23, 16]
    print(_row(["K", "baseline", "E_fit[r]", "TV(fit, own target)", "τ·KL(π_t‖fit)"], w))
    for K in KS:
        for kind in ("mean", "partition"):
            run = runs[(K, kind, False)]
            er = run["fit"] @ R_GRADED                                     # (S,)
            tkl = tau * np.sum(PI_T * (np.log(PI_T) - np.log(run["fit"])), 1)  # (S,)
            print(_row([K, kind, f"{er.mean():.3f} ± {er.std():.3f}",
                        f"{run['tv'].mean():.3f} ± {run['tv'].std():.3f}", f"{tkl.mean():.3f}"], w))
    print()

    print("== 6. Finite samples: regression target −b/τ of a reward-0 response, and the fit's error ==")
    print(f"   population values: PMD-mean −r̄/τ = {-pop_b['mean'] / tau:.3f},  "
          f"PMD-part −log Z_t = {-pop_b['partition'] / tau:.3f}  (nats)")
    w = [4, 11, 5, 17, 8, 11, 18]
    print(_row(["K", "baseline", "loo", "−b/τ mean ± sd", "bias", "rel. RMSE", "TV(fit, own tgt)"], w))
    for K in KS:
        for kind in ("mean", "partition"):
            for loo in (False, True):
                run = runs[(K, kind, loo)]
                t, t0 = -run["b0"] / tau, -pop_b[kind] / tau               # (S,), scalar
                rel = math.sqrt(np.mean((t - t0) ** 2)) / abs(t0)
                print(_row([K, kind, "yes" if loo else "no", f"{t.mean():.2f} ± {t.std():.2f}",
                            f"{t.mean() - t0:+.2f}", f"{rel:.2f}", f"{run['tv'].mean():.3f}"], w))
    print()
    return runs


def section_curves(seeds: int, seed: int, K: int = 8):
    tau = TAU_SAMPLED
    gen = torch.Generator().manual_seed(seed + 1)
    curves = {"exact PMD": [PI_T @ R_GRADED], "PMD-mean (W)": [PI_T @ R_GRADED]}
    pe, pm = PI_T.copy(), PI_T.copy()
    for _ in range(CURVE_ITERS):
        pe = pmd_exact_update(pe, R_GRADED, tau)
        pm, _ = pmd_mean_population_update(pm, R_GRADED, tau)
        curves["exact PMD"].append(pe @ R_GRADED)
        curves["PMD-mean (W)"].append(pm @ R_GRADED)
    final = {}
    for kind, name in (("mean", f"PMD-mean, K={K}"), ("partition", f"PMD-part, K={K}")):
        pis = np.tile(PI_T, (seeds, 1))                                    # (S, N)
        ers = [pis @ R_GRADED]                                             # list of (S,)
        for _ in range(CURVE_ITERS):
            pis, _, _ = fit_sampled(np.maximum(pis, 1e-300), R_GRADED, tau, kind, K, gen, False, FIT_STEPS_SAMPLED)
            ers.append(pis @ R_GRADED)
        curves[name] = np.array(ers)                                       # (iters + 1, S)
        final[name] = pis

    print(f"== 6 (cont.). Learning curves: E_π[r] after each iteration (τ = {tau}, K = {K}, {seeds} seeds, "
          "mean ± sd) ==")
    names = list(curves)
    w = [5, 11, 14, 18, 18]
    print(_row(["iter"] + names, w))
    for it in (0, 1, 2, 3, 4, 6, 8, CURVE_ITERS):
        cells = [str(it)]
        for n in names:
            c = np.asarray(curves[n])
            cells.append(f"{c[it]:.3f}" if c.ndim == 1 else f"{c[it].mean():.3f} ± {c[it].std():.3f}")
        print(_row(cells, w))
    for n, p in final.items():
        print(f"   {n}, after {CURVE_ITERS} iterations: share of seeds with π(best arm) > 0.5: "
              f"{np.mean(p[:, 0] > 0.5):.2f}, with π(best arm) < 0.001: {np.mean(p[:, 0] < 1e-3):.2f}")
    print("   Sampled runs stall below 1: an arm that is not sampled only feels the normaliser (departure 4)\n"
          "   and loses mass, so a best arm missed a few times is never sampled again.\n")
    return curves


# -----------------------------------------------------------------------------
# Section 7: beyond the paper, the two candidate baselines of pmd_mean.py (its docstring, section 9)

CANDIDATES = (("PMD-mean", "mean", None), ("PMD-part", "partition", None), ("tempered 3τ", "tempered", 3 * TAU_SAMPLED),
              ("tempered 10τ", "tempered", 10 * TAU_SAMPLED), ("corrected", "corrected", None))  # (name, kind, τ_b)
STEP_PS = (0.01, 0.1, 0.5)                                 # success probabilities of the one-step table


def binary_arms(p: float) -> np.ndarray:
    """π_t on R_BINARY's six arms with success mass p: the two successes 3:7, the failures as in PI_T."""
    fail = PI_T[2:] / PI_T[2:].sum()
    return np.concatenate([p * np.array([0.3, 0.7]), (1 - p) * fail])     # (N,)


def section_beyond(seeds: int, seed: int, exact_final: float):
    """Section 7; exact_final: exact PMD's E[r] after CURVE_ITERS iterations (from section_curves)."""
    tau, Ks = TAU_SAMPLED, (8, 16)
    gen = torch.Generator().manual_seed(seed + 2)
    print(f"== 7. Beyond the paper: the tempered (9a) and corrected (9b) baselines, τ = {tau}, leave-one-out ==")
    print("   population: b → its K → ∞ value, step (W) with r − b (= exact PMD for PMD-part and corrected);")
    print(f"   sampled: K responses per iteration, {seeds} seeds, mean ± sd. Binary rewards, success mass p:")
    w = [13, 8] + [18] * len(STEP_PS)
    print(_row(["baseline", "", *[f"p′ at p = {p:g}" for p in STEP_PS]], w))
    steps = {}                                                             # (name, K or "pop") → [p′ per p]
    for name, kind, tb in CANDIDATES:
        pop = []
        for p in STEP_PS:
            pi = binary_arms(p)
            b = population_baseline(pi, R_BINARY, tau, kind, tb)
            pop.append(pmd_mean_population_update(pi, R_BINARY, tau, b)[0][:2].sum())
        steps[(name, "pop")] = pop
        print(_row([name, "pop.", *[f"{x:.4f}" for x in pop]], w))
        for K in Ks:
            cells = []
            for p in STEP_PS:
                fit, _, _ = fit_sampled(np.tile(binary_arms(p), (seeds, 1)), R_BINARY, tau, kind, K, gen, True,
                                        FIT_STEPS_SAMPLED, tb)
                ps = fit[:, :2].sum(1)                                     # (S,) p′ of each seed
                cells.append(ps)
            steps[(name, K)] = [c.mean() for c in cells]
            print(_row(["", f"K={K}", *[f"{c.mean():.3f} ± {c.std():.3f}" for c in cells]], w))
    print(f"   exact PMD at p = {', '.join(f'{p:g}' for p in STEP_PS)}: "
          + ", ".join(f"{pmd_exact_update(binary_arms(p), R_BINARY, tau)[:2].sum():.4f}" for p in STEP_PS) + "\n")

    print("   Graded bandit: target −b/τ of sample 0 (its own reward excluded), against the baseline's own")
    print("   population value; and Σ_i A_i/τ, the group's summed target log-ratio (< 0: sampled responses")
    print(f"   pushed down on the whole; exact PMD's population value is K·(r̄ − τ·log Z_t)/τ)")
    w = [13, 4, 17, 11, 8, 11, 17]
    print(_row(["baseline", "K", "−b/τ mean ± sd", "population", "bias", "rel. RMSE", "Σ A/τ mean ± sd"], w))
    log_z = population_baseline(PI_T, R_GRADED, tau, "partition")
    for name, kind, tb in CANDIDATES:
        t0 = -population_baseline(PI_T, R_GRADED, tau, kind, tb) / tau
        for K in Ks:
            _, b, idx = fit_sampled(np.tile(PI_T, (seeds, 1)), R_GRADED, tau, kind, K, gen, True, 0, tb)
            t = -b[:, 0] / tau                                             # (S,)
            push = ((R_GRADED[idx] - b) / tau).sum(1)                     # (S,) Σ_i A_i/τ
            rel = math.sqrt(np.mean((t - t0) ** 2)) / abs(t0)
            print(_row([name, K, f"{t.mean():.2f} ± {t.std():.2f}", f"{t0:.2f}", f"{t.mean() - t0:+.2f}",
                        f"{rel:.2f}", f"{push.mean():.1f} ± {push.std():.1f}"], w))
    print(f"   (exact PMD: Σ A/τ = {8 * (PI_T @ R_GRADED - log_z) / tau:.1f} at K = 8, "
          f"{16 * (PI_T @ R_GRADED - log_z) / tau:.1f} at K = 16)\n")

    print(f"   Graded bandit: E_π[r] after {CURVE_ITERS} iterations from π_t (E = {PI_T @ R_GRADED:.3f}), mean ± s.e.")
    w = [13] + [18] * len(Ks)
    print(_row(["baseline", *[f"K = {K}" for K in Ks]], w))
    finals = {}
    for name, kind, tb in CANDIDATES:
        cells = []
        for K in Ks:
            pis = np.tile(PI_T, (seeds, 1))                                # (S, N)
            for _ in range(CURVE_ITERS):
                pis, _, _ = fit_sampled(np.maximum(pis, 1e-300), R_GRADED, tau, kind, K, gen, True,
                                        FIT_STEPS_SAMPLED, tb)
            er = pis @ R_GRADED                                            # (S,)
            finals[(name, K)] = er
            cells.append(f"{er.mean():.3f} ± {er.std(ddof=1) / math.sqrt(len(er)):.3f}")
        print(_row([name, *cells], w))
    print(f"   exact PMD (population): {exact_final:.3f}\n")
    return steps, finals


# -----------------------------------------------------------------------------
# Figure (matplotlib imported only here)


def make_figure(grid, binary_curves, curves, steps, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(21, 4.8))
    colors = {1.0: "tab:blue", 0.1: "tab:orange", 0.01: "tab:green"}
    for tau, c in binary_curves.items():                                   # c: (80, 3) = p′ exact, p′ mean, λ
        ax[0].plot(grid, c[:, 0], color=colors[tau], label=f"exact PMD, τ = {tau:g}")
        ax[0].plot(grid, c[:, 1], color=colors[tau], ls="--", label=f"PMD-mean, τ = {tau:g}")
        ax[1].plot(grid, c[:, 2], color=colors[tau], label=f"τ = {tau:g}")
    ax[0].plot(grid, grid, color="gray", ls=":", lw=1, label="p′ = p (no change)")
    ax[0].set(xscale="log", xlabel=r"success probability $p$ under $\pi_t$", ylim=(-0.02, 1.36),
              yticks=np.linspace(0, 1, 6), ylabel=r"$p'$ under $\pi_{t+1}$", title="One step, binary rewards")
    ax[0].legend(fontsize=7.5, loc="upper center", ncol=3, columnspacing=0.8)  # above the curves
    ax[1].set(xscale="log", yscale="log", xlabel=r"success probability $p$ under $\pi_t$",
              ylabel=r"$\lambda = \tau\,\mathrm{KL}(\pi_t \| \pi_{t+1})$",
              title=r"PMD-mean's implicit $\chi^2$ weight $\lambda$")
    ax[1].legend(fontsize=8, loc="upper left")
    for name, c in curves.items():
        c = np.asarray(c)
        it = np.arange(c.shape[0])
        if c.ndim == 1:                                                    # closed-form iterations
            ax[2].plot(it, c, color="k" if name == "exact PMD" else "tab:red", marker="o", ms=3, label=name)
        else:                                                              # (iters + 1, S) sampled runs
            col = "tab:red" if "mean" in name else "tab:gray"
            m, s = c.mean(1), c.std(1)
            ax[2].plot(it, m, color=col, ls="--", label=f"{name} (mean ± sd over seeds)")
            ax[2].fill_between(it, m - s, m + s, color=col, alpha=0.15)
    ax[2].set(xlabel="PMD iteration", ylabel=r"$E_\pi[r]$", ylim=(0, 1.02),
              title=f"Learning curves, graded bandit, τ = {TAU_SAMPLED:g}")
    ax[2].legend(fontsize=8, loc="lower right")
    # panel 4: the tempered family's one step (population lines) and every candidate from K = 16 samples
    tau = TAU_SAMPLED
    fam = ((tau, "τ_b = τ (PMD-part, exact PMD)", "k"), (3 * tau, "τ_b = 3τ", "tab:purple"),
           (10 * tau, "τ_b = 10τ", "tab:blue"), (None, "τ_b → ∞ (PMD-mean)", "tab:red"))
    for tb, label, col in fam:
        ys = []
        for p in grid:
            pi = binary_arms(p)
            b = population_baseline(pi, R_BINARY, tau, "mean" if tb is None else "tempered", tb)
            ys.append(pmd_mean_population_update(pi, R_BINARY, tau, b)[0][:2].sum())
        ax[3].plot(grid, ys, color=col, label=f"population, {label}")
    marks = {"PMD-mean": ("tab:red", "o"), "PMD-part": ("k", "s"), "tempered 3τ": ("tab:purple", "^"),
             "tempered 10τ": ("tab:blue", "v"), "corrected": ("tab:green", "D")}
    for name, (col, m) in marks.items():
        ax[3].plot(STEP_PS, steps[(name, 16)], color=col, marker=m, ls="none", ms=6, label=f"{name}, K = 16 samples")
    ax[3].plot(grid, grid, color="gray", ls=":", lw=1)
    ax[3].set(xscale="log", xlabel=r"success probability $p$ under $\pi_t$", ylabel=r"$p'$ under $\pi_{t+1}$",
              ylim=(-0.02, 1.02), title=f"Beyond the paper: baselines between, τ = {tau:g}")
    ax[3].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="PMD-mean's implicit KL–χ² regulariser on a bandit.")
    # --- output
    ap.add_argument("--out", default=".", help="directory for toy_bandit.png (default: current directory)")
    ap.add_argument("--no-plot", action="store_true", help="skip the figure (and the matplotlib import)")
    # --- sampled runs
    ap.add_argument("--seeds", type=int, default=400, help="independent runs S in the sampled experiments")
    ap.add_argument("--seed", type=int, default=0, help="seed of the torch generator that draws the samples")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds must be at least 1 (got {args.seeds}).", file=sys.stderr)
        return 2
    if not args.no_plot:                                                   # before the work, not after it
        try:
            os.makedirs(args.out, exist_ok=True)
            os.rmdir(tempfile.mkdtemp(dir=args.out))
        except OSError as e:
            print(f"error: --out {args.out}: cannot write the figure there ({e.strerror or type(e).__name__}).",
                  file=sys.stderr)
            return 2

    t0 = time.time()
    section_closed_forms()
    grid, binary_curves = section_binary()
    section_real_loss(args.seeds, args.seed)
    curves = section_curves(args.seeds, args.seed)
    steps, _ = section_beyond(args.seeds, args.seed, curves["exact PMD"][-1])
    if not args.no_plot:
        path = os.path.join(args.out, "toy_bandit.png")
        make_figure(grid, binary_curves, curves, steps, path)
        print(f"figure: {path}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
