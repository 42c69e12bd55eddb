"""
toy_bandit.py: PMD-mean's implicit KL–χ² regulariser, seen exactly on a bandit and with the real loss.

    python toy_bandit.py                       # tables on stdout + toy_bandit.png, chi2_cap.png here (~45 s, CPU)
    python toy_bandit.py --out /tmp --no-plot  # tables only

One prompt, N arms (think: N possible responses), reward r(y) ∈ [0, 1], current policy π_t. Sampling
and sequence log-probs, the expensive parts of an LLM, are array lookups here, so the update that the
paper (arXiv 2602.05933) analyses can be computed exactly and set against what `pmd_mean.pmd_loss`, the
loss the LLM trainer uses, actually does.

Equation numbers are pmd_mean.py's: (1) exact PMD, (2) the regression, (3) PMD-mean's Lambert-W step
with (3a) its stationarity condition and (3b) its λ, (4) the KL–χ² problem, (5) the loss with (5a),
(5b) its fixed point. "Section N" means pmd_mean.py section N. This file's printed parts are A–H.

Symbols and shapes
------------------
    N   arms (responses), 6 here         K   samples per iteration (the group size in pmd_mean.py)
    S   independent seeds, run side by side as the P "prompts" of pmd_mean.compute_baseline
    π_t current policy (N,)              u   = π_{t+1}/π_t, the likelihood ratio (N,)
    r̄   = E_{π_t}[r]                     Z_t = E_{π_t}[e^{r/τ}]
    λ   PMD-mean's χ² weight             θ   logits of a tabular softmax policy, (N,) or (S, N)
    |y| a response's length in tokens (N,): 1 for every arm, except in part E

The math, in the order the output follows it
--------------------------------------------
A. Exact PMD, argmax_π E_π[r] − τ·KL(π‖π_t), has the closed form π_{t+1} = π_t·e^{r/τ}/Z_t (1).
   PMD-mean at the population level minimises the regression (2) with b = r̄, over normalised π,

       E_{π_t}[(r − r̄ − τ·log u)²]     subject to  Σ_y π_t(y)·u(y) = 1.

   With a multiplier μ for the constraint, the derivative in u(y) is
   π_t(y)·[−2τ·(r − r̄ − τ·log u)/u + μ] = 0, i.e. r − r̄ − τ·log u = λ·u with λ = μ/(2τ):

       τ·log u + λ·u = r − r̄.                                                             (3a)

   Put v = (λ/τ)·u: log v + v = log(λ/τ) + (r − r̄)/τ, so v·e^v = (λ/τ)·e^{(r−r̄)/τ} and

       π_{t+1} = π_t·(τ/λ)·W₀((λ/τ)·e^{(r − r̄)/τ}),                                         (3)

   W₀ the principal Lambert W, λ the one scalar that makes Σ π_{t+1} = 1. Taking E_{π_t} of (3a),
   with E_{π_t}[u] = 1 and E_{π_t}[r − r̄] = 0, gives τ·E_{π_t}[log u] + λ = 0:

       λ = τ·KL(π_t ‖ π_{t+1})  > 0.                                                       (3b)

B. The equivalence (4). argmax_π E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t), with Pearson
   χ²(π‖π_t) = Σ π_t·(π/π_t − 1)² = Σ π²/π_t − 1, is a strictly concave problem whose stationarity
   condition is r − τ·(log u + 1) − λ·u + ν = 0: again τ·log u + λ·u = r + const, the constant fixed
   by normalisation. At the λ of (3) the two problems therefore have the same solution: PMD-mean is
   mirror descent with the regulariser τ·KL + (λ/2)·χ². `kl_chi2_update` solves the KL–χ² problem
   without Lambert W (bisection on the normaliser, Newton per arm) and the script prints the largest
   difference.

C. Binary rewards: u depends on an arm only through its reward, so any number of arms reduces to two
   (success with mass p, failure with 1 − p). From (3a), a success has τ·log u + λ·u = 1 − p: when
   p is small and τ is small exact PMD moves nearly all mass to the success (p′ → 1), while PMD-mean
   is held back by the λ·u term.

D. The real loss. A tabular softmax policy is fitted by gradient descent on `pmd_mean.pmd_loss` with
   exact expectations over arms: it lands on (3) (and, with the log-partition baseline, on exact PMD).

E. Unequal lengths. `pmd_loss` is (5), L = 0.5·τ·(A/τ − Δ)²/|y|: the regression (2) times 1/(2τ|y|),
   so each response's squared residual is weighted by 1/|y| (OpenKimi's `opmd` loss has the same
   1/|y|, its seq-mean-token-mean aggregation). Redo A with that weight and any baseline b: the
   derivative in u(y) is π_t(y)·[−(r − b − τ·log u)/(|y|·u) + μ] = 0, so with λ = μ

       τ·log u + λ·|y|·u = r − b,                                                         (5a)
       π_{t+1} = π_t·(τ/(λ·|y|))·W₀((λ·|y|/τ)·e^{(r − b)/τ}):                               (5b)

   (3) with λ·|y| in place of λ. Taking E_{π_t} of (5a), with E_{π_t}[|y|·u] = E_{π_{t+1}}[|y|] and
   E_{π_t}[log u] = −KL(π_t‖π_{t+1}), gives λ = (τ·KL(π_t‖π_{t+1}) − (b − r̄)) / E_{π_{t+1}}[|y|].
   When all lengths are equal (|y| ≡ c), (5b) is (3) (with r − b) at λ·c, and for b = r̄, λ·c = τ·KL
   (3b): the paper's result holds exactly for the loss we run whenever the lengths do not differ.
   When they do, at the same reward the longer response gets the smaller u (τ·log u + λ·|y|·u grows
   with |y|): a long success grows less, a long failure shrinks more.

   The KL–χ² reading of (5b): it maximises E_π[r] − τ·KL(π‖π_t) − (λ/2)·Σ_y |y|·π(y)²/π_t(y), whose
   stationarity condition is r − τ·(log u + 1) − λ·|y|·u + ν = 0. With the length-weighted Pearson
   χ²_|y|(π‖π_t) = Σ_y π_t(y)·|y|·(π(y)/π_t(y) − 1)², Σ|y|·π²/π_t = χ²_|y| + 2·E_π[|y|] − E_{π_t}[|y|],
   so

       π_{t+1} = argmax_π  E_π[r − λ·|y|] − τ·KL(π‖π_t) − (λ/2)·χ²_|y|(π‖π_t):

   the KL–χ² step with a length-weighted χ² AND a cost of λ per token. (χ²_|y| alone would not do:
   its stationarity condition carries an extra λ·|y| on the right of (5a).) With |y| ≡ c the token
   cost is the same for every π and χ²_|y| = c·χ²: (4) with λ·c. Part E prints (5b), (3) as written
   and an independent minimiser of E_{π_t}[(5)] (gradient descent on `pmd_loss`) side by side.

F. The same loss on K sampled responses with `pmd_mean.compute_baseline`, as an LLM would use it.

G. Finite samples: over S seeds, the noise and bias of each baseline's regression targets, the
   fitted policy's distance from its own population target, and multi-iteration learning curves.
   What it shows at τ = 0.1, K = 8: PMD-mean's targets are unbiased and have about half the spread
   of PMD-part's (sd 0.94 vs 1.98 nats), yet after 12 iterations sampled PMD-part ends higher
   (E[r] 0.785 vs 0.702). Less noisy targets did not buy a better sampled run here.

H. Beyond the paper (pmd_mean.py section 9). (5a) with |y| ≡ 1 and any baseline b gives (3) with
   r − b, and λ = τ·KL(π_t‖π_{t+1}) − (b − r̄) ≥ 0 for b ≤ τ·log Z_t (E above). The tempered
   baseline (a log-mean-exp at its own temperature τ_b, τ_b·log E e^{r/τ_b}, between r̄ and τ·log Z_t)
   and the corrected one (τ·log Z_t in the limit) are set against the three above: one step at
   p = 0.01, 0.1, 0.5, the bias of their targets, and the reward after 12 iterations, all
   leave-one-out.

The figure chi2_cap.png draws (3) as log u against x = (r − r̄)/τ: log W₀(c·e^x) − log c, c = λ/τ
(c·|y| for (5b)). For x → −∞, W₀(z) ≈ z and log u ≈ x, exact PMD's slope-1 line: responses below
the mean are scaled down about as exact PMD scales them. For large x, W₀(z) ≈ log z and u ≈ (τ/λ)·x:
responses above the mean grow linearly in x, not as e^x. The χ² term caps big increases.

Departures from the paper and from pmd_mean.py (read these before quoting a number)
-----------------------------------------------------------------------------------
  1. A tabular softmax policy over N arms stands in for the LLM: log π(y) is one log-softmax entry,
     so every response has length 1 (pmd_loss gets lengths = 1), except in part E, where each arm
     carries a length |y| that enters only through pmd_loss's 1/|y|, as a number attached to the arm.
  2. "Exact expectations" (parts D, E) is the population loss E_{π_t}[L], which an LLM never sees. We
     get it from one pmd_loss call over the N arms, each with the per-sequence weight N·π_t(y)
     (pmd_loss's `weights`): the loss multiplies by the weight and takes a plain mean over the N
     arms, so the mean becomes the π_t-weighted sum. The arms' lengths go in as they are.
  3. Each regression is plain full-batch gradient descent from θ_t for a fixed number of steps
     (2000 exact, up to 5000 in part E, 500 sampled), not 1–2 AdamW steps per batch as in train_math.py:
     we look at what the loss converges to, not at an optimiser's first steps. Sampled results depend
     on this budget (see 4): the K = 8 learning curves end (iteration 12, 400 seeds) at E[r] = 0.77,
     0.76, 0.70, 0.68 for sampled PMD-mean with 50, 100, 500, 1000 steps, and at 0.78–0.79 for PMD-part.
  4. With K samples the loss does not pin down the arms that were not sampled: they enter only
     through the softmax normaliser, so the minimiser is not unique, and when the sampled targets ask
     for more than the total mass, gradient descent keeps draining the unsampled arms. An LLM is in
     the same position (almost every response goes unsampled); here it is easy to see.
  5. The sampled runs (parts F, G) use the plain group baselines (leave_one_out=False), the form the
     paper analyses; pmd_mean.py defaults to leave-one-out, shown as extra rows in G.
  6. W₀ is computed by Newton's method on log W(e^z) and λ by bisection on log λ; both are written
     here (no scipy) and checked in test_toy_bandit.py.
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


# -----------------------------------------------------------------------------
# The three closed forms: exact PMD, population PMD-mean, and the KL–χ² step


def pmd_exact_update(pi, r, tau: float):
    """Exact PMD (1): π_{t+1} = π_t·e^{r/τ}/Z_t, computed in log space (stable for τ → 0)."""
    p, back = _as_numpy(pi)
    rn, _ = _as_numpy(r)
    # log π_{t+1} = log π_t + r/τ − log Σ π_t·e^{r/τ}
    with np.errstate(divide="ignore"):  # an arm with π_t = 0 stays at 0
        logits = np.log(p) + rn / tau                                      # (N,)
    m = logits.max()
    log_z = m + np.log(np.sum(np.exp(logits - m)))
    return back(np.exp(logits - log_z))


def _pmd_mean_log_u(p: np.ndarray, r: np.ndarray, tau: float, b: float | None = None,
                    lengths: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """log u = log(π_{t+1}/π_t) of (5b), and λ. Works in log space so small τ never overflows.

    b is the baseline, r̄ = E_{π_t}[r] by default (PMD-mean). Any b ≤ τ·log Z_t gives the same
    Lambert-W form with r − b in place of r − r̄ (part H); b = τ·log Z_t gives λ = 0, exact PMD.
    lengths (N,) are the |y| of (5b); None means all equal, and then (5b) is (3)."""
    b = p @ r if b is None else b
    # d = (r − b)/τ
    d = (r - b) / tau                                                      # (N,)
    # log|y|. With lengths=None it is the scalar 0.0, and x + 0.0 == x in floating point, so the
    # equal-length path below computes (3) with exactly the same operations as before lengths existed.
    log_len = 0.0 if lengths is None else np.log(lengths)                  # (N,) or scalar
    if np.max(r) - np.min(r) < 1e-13:  # all rewards equal: nothing to learn, u = 1, λ = 0
        return np.zeros_like(p), 0.0
    # Σ π_t·e^d = e^{(τ·log Z_t − b)/τ}: at or below 1 the baseline is τ·log Z_t (or above it, which
    # no normalised u fits with λ ≥ 0), and the step is exact PMD's, whatever the lengths
    with np.errstate(divide="ignore"):                                     # an arm with π_t = 0 stays at 0
        log_mass_at_0 = _log_sum_exp(np.log(p) + d)                        # log Σ π_t·e^d
    if log_mass_at_0 <= 1e-12:
        return d - log_mass_at_0, 0.0                                      # log u of exact PMD (λ = 0)

    def log_u_at(a):
        # a = log(λ/τ). From (5b), u = (τ/(λ|y|))·W((λ|y|/τ)·e^d), so with e^{a + log|y|} = λ|y|/τ:
        # log u = log W(e^{a + log|y| + d}) − (a + log|y|)
        return _log_w_of_exp(a + log_len + d) - (a + log_len)              # (N,)

    def log_mass(a):
        # log Σ π_t·u, strictly decreasing in λ (from (5a): (τ/u + λ|y|)·du = −|y|·u·dλ); 0 at the answer
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


def pmd_mean_population_update(pi, r, tau: float, b: float | None = None, lengths=None):
    """The population minimiser of E_{π_t}[pmd_loss], the loss (5). Returns (π_{t+1}, λ).

    lengths (N,): the responses' |y|; None (all equal) gives the paper's step (3), with
    λ = τ·KL(π_t‖π_{t+1}) (3b). With lengths it is (5b), and λ·E_{π_{t+1}}[|y|] =
    τ·KL(π_t‖π_{t+1}) − (b − r̄). b: the baseline, r̄ by default (PMD-mean)."""
    p, back = _as_numpy(pi)
    rn, _ = _as_numpy(r)
    ln = None if lengths is None else _as_numpy(lengths)[0]
    log_u, lam = _pmd_mean_log_u(p, rn, tau, b, ln)
    return back(p * np.exp(log_u)), lam


def population_baseline(pi: np.ndarray, r: np.ndarray, tau: float, kind: str,
                        baseline_tau: float | None = None) -> float:
    """The K → ∞ limit of pmd_mean.compute_baseline: r̄ (mean), τ·log Z_t (partition, and corrected,
    whose correction is O(1/K)), τ_b·log E_{π_t}[e^{r/τ_b}] (tempered)."""
    t = {"mean": None, "partition": tau, "corrected": tau, "tempered": baseline_tau}[kind]
    with np.errstate(divide="ignore"):
        return float(pi @ r) if t is None else t * _log_sum_exp(np.log(pi) + r / t)


def kl_chi2_update(pi, r, tau: float, lam: float, lengths=None):
    """argmax_π E_π[r] − τ·KL(π‖π_t) − (λ/2)·Σ_y |y|·π(y)²/π_t(y), solved without Lambert W.

    With lengths=None (|y| ≡ 1) the last term is (λ/2)·(χ²(π‖π_t) + 1): the KL–χ² step (4). With
    lengths it is (λ/2)·χ²_|y| + λ·E_π[|y|] + const, χ²_|y| = Σ π_t·|y|·(π/π_t − 1)² (part E).
    The objective is strictly concave on the simplex, so its maximiser is the unique point where
        r − τ·(log u + 1) − λ·|y|·u + ν = 0,   u = π/π_t,  Σ π = 1.
    For a fixed c (= ν − τ) each arm's equation τ·v + λ|y|·e^v = r + c (v = log u) has one root,
    found by Newton from the right (the left side is convex and increasing in v); c is then bisected
    until Σ π_t·e^v = 1. u_i ≤ 1 exactly when c ≤ λ|y_i| − r_i, so c lies between the smallest and
    the largest λ|y_i| − r_i.
    """
    p, back = _as_numpy(pi)
    rn, _ = _as_numpy(r)
    if lam <= 0:  # pure KL: the exact PMD step
        return back(_as_numpy(pmd_exact_update(p, rn, tau))[0])
    # λ|y|; with lengths=None the scalar λ·1.0 == λ, so the equal-length path is unchanged
    lam_len = lam * (1.0 if lengths is None else _as_numpy(lengths)[0])   # (N,) or scalar

    def log_u_at(c):
        rhs = rn + c                                                       # (N,)
        # start where h(v) = τ·v + λ|y|·e^v − rhs ≥ 0 (same argument as in _log_w_of_exp)
        v = np.minimum(rhs / tau, np.maximum(0.0, np.log(np.maximum(rhs, 1e-300) / lam_len)))
        for _ in range(200):
            ev = lam_len * np.exp(v)
            step = (tau * v + ev - rhs) / (tau + ev)
            v = v - step
            if np.all(np.abs(step) <= 1e-15 * np.maximum(1.0, np.abs(v))):
                break
        return v

    lo, hi = np.min(lam_len - rn), np.max(lam_len - rn)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if p @ np.exp(log_u_at(mid)) > 1.0:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 4e-16 * max(1.0, abs(mid)):
            break
    return back(p * np.exp(log_u_at(0.5 * (lo + hi))))


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
                          steps: int = 2000, lengths: np.ndarray | None = None) -> np.ndarray:
    """Minimise E_{y~π_t}[pmd_loss] over logits θ by gradient descent, expectations exact.

    b = r̄ (kind "mean") or τ·log Z_t (kind "partition"): the K → ∞ limits of compute_baseline.
    lengths (N,): each arm's |y|, passed to pmd_loss as they are; None means 1 for every arm.
    The softmax family covers every interior point of the simplex, so the minimiser over θ is the
    minimiser over normalised π: (3) for "mean" ((5b) with lengths), exact PMD (1) for "partition".
    Nothing here uses a closed form, so it is the independent reference for both. Returns π_θ, (N,).
    """
    pi_t = torch.tensor(pi, dtype=torch.float64)                           # (N,)
    rr = torch.tensor(r, dtype=torch.float64)                              # (N,)
    n = len(pi)
    ell = torch.ones(n, dtype=torch.float64) if lengths is None else torch.tensor(lengths, dtype=torch.float64)
    # ell: (N,) |y|
    logp_old = pi_t.log()                                                  # (N,)
    if kind == "mean":
        b = pi_t @ rr                                                      # r̄
    else:
        b = tau * torch.logsumexp(logp_old + rr / tau, 0)                  # τ·log Z_t
    adv = rr - b                                                           # (N,) A = r − b
    # pmd_loss returns (1/N)·Σ_y weight(y)·L(y), L = 0.5·τ·(A/τ − Δ)²/|y| the loss (5). The per-sequence
    # weight N·π_t(y) turns that plain mean over the N arms into Σ_y π_t(y)·L(y) = E_{π_t}[L]: the loss
    # of a batch in which every arm appears exactly in proportion to π_t (departure 2). The weights are
    # importance weights; the lengths are the responses' own, and keep their 1/|y|.
    weights = n * pi_t                                                     # (N,)
    # Step size. In log π the squared residual has curvature τ·π_t(y)/|y|; the softmax normaliser adds
    # Σ_y π_t(y)·(A − τ·Δ)/|y|, which at the fixed point is exactly λ (by (5a)), and λ ≤ max A⁺/min|y|
    # by (5a) at the arm with the largest u (u ≥ 1 there). lr = min|y|/(τ + max A⁺) kept plain gradient
    # descent stable for every τ we tried; lr = 1/τ never converged at τ = 0.01 for PMD-mean (|y| ≡ 1),
    # where λ ≈ 10·τ. Long responses still flatten the loss: part E needs up to 5000 steps.
    lr = float(ell.min()) / (tau + float(adv.max().clamp(min=0)))
    theta = logp_old.clone().requires_grad_(True)                          # (N,) start at π_θ = π_t
    for _ in range(steps):
        logp = torch.log_softmax(theta, 0)                                 # (N,)
        loss = pmd_mean.pmd_loss(logp, logp_old, adv, tau, ell, weights)
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
# Parts A–B: the closed forms and the KL–χ² equivalence


def section_closed_forms():
    taus = (1.0, 0.1, 0.01)
    print("== A. One step on a graded bandit: exact PMD (1), π_t·e^{r/τ}/Z_t, vs population PMD-mean (3) ==")
    step = {t: (pmd_exact_update(PI_T, R_GRADED, t), *pmd_mean_population_update(PI_T, R_GRADED, t)) for t in taus}
    w = [5, 6, 7] + [11] * 6
    print(" " * 18 + "".join(f"{'τ = ' + format(t, 'g'):^22}" for t in taus))
    print(_row(["arm", "r", "π_t"] + ["exact", "PMD-mean"] * 3, w))
    for i in range(len(PI_T)):
        print(_row([str(i), R_GRADED[i], PI_T[i]] + [step[t][j][i] for t in taus for j in (0, 1)], w))
    print(_row(["E[r]", "", PI_T @ R_GRADED] + [step[t][j] @ R_GRADED for t in taus for j in (0, 1)], w))
    print(_row(["λ", "", ""] + [x for t in taus for x in ("", step[t][2])], w))
    print("PMD-mean moves less mass to the rare good arms, and much less when τ is small.\n")

    print("== B. (3) is the KL–χ² step (4), argmax E_π[r] − τ·KL(π‖π_t) − (λ/2)·χ²(π‖π_t), "
          "at λ = τ·KL(π_t‖π_{t+1}) (3b) ==")
    print("   (the KL–χ² problem solved independently: bisection on the normaliser, Newton per arm, no W)")
    w = [8, 7, 10, 15, 12, 18, 15, 10]
    print(_row(["rewards", "τ", "λ", "τ·KL(π_t‖π')", "rel. diff", "max|(3) − (4)|", "resid. of (3a)",
                "Σπ' − 1"], w))
    worst = 0.0
    for name, r in (("graded", R_GRADED), ("binary", R_BINARY)):
        for tau in (1.0, 0.1, 0.01, 0.001):
            pm, lam = pmd_mean_population_update(PI_T, r, tau)
            pk = kl_chi2_update(PI_T, r, tau, lam)
            tkl = tau * kl(PI_T, pm)
            # residual of (3a), τ·log u + λ·u − (r − r̄), from the log-space solver (u may underflow)
            log_u, _ = _pmd_mean_log_u(PI_T, r, tau)
            resid = np.max(np.abs(tau * log_u + lam * np.exp(log_u) - (r - PI_T @ r)))
            diff = np.max(np.abs(pm - pk))
            worst = max(worst, diff)
            print(_row([name, f"{tau:g}", lam, tkl, f"{abs(lam - tkl) / lam:.1e}", f"{diff:.1e}",
                        f"{resid:.1e}", f"{pm.sum() - 1:.1e}"], w))
    print(f"largest |(3) − (4)| over all rows: {worst:.1e}  (τ = 0.001 shows the log-space W is stable)\n")


# -----------------------------------------------------------------------------
# Part C: binary rewards, where PMD-mean is conservative


def section_binary():
    taus = (1.0, 0.1, 0.01)
    print("== C. Binary rewards, success probability p: p′ after one step, and λ ==")
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
# Part D: the real loss with exact expectations


def section_exact_fit():
    print("== D. Gradient descent on pmd_mean.pmd_loss, exact expectations over arms (graded rewards) ==")
    w = [6, 11, 15, 22, 10, 13]
    print(_row(["τ", "baseline", "target", "TV(fit, closed form)", "E_fit[r]", "E_target[r]"], w))
    for tau in (1.0, 0.1, 0.01):
        for kind, name, target in (("mean", "(3) PMD-mean", pmd_mean_population_update(PI_T, R_GRADED, tau)[0]),
                                   ("partition", "(1) exact PMD", pmd_exact_update(PI_T, R_GRADED, tau))):
            fit = fit_exact_expectation(PI_T, R_GRADED, tau, kind, FIT_STEPS_EXACT)
            print(_row([f"{tau:g}", kind, name, f"{tv(fit, target):.1e}", fit @ R_GRADED, target @ R_GRADED], w))
    print("The population fixed point of the loss the LLM trainer minimises is the Lambert-W step.\n")


# -----------------------------------------------------------------------------
# Part E: unequal lengths. pmd_loss divides by |y|, and that moves the fixed point

# (name, π_t, r, |y|, τ, gradient steps); b = r̄ in all three. 1/|y| flattens the loss, so a long arm
# that π_t makes rare converges slowly: the graded case needs 5000 steps for 1e-7, the others 2000 for 1e-9.
LENGTH_PI = np.array([0.05, 0.15, 0.3, 0.5])              # (4,) π_t of the worked example
LENGTH_R = np.array([1.0, 1.0, 0.0, 0.0])                 # (4,) a success and a failure of each length
LENGTH_LEN = np.array([2.0, 20, 2, 20])                   # (4,) |y|: short, long, short, long
LENGTH_CASES = (("a short and a long success, a short and a long failure", LENGTH_PI, LENGTH_R, LENGTH_LEN, 0.1,
                 2000),
                ("the same four arms", LENGTH_PI, LENGTH_R, LENGTH_LEN, 1.0, 2000),
                ("the graded bandit, the better answers the longer ones", PI_T, R_GRADED,
                 np.array([80.0, 40, 20, 10, 10, 10]), 0.1, 5000))


def section_lengths():
    print("== E. Unequal lengths: pmd_loss's 1/|y| gives the step (5b), (3) with λ·|y| in place of λ ==")
    print("   π_{t+1} three ways, b = r̄: 'GD on (5)' is gradient descent on pmd_mean.pmd_loss with exact")
    print("   expectations and these lengths (no closed form inside); '(3)' is the paper's step, blind to")
    print("   lengths; '(5b)' the Lambert-W step with λ·|y|, λ from its own normalisation.")
    w = [6, 5, 5, 7, 11, 9, 9]
    for name, pi, r, lengths, tau, steps in LENGTH_CASES:
        fit = fit_exact_expectation(pi, r, tau, "mean", steps, lengths)
        blind, _ = pmd_mean_population_update(pi, r, tau)
        step, lam = pmd_mean_population_update(pi, r, tau, lengths=lengths)
        kl_chi2 = kl_chi2_update(pi, r, tau, lam, lengths)
        print(f"   {name}, τ = {tau:g}:")
        print(_row(["arm", "r", "|y|", "π_t", "GD on (5)", "(3)", "(5b)"], w))
        for i in range(len(pi)):
            print(_row([str(i), f"{r[i]:g}", f"{lengths[i]:g}", f"{pi[i]:g}", f"{fit[i]:.4f}", f"{blind[i]:.4f}",
                        f"{step[i]:.4f}"], w))
        print(_row(["E[r]", "", "", f"{pi @ r:.3f}", f"{fit @ r:.4f}", f"{blind @ r:.4f}", f"{step @ r:.4f}"], w))
        print(f"   max|(5b) − GD| = {np.abs(step - fit).max():.1e},  "
              f"max|(3) − GD| = {np.abs(blind - fit).max():.3f},  "
              f"max|(5b) − KL–χ²_|y| step| = {np.abs(step - kl_chi2).max():.1e}")
        print(f"   λ = {lam:.4g};  λ·E_{{π_{{t+1}}}}[|y|] = {lam * (step @ lengths):.6g} = τ·KL(π_t‖π_{{t+1}}) = "
              f"{tau * kl(pi, step):.6g}")
    print("At the same reward the longer response gets the smaller u = π_{t+1}/π_t: a long success grows less,\n"
          "a long failure shrinks more, as if every token cost λ (the KL–χ²_|y| step: argmax E_π[r − λ·|y|]\n"
          "− τ·KL − (λ/2)·χ²_|y|, solved without W). With all lengths equal, (5b) is (3).\n")


# -----------------------------------------------------------------------------
# Parts F–G: the real loss on K samples, and what finite samples do


def section_sampled(seeds: int, seed: int):
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

    print(f"== F. The same loss on K sampled responses, {seeds} seeds, τ = {tau}, plain group baselines ==")
    print(f"   population targets: PMD-mean (3) E[r] = {target['mean'] @ R_GRADED:.3f}, "
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

    print("== G. Finite samples: regression target −b/τ of a reward-0 response, and the fit's error ==")
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


def section_curves(seeds: int, seed: int, K: int = 8, runs: dict | None = None):
    """Part G (cont.); runs: section_sampled's fits, for the targets' spread at this K (optional)."""
    tau = TAU_SAMPLED
    gen = torch.Generator().manual_seed(seed + 1)
    curves = {"exact PMD": [PI_T @ R_GRADED], "PMD-mean (3)": [PI_T @ R_GRADED]}
    pe, pm = PI_T.copy(), PI_T.copy()
    for _ in range(CURVE_ITERS):
        pe = pmd_exact_update(pe, R_GRADED, tau)
        pm, _ = pmd_mean_population_update(pm, R_GRADED, tau)
        curves["exact PMD"].append(pe @ R_GRADED)
        curves["PMD-mean (3)"].append(pm @ R_GRADED)
    final = {}
    for kind, name in (("mean", f"PMD-mean, K={K}"), ("partition", f"PMD-part, K={K}")):
        pis = np.tile(PI_T, (seeds, 1))                                    # (S, N)
        ers = [pis @ R_GRADED]                                             # list of (S,)
        for _ in range(CURVE_ITERS):
            pis, _, _ = fit_sampled(np.maximum(pis, 1e-300), R_GRADED, tau, kind, K, gen, False, FIT_STEPS_SAMPLED)
            ers.append(pis @ R_GRADED)
        curves[name] = np.array(ers)                                       # (iters + 1, S)
        final[name] = pis

    print(f"== G (cont.). Learning curves: E_π[r] after each iteration (τ = {tau}, K = {K}, {seeds} seeds, "
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
          "   and loses mass, so a best arm missed a few times is never sampled again.")
    end_mean, end_part = (np.asarray(curves[f"{n}, K={K}"])[-1].mean() for n in ("PMD-mean", "PMD-part"))
    spread = ""
    if runs is not None and (K, "mean", False) in runs:
        sd = {kind: (runs[(K, kind, False)]["b0"] / tau).std() for kind in ("mean", "partition")}
        spread = f"\n   (sd {sd['mean']:.2f} vs {sd['partition']:.2f} nats at K = {K}, table G)"
    print(f"   Sampled PMD-part ends higher than sampled PMD-mean ({end_part:.3f} vs {end_mean:.3f}), although\n"
          f"   PMD-mean's regression targets are the unbiased ones, with about half the spread{spread}.\n")
    return curves


# -----------------------------------------------------------------------------
# Part H: beyond the paper, the two candidate baselines of pmd_mean.py section 9

CANDIDATES = (("PMD-mean", "mean", None), ("PMD-part", "partition", None), ("tempered 3τ", "tempered", 3 * TAU_SAMPLED),
              ("tempered 10τ", "tempered", 10 * TAU_SAMPLED), ("corrected", "corrected", None))  # (name, kind, τ_b)
STEP_PS = (0.01, 0.1, 0.5)                                 # success probabilities of the one-step table


def binary_arms(p: float) -> np.ndarray:
    """π_t on R_BINARY's six arms with success mass p: the two successes 3:7, the failures as in PI_T."""
    fail = PI_T[2:] / PI_T[2:].sum()
    return np.concatenate([p * np.array([0.3, 0.7]), (1 - p) * fail])     # (N,)


def section_beyond(seeds: int, seed: int, exact_final: float):
    """Part H; exact_final: exact PMD's E[r] after CURVE_ITERS iterations (from section_curves)."""
    tau, Ks = TAU_SAMPLED, (8, 16)
    gen = torch.Generator().manual_seed(seed + 2)
    print(f"== H. Beyond the paper: the tempered (9a) and corrected (9b) baselines, τ = {tau}, leave-one-out ==")
    print("   population: b → its K → ∞ value, step (3) with r − b (= exact PMD for PMD-part and corrected);")
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
# Figures (matplotlib imported only here)


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


def make_chi2_cap_figure(path):
    """log(π_{t+1}/π_t) against x = (r − r̄)/τ: exact PMD's line against the Lambert-W curves of (3), (5b)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.linspace(-6.0, 10.0, 321)                                       # (321,) x = (r − b)/τ

    def log_u(c):
        # (3) with c = λ/τ, or (5b) with c = λ·|y|/τ:  log u = log W₀(c·e^x) − log c
        return _log_w_of_exp(math.log(c) + x) - math.log(c)               # (321,)

    fig, ax = plt.subplots(figsize=(8.4, 5.2))
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    ax.plot(x, x, color="k", lw=1.6, label=r"exact PMD (1): $\log u = x$, slope 1 (its normaliser shifts it down)")
    for c, col in ((0.1, "tab:blue"), (1.0, "tab:red")):
        extra = r" (= (5b) at $|y| = 1$)" if c == 0.1 else ""
        ax.plot(x, log_u(c), color=col, lw=2, label=rf"PMD-mean (3), $\lambda/\tau = {c:g}$" + extra)
    for n_tok, ls in ((2, "--"), (20, ":")):
        ax.plot(x, log_u(0.1 * n_tok), color="tab:blue", ls=ls, lw=1.6,
                label=rf"with lengths (5b), $\lambda/\tau = 0.1$, $|y| = {n_tok}$")
    ax.annotate("below the mean: $W_0(z) \\approx z$,\nso $\\log u \\approx x$, as in exact PMD",
                xy=(-3.5, -3.5), xytext=(-5.8, 1.2), fontsize=9, arrowprops=dict(arrowstyle="->", color="0.4"))
    ax.annotate("above the mean: $W_0(z) \\approx \\log z$, so\n"
                "$u \\approx (\\tau/\\lambda)\\,x$ grows linearly, not as $e^x$;\n"
                "a long response, $\\lambda|y|$ for $\\lambda$, even less",
                xy=(7.4, float(log_u(0.1)[x.searchsorted(7.4)])), xytext=(6.25, 4.55), fontsize=8.5,
                arrowprops=dict(arrowstyle="->", color="0.4"))
    ax.set(xlim=(-6, 10), ylim=(-6.2, 7.5),
           xlabel=r"$x = (r(y) - \bar r)\,/\,\tau$,  the response's advantage in units of $\tau$",
           ylabel=r"$\log u = \log\,\pi_{t+1}(y)\,/\,\pi_t(y)$",
           title=r"$\chi^2$ caps big increases: exact PMD multiplies $\pi_t(y)$ by $e^x$, "
                 r"PMD-mean by about $x\,\tau/\lambda$")
    ax.title.set_fontsize(10.5)
    ax.legend(fontsize=8.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="PMD-mean's implicit KL–χ² regulariser on a bandit.")
    # --- output
    ap.add_argument("--out", default=".",
                    help="directory for toy_bandit.png and chi2_cap.png (default: current directory)")
    ap.add_argument("--no-plot", action="store_true", help="skip the figures (and the matplotlib import)")
    # --- sampled runs
    ap.add_argument("--seeds", type=int, default=400, help="independent runs S in the sampled experiments")
    ap.add_argument("--seed", type=int, default=0, help="seed of the torch generator that draws the samples")
    def fail(message):                                                     # argparse's own errors: one sentence too
        raise ValueError(message)
    ap.error = fail
    try:
        args = ap.parse_args(argv)
    except ValueError as e:
        print(f"error: {e}.", file=sys.stderr)
        return 2
    # Every sampled experiment holds S policies at once; 10^8 seeds once ran a machine out of memory.
    if not 1 <= args.seeds <= 100_000:
        print(f"error: --seeds must be between 1 and 100000 (got {args.seeds}).", file=sys.stderr)
        return 2
    if not 0 <= args.seed < 2 ** 63:
        print(f"error: --seed must be in [0, 2**63) (got {args.seed}).", file=sys.stderr)
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
    section_exact_fit()
    section_lengths()
    runs = section_sampled(args.seeds, args.seed)
    curves = section_curves(args.seeds, args.seed, runs=runs)
    steps, _ = section_beyond(args.seeds, args.seed, curves["exact PMD"][-1])
    if not args.no_plot:
        path = os.path.join(args.out, "toy_bandit.png")
        make_figure(grid, binary_curves, curves, steps, path)
        cap = os.path.join(args.out, "chi2_cap.png")
        make_chi2_cap_figure(cap)
        print(f"figures: {path}, {cap}")
    print(f"done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
