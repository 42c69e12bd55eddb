"""
pmd_mean.py: PMD-mean, the policy-mirror-descent update used to post-train Kimi K1.5/K2, in one file.

Read this file top to bottom: it is the tutorial. `toy_bandit.py` shows the paper's main result on a
bandit; `train_math.py` runs this same code on a small LLM; `test_pmd_mean.py` checks every equation
below against an independent reference.

    python train_math.py                      # the tiny offline model on built-in arithmetic (CPU or GPU)
    python -m pytest -q                       # the tests (CPU, a few minutes)

Symbols and shapes (used in every shape comment below)
------------------------------------------------------
    P   prompts per step                 K   samples (responses) per prompt
    B   = P*K sequences                  T   tokens per padded sequence (prompt + response)
    Tp  prompt tokens (left-padded)      Tr  response tokens (right-padded), T = Tp + Tr
    V   vocabulary size (151,936 for Qwen2.5)       H  hidden size      N  response tokens in a batch
    r   reward in [0, 1]                 τ   (tau) KL coefficient, "temperature" of the mirror step
    b   baseline, the estimate of τ·log Z_t subtracted from r       A = r − b, the advantage
    Δ   = log π_θ(y|x) − log π_t(y|x), a sum over the response's tokens
    u   = π_{t+1}(y)/π_t(y), the likelihood ratio of a step          |y|  a response's length in tokens

1. Policy mirror descent (PMD)
------------------------------
For a prompt x, one PMD step solves

    π_{t+1} = argmax_π  E_{y~π}[r(y)] − τ·KL(π ‖ π_t)

whose closed form is  π_{t+1}(y) = π_t(y)·e^{r(y)/τ} / Z_t,  Z_t = E_{y~π_t}[e^{r(y)/τ}], hence

    τ·log(π_{t+1}(y)/π_t(y)) = r(y) − τ·log Z_t.                                            (1)

2. Fitting (1) by regression (Kimi K1.5, arXiv 2501.12599, Sec. 2.3.2)
---------------------------------------------------------------------
An LLM cannot be set to π_{t+1} directly. Kimi fits it by least squares in log-policy space on
samples from the current policy, with a baseline b standing in for τ·log Z_t:

    minimise_θ  E_{y~π_t} [ ( r(y) − b − τ·log(π_θ(y)/π_t(y)) )² ]                          (2)

With b = τ·log Z_t the minimiser is exactly (1). log π(y|x) of a response is the SUM of its token
log-probs (the chain rule), so Δ = log π_θ − log π_t is a sequence-level quantity.

3. The baseline b: two choices
------------------------------
τ·log Z_t is the log of an expectation under π_t, which we only see through K samples r_1..r_K:

    PMD-part ("partition"):  b = τ·log( (1/K)·Σ_j e^{r_j/τ} )   (a Monte-Carlo log-partition; biased
                                                                low by Jensen, and at small τ set by the
                                                                single best sample)
    PMD-mean:                b = (1/K)·Σ_j r_j                  (τ·log Z_t to first order for large τ)

In the leave-one-out forms sample i's baseline averages over the set S_i = {j ≠ i}, of n = K − 1
samples, so b_i does not depend on r_i. The reference implementation (OpenKimi, a fork of verl)
uses them (its `rloo` for the mean, `ploo` for the partition); so do we by default.

4. What PMD-mean actually solves (arXiv 2602.05933)
---------------------------------------------------
Take b = r̄ = E_{π_t}[r] and minimise (2) over normalised policies, i.e. over u ≥ 0 with
E_{π_t}[u] = 1. With a multiplier μ for that constraint, the derivative in u(y) vanishes where
π_t(y)·[−2τ·(r − r̄ − τ·log u)/u + μ] = 0. Call λ = μ/(2τ), the normaliser's multiplier rescaled:

    τ·log u + λ·u = r − r̄.                                                                 (3a)

With v = (λ/τ)·u this reads v·e^v = (λ/τ)·e^{(r−r̄)/τ}, so v = W₀(·), the principal Lambert W:

    π_{t+1}(y) = π_t(y) · (τ/λ) · W₀( (λ/τ)·e^{(r(y) − r̄)/τ} ),                             (3)

λ > 0 the one scalar that makes it sum to 1. Taking E_{π_t} of (3a), where E[u] = 1 and E[r − r̄] = 0:

    λ = −τ·E_{π_t}[log u] = τ·KL(π_t ‖ π_{t+1}).                                             (3b)

(3a) is also the stationarity condition of mirror descent with a mixed regulariser,

    π_{t+1} = argmax_π  E_π[r] − τ·KL(π ‖ π_t) − (λ/2)·χ²(π ‖ π_t),                          (4)

with Pearson's χ²(π ‖ π_t) = Σ_y π_t·(π/π_t − 1)², whose derivative in π(y) is 2·(u − 1): setting the
derivative of (4) to zero gives r − τ·(log u + 1) − λ·(u − 1) = const, which is (3a) once normalised.
(4) is strictly concave, so at the λ of (3b) both have one solution, the same: PMD-mean is PMD plus
an adaptive χ² penalty. The intuition is in W₀: W₀(x) ≈ x for small x and ≈ log x for large x. A
response below the mean gets u ≈ e^{(r−r̄)/τ}, scaled down as in exact PMD; one far above it grows
about linearly in (r − r̄)/τ instead of exponentially. The χ² caps big increases, so when few
responses succeed the step cannot move all the mass onto them at once (the README's first figure).
From K samples, PMD-mean's targets are unbiased with about half the spread of PMD-part's; on the
bandit that did not make sampled PMD-mean end higher (`toy_bandit.py`).

5. The loss we run, and its fixed point
---------------------------------------
With A = r − b the per-response loss of the reference code (OpenKimi's `opmd`) is

    L = 0.5·τ·(A/τ − Δ)² / |y|                                                             (5)

which is (2)'s squared error times 1/(2τ·|y|). The τ only rescales the gradient so that its size
does not depend on τ; the 1/|y| (OpenKimi's seq-mean-token-mean) weighs each response by the inverse
of its length, and that moves the fixed point. Redo (3a) with the weights: the population minimiser
of (5) satisfies

    τ·log u + λ·|y|·u = r − b,   i.e.   π_{t+1} = π_t·(τ/(λ·|y|))·W₀((λ·|y|/τ)·e^{(r−b)/τ}),   (5a)

with λ·E_{π_{t+1}}[|y|] = τ·KL(π_t‖π_{t+1}) − (b − r̄). It maximises E_π[r − λ·|y|] − τ·KL(π‖π_t) −
(λ/2)·Σ_y π_t·|y|·(u − 1)²: a length-weighted χ² and a cost of λ per token. At equal reward the
longer response gets the smaller u, so a long success grows less and a long failure shrinks more.
Only where every response has the same length is it (3). On a bandit with two successes of 2 and
20 tokens (`toy_bandit.py`, part E), the minimiser of (5) puts 0.649 and 0.266 on them where (3)
says 0.227 and 0.681. `PMDConfig.loss_norm = "sequence"` drops the 1/|y| and fits (2) itself,
0.5·τ·(A/τ − Δ)² per response, whose fixed point is (3).

The gradient of (5) is ∇L = −(A − τ·Δ)·∇log π_θ(y) / |y|. On the first update after sampling,
π_θ = π_t so Δ = 0 and

    ∇L = −A·∇log π_θ(y) / |y|                                                                (6)

which is length-normalised REINFORCE with baseline b. PMD departs from policy gradient only on the
second and later optimizer steps on the same rollouts, where the −τ·Δ term pulls the log-ratio
back towards its target A/τ instead of pushing it without limit: the regression has a fixed point.

6. The paper's training regime: many mini-batch steps per rollout batch
-----------------------------------------------------------------------
The paper's runs (OpenKimi) cut each rollout batch of P prompts × K samples into M mini-batches of
whole prompt groups and take one optimizer step on each, every one regressing against the SAME
sampling policy π_t and the SAME advantages, both computed once before the first step:

    for m = 1..M:   θ ← θ − η·∇_θ (1/|S_m|)·Σ_{i ∈ S_m} L_i(θ),   S_m the rows of mini-batch m   (7)

Only the first mini-batch sees Δ = 0; from the second on π_θ ≠ π_t (the earlier steps moved it), so
(5) differs from policy gradient on almost every step, and each expensive rollout batch buys M
optimizer steps. `PMDConfig.minibatches` is M, `updates_per_batch` repeats the whole pass.

7. The baselines we compare with: GRPO and GSPO
-----------------------------------------------
Both use the group z-score Â_i = (r_i − mean_j r_j)/std_j r_j. GRPO clips a ratio per TOKEN,
ρ_j = π_θ(y_j|·)/π_t(y_j|·) for the response's j-th token; GSPO (arXiv 2507.18071) clips one
length-normalised ratio per SEQUENCE,

    s_i = exp( (1/|y_i|)·Σ_j (log π_θ(y_j|·) − log π_t(y_j|·)) ) = (π_θ(y_i)/π_t(y_i))^{1/|y_i|}
    L_GSPO = −(1/B)·Σ_i min( s_i·Â_i, clip(s_i, 1 − ε_low, 1 + ε_high)·Â_i ),  ε = 3e-4, 4e-4     (8)

Neither has a fixed point: with Â > 0 they push the ratio up until the clip stops the gradient.
PMD's regression (5) instead pulls Δ to A/τ and then stops.

We also log the entropy of π_t over the response tokens, H = −Σ_v π_t(v|·)·log π_t(v|·), averaged
over tokens: the paper's figure tracks it, since a collapsing entropy means a collapsing search.

8. Where this code departs from the papers
------------------------------------------
  1. Log-probs are evaluated at temperature 1. Samples come from π_t only when `temperature == 1`
     and `top_p == 1` (the defaults); otherwise the regression targets a slightly different policy,
     as in most open implementations.
  2. Leave-one-out baselines by default (as OpenKimi), while the paper analyses the plain mean.
  3. The loss divides by |y| (eq. 5, OpenKimi's), whose fixed point is (5a), not the paper's (3);
     `loss_norm = "sequence"` runs (2) exactly.
  4. Mini-batches hold whole prompt groups, contiguous in the batch's (already shuffled) prompt
     order, the same split in every pass, as verl splits its prompt-major rows. The default is
     M = 4 and one pass; the paper's runs use M = 16 and one pass.
  5. The KL(π_t‖π_θ) and χ² weight we log are single-sample Monte-Carlo estimates over the batch,
     measured after the last optimizer step.
  6. Kimi K1.5 adds a length penalty; we do not. Its prompt filter by difficulty is available in
     OpenKimi's form, off by default (`reward_bounds`), and so is its optimizer reset every
     iteration (`reset_optimizer`, off as in OpenKimi).
  7. GRPO and GSPO (for comparison only) have no KL term and share every other line with PMD.
  8. Precision: the optimizer updates float32 weights, and the forward passes compute in
     `PMDConfig.dtype` (bfloat16 by autocast, or float32). The sampler draws from its own copy of
     the weights in that dtype, refreshed after every update, as inference engines do. Sampler and
     trainer therefore agree only up to rounding; `pmd_step` measures the gap on every batch and
     stops before any update when it is far beyond rounding (`sampler_gap`, the guard).

9. Beyond the paper
-------------------
Section 4 holds for any baseline b ≤ τ·log Z_t, with λ = τ·KL(π_t‖π_{t+1}) − (b − r̄): b sets the χ²
weight. Two baselines between PMD-mean and PMD-part, "tempered" (9a) and "corrected" (9b), are
derived in docs/BEYOND_THE_PAPER.md; `compute_baseline` implements them, and neither beat PMD-mean.

The plumbing under it (log-probs through the output layer in chunks, micro-batches in length
order) is in lm_utils.py. The rewards are the task's, not the algorithm's: `math_tasks.math_reward`
scores a response 1 if its final answer is right, else 0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from lm_utils import cache_arg, chunked_logprobs, eos_ids, is_checkpointing, left_align, micro_batches_by_length


# -----------------------------------------------------------------------------
# Configuration: every hyperparameter in one place


@dataclass
class PMDConfig:
    """All hyperparameters of one PMD iteration. The defaults are the tiny model's recipe
    (docs/EXPERIMENTS.md); `lr` is the one field no default fits."""

    # --- the algorithm
    tau: float = 1.0
    """τ, the KL coefficient: the targets A/τ are log-ratios of up to 1/τ nats per response."""
    samples_per_prompt: int = 8
    """K, responses per prompt: the baseline needs a group (K ≥ 2); more give a less noisy baseline."""
    baseline: str = "mean"
    """b: "mean" (PMD-mean), "partition" (PMD-part), or section 9's "tempered" and "corrected"."""
    baseline_tau: float | None = None
    """τ_b ≥ τ of the "tempered" baseline (None: 10·τ); the other baselines ignore it."""
    leave_one_out: bool = True
    """Exclude sample i from its own baseline, as OpenKimi does (b_i independent of r_i)."""
    loss: str = "pmd"
    """"pmd" (eq. 5), or for comparison "grpo" (token-ratio clip) or "gspo" (sequence-ratio clip, eq. 8)."""
    loss_norm: str = "token"
    """PMD only: "token" divides each response's loss by |y| (eq. 5, OpenKimi); "sequence" does not (eq. 2)."""
    clip_eps: float = 0.2
    """GRPO only: PPO clip range of the token ratio."""
    gspo_clip: tuple = (3e-4, 4e-4)
    """GSPO only: (ε_low, ε_high) of the sequence ratio, the GSPO paper's values."""
    reward_bounds: tuple | None = None
    """(lb, ub): groups whose mean reward is not strictly inside get weight 0 (Kimi's prompt filter)."""

    # --- optimisation
    updates_per_batch: int = 1
    """U, passes over the same rollouts; with M = U = 1 the one step is REINFORCE (eq. 6)."""
    minibatches: int = 4
    """M, optimizer steps per pass, each on whole prompt groups (eq. 7); M ≤ P. The paper: 16."""
    reset_optimizer: bool = False
    """Clear Adam's moments at every iteration, as Kimi K1.5 does (OpenKimi does not)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward; gradients accumulate over a mini-batch. Memory only."""
    lr: float = 1e-6
    """AdamW learning rate: it depends on the model (docs/EXPERIMENTS.md); 1e-6 is a usual start at 0.5B."""
    grad_clip: float = 1.0
    """Largest global gradient norm per optimizer step: guards against the rare huge step."""
    grad_checkpointing: bool = False
    """Recompute activations in backward: less memory, about 30% slower. Updates only."""
    dtype: str = "float32"
    """What the forward passes compute in, "float32" or "bfloat16" (autocast); the weights stay float32."""

    # --- sampling and measuring
    max_new_tokens: int = 256
    """Response budget in tokens; longer responses are cut (and flagged `truncated`)."""
    temperature: float = 1.0
    """Sampling temperature: 1 samples from π_t itself (departure 1), 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass: 1 samples from π_t itself (departure 1)."""
    logprob_chunk: int = 1024
    """Tokens per chunk of the output layer: bounds the (chunk, V) float32 logits in memory."""
    measure_kl: bool = True
    """After the updates, one more no-grad pass for the KL, χ² weight and residual metrics."""
    max_sampler_gap: float = 0.25
    """The guard: the largest mean |log π_t sampler − trainer| per response token, in nats (docs/SPEED.md)."""
    max_sampler_gap_token: float = 5.0
    """The guard's bound on any one token, which catches a broken row that the mean would dilute."""

    def __post_init__(self):
        # Bad values end with one clear sentence (the scripts turn ValueError into exit code 2).
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
        if not (finite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0 (got {self.tau}): it divides the advantage.")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (got {self.samples_per_prompt}): "
                             "the baseline needs a group.")
        if self.baseline not in ("mean", "partition", "tempered", "corrected"):
            raise ValueError(f"baseline must be 'mean', 'partition', 'tempered' or 'corrected' (got {self.baseline!r}).")
        if self.baseline == "tempered" and self.baseline_tau is None:
            self.baseline_tau = 10 * self.tau
        if self.baseline_tau is not None and not (finite(self.baseline_tau) and self.baseline_tau >= self.tau):
            raise ValueError(f"baseline_tau must be a finite number >= tau = {self.tau} (got {self.baseline_tau}): "
                             "below τ the baseline exceeds τ·log Z_t and the implied χ² weight turns negative.")
        if self.baseline == "corrected" and self.samples_per_prompt < 3:
            raise ValueError("the corrected baseline needs samples_per_prompt >= 3 (a variance over the others).")
        if self.loss not in ("pmd", "grpo", "gspo"):
            raise ValueError(f"loss must be 'pmd', 'grpo' or 'gspo' (got {self.loss!r}).")
        if self.loss_norm not in ("token", "sequence"):
            raise ValueError(f"loss_norm must be 'token' or 'sequence' (got {self.loss_norm!r}).")
        if self.loss_norm != "token" and self.loss != "pmd":
            raise ValueError(f"loss_norm {self.loss_norm!r} applies to the PMD loss only (this is {self.loss!r}).")
        if self.minibatches < 1:
            raise ValueError(f"minibatches must be >= 1 (got {self.minibatches}).")
        if self.reward_bounds is not None and not self.reward_bounds[0] < self.reward_bounds[1]:
            raise ValueError(f"reward_bounds must be (lb, ub) with lb < ub (got {tuple(self.reward_bounds)}).")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0 (got {self.max_new_tokens}).")
        if self.updates_per_batch < 1 or self.micro_batch_size < 1 or self.logprob_chunk < 1:
            raise ValueError("updates_per_batch, micro_batch_size and logprob_chunk must be >= 1.")
        if not (finite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"lr must be a finite number in (0, 1] (got {self.lr}).")
        if not (finite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be a finite number > 0 (got {self.grad_clip}).")
        # A temperature of 1e-300 overflows the logits (z/T = inf) and every sample becomes garbage.
        if not (self.temperature == 0 or (finite(self.temperature) and 1e-2 <= self.temperature <= 100)):
            raise ValueError(f"temperature must be 0 (greedy) or between 0.01 and 100 (got {self.temperature}).")
        if not (finite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p}).")
        if not (self.max_sampler_gap > 0 and self.max_sampler_gap_token > 0):
            raise ValueError("max_sampler_gap and max_sampler_gap_token must be > 0.")
        if self.dtype == "float16":
            raise ValueError("dtype float16 is not supported: its 5-bit exponent underflows small gradients "
                             "without loss scaling, which this code does not do; use bfloat16 or float32.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16' (got {self.dtype!r}).")


# The algorithms train_math.py and pmd_trl.py run by name (--algo): the PMDConfig fields each one sets.
ALGORITHMS = {
    "pmd-mean": dict(baseline="mean", loss="pmd"),
    "pmd-part": dict(baseline="partition", loss="pmd"),
    "pmd-tempered": dict(baseline="tempered", loss="pmd"),
    "pmd-corrected": dict(baseline="corrected", loss="pmd"),
    "grpo": dict(baseline="mean", loss="grpo"),
    "gspo": dict(baseline="mean", loss="gspo"),
}


# -----------------------------------------------------------------------------
# The PMD part: baselines and losses (pure tensor functions)


def compute_baseline(rewards: torch.Tensor, tau: float, kind: str = "mean",
                     leave_one_out: bool = True, baseline_tau: float | None = None) -> torch.Tensor:
    """Baselines b for rewards shaped (P, K); returns (P, K). See sections 3 and 9 of the docstring."""
    P, K = rewards.shape
    if leave_one_out and K < 2:
        raise ValueError("a leave-one-out baseline needs K >= 2 samples per prompt")
    r = rewards.double()                                                   # (P, K), float64 for small τ
    r_rows = r.unsqueeze(1).expand(P, K, K)                                # (P, K, K): [p, i, j] = r_pj
    # Row i of the (K, K) matrix `others` selects the samples S_i in sample i's baseline: j ≠ i for
    # leave-one-out. We sum over the selection instead of computing (Σ_j r_j − r_i): inside a
    # log-sum-exp the subtraction overflows for small τ (e^{1/0.01}), and inf − inf = nan.
    others = torch.ones(K, K, dtype=torch.bool, device=r.device)          # (K, K)
    if leave_one_out:
        others &= ~torch.eye(K, dtype=torch.bool, device=r.device)
    n = K - 1 if leave_one_out else K                                      # |S_i|

    def log_mean_exp(z):                                                   # (P, K, K) → (P, K), over S_i
        return torch.logsumexp(z.masked_fill(~others, float("-inf")), dim=-1) - math.log(n)

    if kind == "mean":
        # b_i = (1/n)·Σ_{j ∈ S_i} r_j                                      (PMD-mean)
        b = (r_rows * others).sum(-1) / n                                  # (P, K)
    elif kind == "partition":
        # b_i = τ·log( (1/n)·Σ_{j ∈ S_i} e^{r_j/τ} )                       (PMD-part)
        b = tau * log_mean_exp(r_rows / tau)                               # (P, K)
    elif kind == "tempered":
        # b_i = τ_b·log( (1/n)·Σ_{j ∈ S_i} e^{r_j/τ_b} ),  τ_b = baseline_tau    (eq. 9a)
        if baseline_tau is None or not baseline_tau > 0:
            raise ValueError(f"the tempered baseline needs baseline_tau > 0 (got {baseline_tau}).")
        b = baseline_tau * log_mean_exp(r_rows / baseline_tau)             # (P, K)
    elif kind == "corrected":
        # b_i = τ·[ log Ẑ_i + (1/(2(n−1)))·( mean_{S_i}(w²)/Ẑ_i² − 1 ) ],  w = e^{r/τ}, Ẑ_i = mean_{S_i} w   (eq. 9b)
        if n < 2:
            raise ValueError("the corrected baseline needs at least 2 samples in each baseline (K >= 3 leave-one-out).")
        log_z = log_mean_exp(r_rows / tau)                                 # (P, K) log Ẑ_i
        ratio = torch.exp(log_mean_exp(2 * r_rows / tau) - 2 * log_z)      # (P, K) mean(w²)/Ẑ², in [1, n]
        b = tau * (log_z + (ratio - 1) / (2 * (n - 1)))                    # (P, K)
    else:
        raise ValueError(f"unknown baseline kind {kind!r} (use 'mean', 'partition', 'tempered' or 'corrected')")
    return b.to(rewards.dtype)


def pmd_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
             tau: float, lengths: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (5): mean over sequences of 0.5·τ·(A/τ − Δ)²/|y|. All inputs (B,); returns a scalar.

    This is OpenKimi's `opmd` policy loss with seq-mean-token-mean aggregation: the per-token loss
    is the sequence's squared residual spread evenly over its |y| tokens, averaged per sequence,
    then over sequences. Lengths of 1 give the paper's regression (2) (`loss_norm = "sequence"`).
    The loss VALUE means little (it is a regression residual, not a reward); watch reward, accuracy
    and KL instead. `weights` (B,), optional: per-sequence weights (the group filter); the mean
    still divides by B, as OpenKimi's `partition_weights` do.
    """
    # Δ = log π_θ(y) − log π_t(y), a sum over the response tokens
    delta = logp - logp_old                                                # (B,)
    # L_i = 0.5·τ·(A_i/τ − Δ_i)² / |y_i|
    per_seq = 0.5 * tau * (advantages / tau - delta) ** 2 / lengths        # (B,)
    if weights is not None:
        per_seq = per_seq * weights                                        # (B,)
    return per_seq.mean()


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group z-score, (r − mean)/(std + eps) within each prompt's group. (P, K) → (P, K)."""
    mean = rewards.mean(dim=1, keepdim=True)                               # (P, 1)
    std = rewards.std(dim=1, keepdim=True)                                 # (P, 1), unbiased as in GRPO
    return (rewards - mean) / (std + eps)


def grpo_loss(logp_tok: torch.Tensor, logp_old_tok: torch.Tensor, advantages: torch.Tensor,
              response_mask: torch.Tensor, clip_eps: float = 0.2) -> torch.Tensor:
    """GRPO's clipped surrogate (no KL term), aggregated seq-mean-token-mean like `pmd_loss`.

    logp_tok, logp_old_tok, response_mask: (B, T) token log-probs (0 outside the response);
    advantages: (B,) group z-scored rewards (`grpo_advantages`). Returns a scalar.
    """
    mask = response_mask.to(logp_tok.dtype)                                # (B, T)
    # ρ = π_θ(y_j | y_<j) / π_t(y_j | y_<j), one ratio per token
    ratio = torch.exp((logp_tok - logp_old_tok) * mask)                    # (B, T)
    A = advantages.unsqueeze(1)                                            # (B, 1)
    # per-token loss −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A)
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # (B, T)
    per_seq = -(surrogate * mask).sum(-1) / mask.sum(-1).clamp(min=1)      # (B,)
    return per_seq.mean()


def gspo_loss(logp_tok: torch.Tensor, logp_old_tok: torch.Tensor, advantages: torch.Tensor,
              response_mask: torch.Tensor, clip_low: float = 3e-4, clip_high: float = 4e-4) -> torch.Tensor:
    """GSPO's clipped surrogate, eq. (8): one length-normalised ratio per SEQUENCE, clipped.

    Same inputs as `grpo_loss`. The clip range is tiny (3e-4, 4e-4) because s_i is a per-token
    geometric mean: one sequence-level ratio of 1.0004 is a whole response moved by 0.04% per token.
    """
    mask = response_mask.to(logp_tok.dtype)                                # (B, T)
    n_tok = mask.sum(-1).clamp(min=1)                                      # (B,) |y_i|
    # s_i = exp( (1/|y_i|)·Σ_j (log π_θ − log π_t) ), the sequence ratio's |y_i|-th root
    s = torch.exp(((logp_tok - logp_old_tok) * mask).sum(-1) / n_tok)      # (B,)
    # per-sequence loss −min(s·Â, clip(s, 1−ε_low, 1+ε_high)·Â), then the mean over sequences
    surrogate = torch.minimum(s * advantages, s.clamp(1 - clip_low, 1 + clip_high) * advantages)  # (B,)
    return -surrogate.mean()


# -----------------------------------------------------------------------------
# Log-probabilities of responses under a causal LM


def compute_precision(device: torch.device | str, cfg: PMDConfig):
    """The context every forward pass runs in: autocast to `cfg.dtype`, or nothing for float32.

    Autocast computes matmuls in bfloat16 from float32 weights, so the optimizer keeps updating
    float32 weights. Trap: bfloat16 weights would lose the update itself. bfloat16 keeps 8
    significant bits, so a weight w changes only if its step exceeds half a unit in its last place,
    between |w|/512 and |w|/256: an AdamW step, about lr, rounds away on every weight larger than
    about 256·lr (2.6e-4 at lr = 1e-6, which is most of a pretrained model's weights).
    """
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, cfg.dtype))


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that follow the attention mask, exactly as HF `generate` computes them.

    A left-padded row [pad, pad, a, b] gets positions [0, 0, 0, 1]: real tokens are numbered from
    0 whatever the padding, so sampling (which sees the same rule) and training agree.
    """
    pos = attention_mask.long().cumsum(-1) - 1                             # (B, T)
    return pos.masked_fill(attention_mask == 0, 0)                         # (B, T)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   response_mask: torch.Tensor, chunk: int = 1024, entropy: bool = False):
    """Log-prob of every response token, (B, T), 0 at prompt and padding positions.

    With `entropy=True` returns (log-probs, entropies): the second (B, T) holds the entropy of the
    next-token distribution that predicted each response token, from the same logits (no extra
    forward pass, never a (B, T, V) tensor) and without gradient.

    Memory trap: the full (B, T, V) log-softmax in float32 is 4·B·T·V bytes: 60 GB for 512 × 384
    tokens of Qwen2.5 (V = 151,936). We run the transformer body once, keep only the hidden states of
    positions that predict a response token, and push them through the output layer `chunk` rows at
    a time (`lm_utils.chunked_logprobs`).

    Each row's real tokens (attention_mask 1) must be contiguous, as in `Rollouts`: left padding,
    prompt, response, right padding.
    """
    B, T = input_ids.shape
    body = model.base_model                                                # the transformer without lm_head
    lm_head = model.get_output_embeddings()                                # (H → V) linear layer
    # Speed: the body runs on the rows shifted left to start at column 0 and cut to the longest row's
    # real tokens (`left_align`); positions come from the mask, so nothing changes but rounding.
    ids, real, resp = left_align(input_ids, attention_mask, response_mask)  # (B, W) each
    hidden = body(input_ids=ids, attention_mask=real.long(), position_ids=_position_ids(real.long()),
                  use_cache=False).last_hidden_state                       # (B, W, H)
    # Token j is predicted by the hidden state at j−1. Mask rule: a position counts iff the token it
    # predicts is a response token (prompt tokens and padding never count; the final EOS does).
    predicts_response = resp[:, 1:]                                        # (B, W−1)
    h = hidden[:, :-1][predicts_response]                                  # (N, H)
    targets = ids[:, 1:][predicts_response]                                # (N,)
    logp, ent = chunked_logprobs(lm_head, h, targets, chunk, entropy)     # (N,), (N,) or None

    def to_layout(flat):                                                   # (N,) → (B, T), the input's layout
        out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
        out[:, 1:] = out[:, 1:].masked_scatter(response_mask[:, 1:].bool(), flat)  # differentiable scatter
        return out

    return (to_layout(logp), to_layout(ent)) if entropy else to_layout(logp)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log π(y|x) = Σ_j log π(y_j | x, y_<j) over response tokens: (B, T) inputs → (B,)."""
    return token_logprobs(model, input_ids, attention_mask, response_mask, chunk).sum(-1)


# -----------------------------------------------------------------------------
# Rollouts: K samples per prompt from the current policy π_t


@dataclass
class Rollouts:
    """A batch of B = P*K sampled responses, prompt-major: row p*K + k is sample k of prompt p."""

    input_ids: torch.Tensor       # (B, T) [left-padded prompt | response, right-padded], T = Tp + Tr
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt tokens and response tokens up to its EOS
    response_mask: torch.Tensor   # (B, T) 1 on response tokens, the EOS that ends it included
    response_lengths: torch.Tensor  # (B,) |y|, EOS included
    finished: torch.Tensor        # (B,) bool: ended with an EOS token
    truncated: torch.Tensor       # (B,) bool: hit max_new_tokens without an EOS
    completions: list = field(default_factory=list)  # B decoded responses (special tokens removed)
    prompt_len: int = 0           # Tp
    # What the sampler saw, from the logits it drew with (no extra pass); 0 off the response mask.
    # None where the rollouts did not come from `sample_rollouts`.
    logprobs: torch.Tensor | None = None         # (B, T) log-prob of each token under the distribution
                                                 #   it was drawn from (temperature, top-p; 0 if greedy)
    policy_logprobs: torch.Tensor | None = None  # (B, T) log π_t of each token at temperature 1: what
                                                 #   the trainer recomputes (`pmd_step`'s guard)


def sampler_copy(model, cfg: PMDConfig):
    """The weights the sampler draws with: the model itself in float32, else a copy in `cfg.dtype`.

    Sampling is a long loop of small forward passes, and autocast would cast every float32 weight
    again at every step; inference engines instead keep a low-precision copy of the weights. The
    copy must follow the trained weights: call `refresh_sampler` after every update. A stale copy
    samples from an older policy, which is what `pmd_step`'s guard (`sampler_gap`) exists to catch.
    """
    if cfg.dtype == "float32":
        return model
    sampler = copy.deepcopy(model).to(getattr(torch, cfg.dtype)).eval()
    sampler.requires_grad_(False)
    return sampler


@torch.no_grad()
def refresh_sampler(sampler, model) -> None:
    """Copy the trained float32 weights into the sampler's copy, rounding to its dtype."""
    if sampler is model:
        return
    for (name, s), (name_m, p) in zip(sampler.named_parameters(), model.named_parameters()):
        assert name == name_m, f"the sampler's weights ({name}) do not line up with the model's ({name_m})"
        s.copy_(p)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from softmax(logits/temperature), nucleus-truncated: (B, V) → (B,), (B,).

    Returns the tokens and the log-probability of each under the distribution it was drawn from
    (temperature and nucleus applied; 0 for greedy, a point mass).
    """
    if temperature == 0:
        return logits.argmax(-1), logits.new_zeros(logits.shape[0], dtype=torch.float32)  # greedy
    logits = logits.float() / temperature                                  # (B, V)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)        # (B, V)
        p_sorted = sorted_logits.softmax(-1)                               # (B, V)
        # drop a token if the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (p_sorted.cumsum(-1) - p_sorted) >= top_p            # (B, V)
        drop = drop_sorted.scatter(-1, order, drop_sorted)                 # (B, V) back in vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    # Exponential race: with E_v ~ Exp(1), argmax_v p_v/E_v is a draw from p = softmax(z), because
    # E_v/p_v ~ Exp(p_v) and the smallest of independent exponentials is v with probability p_v/Σp.
    # softmax's normaliser is one constant per row, so argmax_v p_v/E_v = argmax_v (z_v − log E_v)
    # (the Gumbel-max trick): no softmax is needed. Same distribution as torch.multinomial, fewer
    # passes over the (B, V) logits, and no CPU synchronisation.
    tok = (logits - torch.empty_like(logits).exponential_().log_()).argmax(-1)  # (B,)
    # log p(tok) = z_tok − log Σ_v e^{z_v}, for the sampling-vs-training guard (`pmd_step`)
    return tok, logits.gather(1, tok.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, -1)  # (B,), (B,)


@torch.no_grad()
def sample_rollouts(model, tokenizer, prompts: list[str], k: int, cfg: PMDConfig) -> Rollouts:
    """K samples for each of P prompts from π_t (at `cfg.temperature`, `cfg.top_p`).

    A plain decode loop on transformers' own KV cache, which also handles sliding-window and hybrid
    layers. One trick: each prompt runs through the model once, and its keys and values are then
    repeated K times in the cache, instead of running K copies of it. We check "all rows ended?"
    only every 16 steps, since on a GPU each check is a GPU→CPU synchronisation.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    eos = torch.tensor(eos_ids(model, tokenizer), device=device)          # (n_eos,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = enc["input_ids"].to(device)                               # (P, Tp)
    prompt_mask = enc["attention_mask"].to(device)                         # (P, Tp)
    P, Tp = prompt_ids.shape
    B = P * k

    tokens = torch.full((B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, Tr_max)
    # log-probs of the drawn tokens, for the guard in `pmd_step`: under the distribution drawn from,
    # and under π_t itself (temperature 1), which are one tensor when the two are the same
    drawn_lp = torch.zeros(B, cfg.max_new_tokens, dtype=torch.float32, device=device)  # (B, Tr_max)
    policy_lp = drawn_lp if cfg.temperature == 1 and cfg.top_p == 1 else torch.zeros_like(drawn_lp)
    finished = torch.zeros(B, dtype=torch.bool, device=device)             # (B,)
    lengths = torch.zeros(B, dtype=torch.long, device=device)              # (B,)
    was_training = model.training
    model.eval()                       # no dropout, and no activation checkpointing (which skips the cache)
    try:
        # Prefill once, repeat K times: row p*K + j of the cache and the logits ← prompt p.
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=_position_ids(prompt_mask),
                    use_cache=True, logits_to_keep=1, **{cache_arg(model): cache})
        cache.batch_repeat_interleave(k)
        logits = out.logits[:, -1].repeat_interleave(k, dim=0)             # (B, V)
        mask = prompt_mask.repeat_interleave(k, dim=0)                     # (B, Tp) grows by a column a step
        position = mask.sum(-1, keepdim=True)                              # (B, 1) of the next token
        steps = 0
        for j in range(cfg.max_new_tokens):
            tok, lp = sample_next_token(logits, cfg.temperature, cfg.top_p)  # (B,), (B,)
            tok = torch.where(finished, torch.full_like(tok, pad_id), tok)  # ended rows get padding
            tokens[:, j] = tok
            drawn_lp[:, j] = lp
            if policy_lp is not drawn_lp:                                  # log softmax(z)[tok], temperature 1
                z = logits.float()                                         # (B, V)
                policy_lp[:, j] = z.gather(1, tok.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, -1)
            lengths += (~finished).long()                                  # the EOS itself is counted
            finished |= torch.isin(tok, eos)
            steps = j + 1
            if j + 1 == cfg.max_new_tokens or ((j + 1) % 16 == 0 and bool(finished.all())):
                break
            # feed the token just drawn: one new cache column per row, visible to every row (an ended
            # row's padding is never read: its response mask stops at its EOS)
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)           # (B, Tp + j + 1)
            out = model(input_ids=tok.unsqueeze(1), attention_mask=mask, position_ids=position,
                        use_cache=True, **{cache_arg(model): cache})
            logits = out.logits[:, -1]                                     # (B, V)
            position = position + 1
    finally:
        model.train(was_training)

    tokens = tokens[:, :steps]                                             # (B, Tr)
    Tr = tokens.shape[1]
    resp_mask = torch.arange(Tr, device=device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, Tr)
    # Trap: the response mask comes from lengths, never from comparing ids with pad_id. When pad == EOS
    # (most instruct models) a comparison would drop the EOS that ends the response, and the model
    # would never learn to stop.
    input_ids = torch.cat([prompt_ids.repeat_interleave(k, dim=0), tokens], dim=1)       # (B, T)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), resp_mask.long()], dim=1)  # (B, T)
    response_mask = torch.cat([torch.zeros_like(prompt_mask).repeat_interleave(k, dim=0),
                               resp_mask.long()], dim=1)                   # (B, T)
    completions = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens.cpu(), lengths.cpu())],
                                         skip_special_tokens=True)

    def in_layout(lp):                                                     # (B, Tr_max) → (B, T), 0 off the response
        return torch.cat([torch.zeros(B, Tp, device=device), lp[:, :Tr] * resp_mask], dim=1)

    logprobs = in_layout(drawn_lp)                                         # (B, T)
    return Rollouts(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                    response_lengths=lengths, finished=finished, truncated=~finished,
                    completions=completions, prompt_len=Tp, logprobs=logprobs,
                    policy_logprobs=logprobs if policy_lp is drawn_lp else in_layout(policy_lp))


# -----------------------------------------------------------------------------
# One PMD iteration: log π_t once, the guard, the advantages, then U × M regression steps


class SamplerMismatch(ValueError):
    """The sampler drew from a distribution that is not the one the trainer computes."""


def sampler_gap(rollouts: Rollouts, logp_old_tok: torch.Tensor) -> tuple[float, float] | None:
    """(mean, max) over response tokens of |log π_t(y_j) as the trainer computes it − as the sampler
    drew it| in nats, or None for rollouts that did not come from `sample_rollouts`.

    Sampling (a cached decode step, on the sampler's copy of the weights) and training (a full
    forward pass) compute the same π_t with different kernels, so they agree only up to rounding. A
    gap far beyond rounding means the sampler drew from another policy (a wrong mask, wrong positions,
    stale weights) and the regression would fit responses π_t never produced ("train–inference
    mismatch"). The sampler's temperature-1 log-probs are compared, whatever temperature it drew at."""
    if rollouts.policy_logprobs is None:
        return None
    resp = rollouts.response_mask.bool()                                   # (B, T)
    if not bool(resp.any()):
        return 0.0, 0.0
    gap = (logp_old_tok - rollouts.policy_logprobs)[resp].abs()           # (N,) one per response token
    return float(gap.mean()), float(gap.max())


class Advantages(NamedTuple):
    """What `compute_advantages` returns, each (B,)."""
    for_loss: torch.Tensor        # what the loss regresses on: A for PMD, the filtered z-score Â·w for GRPO/GSPO
    pmd: torch.Tensor             # A = r − b, PMD's advantage whatever the loss (for the metrics)
    weights: torch.Tensor         # 1, or 0 for the rows of a group the filter drops (`reward_bounds`)


def compute_advantages(r: torch.Tensor, cfg: PMDConfig) -> Advantages:
    """Rewards (P, K) → `Advantages`, each (B,).

    The group filter (`cfg.reward_bounds`) gives weight w_p = 1 iff lb < mean_k r_pk < ub, else 0.
    For GRPO and GSPO a zero advantage already means zero loss and zero gradient, so w·Â is the
    filter; PMD's loss needs the weight (a group with A = 0 still anchors Δ, see `pmd_step`).
    """
    P, K = r.shape
    # A = r − b, b ≈ τ·log Z_t (PMD-mean: the group mean; PMD-part: τ·log-mean-exp)
    b = compute_baseline(r, cfg.tau, cfg.baseline, cfg.leave_one_out, cfg.baseline_tau)  # (P, K)
    adv_pmd = (r - b).reshape(P * K)                                       # (B,)
    keep = torch.ones(P, dtype=torch.bool, device=r.device)                # (P,)
    if cfg.reward_bounds is not None:
        lb, ub = cfg.reward_bounds
        keep = (r.mean(1) > lb) & (r.mean(1) < ub)                          # (P,)
    weights = keep.float().repeat_interleave(K)                            # (B,)
    if cfg.loss == "pmd":
        return Advantages(adv_pmd, adv_pmd, weights)
    return Advantages(grpo_advantages(r).reshape(P * K) * weights, adv_pmd, weights)


def minibatch_rows(P: int, K: int, M: int) -> list[torch.Tensor]:
    """Row indices of M disjoint mini-batches (one optimizer step each) of whole prompt groups.

    Whole groups, not shuffled rows: a group's rows share one baseline and one filter weight, so a
    mini-batch then holds complete regression problems, and it is what verl does with its
    prompt-major rows (the prompts are already in a seeded random order). P need not divide by M:
    the sizes then differ by one group.
    """
    groups = torch.arange(P).tensor_split(M)                               # M × (P_m,) prompt indices
    return [(g.unsqueeze(1) * K + torch.arange(K)).flatten() for g in groups]  # M × (P_m·K,) rows


def policy_loss(lp_tok: torch.Tensor, old_tok: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor,
                response_mask: torch.Tensor, lengths: torch.Tensor, cfg: PMDConfig) -> torch.Tensor:
    """The loss of `cfg.loss` on b rows: token log-probs (b, T) now and under π_t, the rest (b,)."""
    if cfg.loss == "pmd":                                                  # eq. (5), or (2) unnormalised
        norm = lengths if cfg.loss_norm == "token" else torch.ones_like(lengths)
        return pmd_loss(lp_tok.sum(-1), old_tok.sum(-1), adv, cfg.tau, norm, weights)
    if cfg.loss == "grpo":
        return grpo_loss(lp_tok, old_tok, adv, response_mask, cfg.clip_eps)
    return gspo_loss(lp_tok, old_tok, adv, response_mask, *cfg.gspo_clip)


def rollout_logprobs(model, rollouts: Rollouts, micro_batches: list, cfg: PMDConfig, entropy: bool = False):
    """Token log-probs (B, T) of every rollout under the model's weights as they are now: no graph,
    eval mode. Before the first optimizer step that is log π_t, the policy that sampled the
    rollouts (with `entropy`, also its per-token entropies (B, T)); after the last, log π_θ."""
    R = rollouts
    out = torch.zeros(R.input_ids.shape, dtype=torch.float32, device=R.input_ids.device)  # (B, T)
    ent = torch.zeros_like(out)                                            # (B, T)
    was_training = model.training
    model.eval()
    with torch.no_grad(), compute_precision(R.input_ids.device, cfg):
        for rows in micro_batches:
            res = token_logprobs(model, R.input_ids[rows], R.attention_mask[rows], R.response_mask[rows],
                                 cfg.logprob_chunk, entropy=entropy)
            if entropy:
                out[rows], ent[rows] = res
            else:
                out[rows] = res
    model.train(was_training)
    return (out, ent) if entropy else out


def optimizer_step(model, optimizer, rollouts: Rollouts, micro_batches: list, logp_old_tok: torch.Tensor,
                   adv: Advantages, cfg: PMDConfig) -> tuple[float, float]:
    """One optimizer step on one mini-batch, gradients accumulated over its micro-batches.
    Returns (loss, gradient norm); raises FloatingPointError, weights untouched, if either is not finite."""
    R, params = rollouts, [p for p in model.parameters() if p.requires_grad]
    lengths = R.response_lengths.clamp(min=1).float()                      # (B,) |y|
    n_rows = sum(len(rows) for rows in micro_batches)                      # rows in this mini-batch
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=R.input_ids.device)
    # Trap: autocast caches each weight's bfloat16 cast until its context exits, so a context that
    # spans an optimizer step keeps computing with the weights from before the step. One per step.
    with compute_precision(R.input_ids.device, cfg):
        for rows in micro_batches:
            lp_tok = token_logprobs(model, R.input_ids[rows], R.attention_mask[rows], R.response_mask[rows],
                                    cfg.logprob_chunk)                     # (b, T) log π_θ, with graph
            loss = policy_loss(lp_tok, logp_old_tok[rows], adv.for_loss[rows], adv.weights[rows],
                               R.response_mask[rows], lengths[rows], cfg)
            loss = loss * (len(rows) / n_rows)                             # micro-batches sum to the mini-batch mean
            loss.backward()
            total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if not (torch.isfinite(total) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss {float(total)}, grad norm {float(grad_norm)}")
    optimizer.step()
    return float(total), float(grad_norm)


def step_metrics(R: Rollouts, r: torch.Tensor, weights: torch.Tensor, entropy_tok: torch.Tensor,
                 losses: list, grad_norms: list, gap: tuple | None) -> dict:
    """What one iteration did, measured on its rollouts (the metrics are defined in docs/GLOSSARY.md)."""
    resp = R.response_mask.bool()                                          # (B, T)
    metrics = {
        "loss": sum(losses) / len(losses),
        "reward": float(r.mean()),
        "all_equal_share": float((r == r[:, :1]).all(dim=1).float().mean()),  # groups with one reward
        "filtered_share": float(1 - weights.mean()),                       # rows given weight 0 by the filter
        "optimizer_steps": len(losses),
        # mean per-token entropy of π_t over the response tokens, H = −Σ_v p_v·log p_v (nats)
        "entropy": float(entropy_tok[resp].mean()) if bool(resp.any()) else 0.0,
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "response_length": float(R.response_lengths.float().mean()),
        "truncated_share": float(R.truncated.float().mean()),
    }
    if gap is not None:                                                    # |log π_t trainer − sampler|, nats/token
        metrics.update(sampler_gap_mean=gap[0], sampler_gap_max=gap[1])
    return metrics


def kl_metrics(logp_old: torch.Tensor, logp_new: torch.Tensor, adv_pmd: torch.Tensor, cfg: PMDConfig) -> dict:
    """How far π_θ moved from π_t on these samples, after the last step. Inputs (B,)."""
    delta = logp_new - logp_old                                            # (B,) Δ
    # KL(π_t ‖ π_θ) = E_{y~π_t}[log π_t(y) − log π_θ(y)] ≈ mean_i(−Δ_i)  (y_i ~ π_t)
    kl = float((-delta).mean())
    metrics = {"kl": kl, "tau_kl": cfg.tau * kl}
    if cfg.loss == "pmd":
        residual = adv_pmd / cfg.tau - delta                               # (B,) A/τ − Δ, nats per response
        metrics.update({
            # the regression's residual: its mean and RMS (the fit's quality)
            "residual": float(residual.mean()),
            "residual_rms": float(residual.pow(2).mean().sqrt()),
            # The implied χ² weight. E_{π_t} of (3a) with any baseline gives λ = E[r − b − τ·log u],
            # τ times the mean residual: τ·KL(π_t‖π_{t+1}) − (b − r̄). With loss_norm "token" the
            # χ² is length-weighted (5a) and the same expectation is λ·E_{π_{t+1}}[|y|].
            "chi2_weight": cfg.tau * float(residual.mean()),
        })
    return metrics


@contextlib.contextmanager
def _clock(metrics: dict, key: str, device):
    """metrics[key] = seconds spent inside the block (the GPU drained before reading the clock)."""
    t0 = time.perf_counter()
    yield
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    metrics[key] = time.perf_counter() - t0


def pmd_step(model, optimizer, rollouts: Rollouts, rewards, cfg: PMDConfig) -> dict:
    """One PMD iteration on sampled rollouts. rewards: B floats, prompt-major. Returns metrics.

    Four steps: (1) log π_t in one no-grad pass; (2) the guard, that the sampler drew from it;
    (3) the advantages; (4) updates_per_batch passes, each cut into M mini-batches of whole prompt
    groups with one optimizer step each (eq. 7), all regressing on the same log π_t and advantages.
    The learning rate is whatever the caller set on the optimizer. With the group filter each
    mini-batch's mean still divides by all its rows, and for PMD it is not free: a group with A = 0
    still contributes 0.5·τ·Δ²/|y|, a KL-like anchor that pulls its Δ back to 0 once earlier steps
    have moved it; dropping the group drops the anchor.

    Raises SamplerMismatch (the guard) or FloatingPointError, both before touching the weights.
    """
    device, R, timings = rollouts.input_ids.device, rollouts, {}
    B, K, M = R.input_ids.shape[0], cfg.samples_per_prompt, cfg.minibatches
    if B % K:
        raise ValueError(f"batch of {B} rollouts is not a whole number of groups of K={K}")
    P = B // K
    if M > P:
        raise ValueError(f"cannot split {P} prompt groups into {M} mini-batches (minibatches must be <= prompts)")
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        raise ValueError("pmd_step trains float32 weights only (bfloat16 weights round small AdamW steps away): "
                         "load the model in float32 and set PMDConfig.dtype to compute in bfloat16.")
    r = torch.as_tensor(rewards, dtype=torch.float32, device=device).reshape(P, K)  # (P, K)
    whole_batch = micro_batches_by_length(R, cfg.micro_batch_size)                  # for the no-grad passes
    per_step = [micro_batches_by_length(R, cfg.micro_batch_size, rows) for rows in minibatch_rows(P, K, M)]

    # (1) log π_t(y_j): the policy that sampled the rollouts, frozen for the whole iteration
    with _clock(timings, "time_logprobs", device):
        logp_old_tok, entropy_tok = rollout_logprobs(model, R, whole_batch, cfg, entropy=True)  # (B, T) each
    # (2) the guard: the same π_t on both sides?
    gap = sampler_gap(R, logp_old_tok)
    if gap is not None and (gap[0] > cfg.max_sampler_gap or gap[1] > cfg.max_sampler_gap_token):
        raise SamplerMismatch(f"the sampler's log-probs differ from the trainer's by {gap[0]:.3g} nats per "
                              f"response token on average (at most {gap[1]:.3g}), beyond the bounds "
                              f"{cfg.max_sampler_gap:g} and {cfg.max_sampler_gap_token:g}")
    # (3) A = r − b
    adv = compute_advantages(r, cfg)                                       # (B,) each
    if cfg.reset_optimizer:
        optimizer.state.clear()                                            # Kimi K1.5: fresh moments every iteration

    # (4) U passes × M regression steps (eq. 7)
    model.train()
    if cfg.grad_checkpointing and not is_checkpointing(model):
        # switched on once and left on: it only acts in train mode, so sampling (eval mode) keeps its cache
        model.gradient_checkpointing_enable()
    losses, grad_norms = [], []
    with _clock(timings, "time_update", device):
        for update in range(cfg.updates_per_batch):
            for m, micro_batches in enumerate(per_step):
                try:
                    loss, grad_norm = optimizer_step(model, optimizer, R, micro_batches, logp_old_tok, adv, cfg)
                except FloatingPointError as e:
                    raise FloatingPointError(f"non-finite loss or gradient at update {update + 1}, "
                                             f"mini-batch {m + 1} ({e})") from None
                losses.append(loss)
                grad_norms.append(grad_norm)

    metrics = step_metrics(R, r, adv.weights, entropy_tok, losses, grad_norms, gap)
    if cfg.measure_kl:                                                     # one more no-grad pass, metrics only
        with _clock(timings, "time_kl", device):
            logp_new = rollout_logprobs(model, R, whole_batch, cfg).sum(-1)   # (B,) log π_θ
            metrics.update(kl_metrics(logp_old_tok.sum(-1), logp_new, adv.pmd, cfg))
    return {**metrics, **timings}
