"""
pmd_mean.py: PMD-mean, the policy-mirror-descent update used to post-train Kimi K1.5/K2, in one file.

Read this file top to bottom: it is the tutorial. `toy_bandit.py` shows the paper's main result on a
bandit; `train_math.py` runs this same code on a small LLM; `test_pmd_mean.py` checks every equation
below against an independent reference.

    python train_math.py                      # the tiny offline model on built-in arithmetic (CPU or GPU)
    python -m pytest -q test_pmd_mean.py      # the tests (CPU, about a minute)

Symbols and shapes (used in every shape comment below)
------------------------------------------------------
    P   prompts per step                 K   samples (responses) per prompt
    B   = P*K sequences                  T   tokens per padded sequence (prompt + response)
    Tp  prompt tokens (left-padded)      Tr  response tokens (right-padded), T = Tp + Tr
    V   vocabulary size (151,936 for Qwen2.5)       H  hidden size
    L   = Tp + max_new_tokens, KV-cache columns      Hq, Hkv  query / key-value heads, D head size
    r   reward in [0, 1]                 τ   (tau) KL coefficient, "temperature" of the mirror step
    Δ   = log π_θ(y|x) − log π_t(y|x), a sum over the response's tokens

1. Policy mirror descent (PMD)
------------------------------
For a prompt x, one PMD step solves

    π_{t+1} = argmax_π  E_{y~π}[r(y)] − τ·KL(π ‖ π_t)

whose closed form is  π_{t+1}(y) = π_t(y)·e^{r(y)/τ} / Z_t,  Z_t = E_{y~π_t}[e^{r(y)/τ}], hence

    τ·log(π_{t+1}(y)/π_t(y)) = r(y) − τ·log Z_t.                                            (1)

2. Fitting (1) by regression (Kimi K1.5, arXiv 2501.12599, Sec. 2.3.2)
---------------------------------------------------------------------
An LLM cannot be set to π_{t+1} directly. Kimi fits it by least squares in log-policy space on
samples from the current policy:

    minimise_θ  E_{y~π_t} [ ( r(y) − b − τ·log(π_θ(y)/π_t(y)) )² ]                          (2)

With b = τ·log Z_t the minimiser is exactly (1). log π(y|x) of a response is the SUM of its token
log-probs (the chain rule), so Δ = log π_θ − log π_t is a sequence-level quantity.

3. The baseline b: three choices
--------------------------------
τ·log Z_t is an expectation under π_t we only see through K samples, r_1..r_K. Choices:

    PMD-part:  b = τ·log( (1/K)·Σ_j e^{r_j/τ} )     (a Monte-Carlo log-partition; biased, and for
                                                      small τ dominated by the single best sample)
    PMD-mean:  b = (1/K)·Σ_j r_j                    (the first-order expansion of τ·log Z for large τ)
    leave-one-out forms: for sample i, the sums run over j ≠ i, so b_i does not depend on r_i.

The reference implementation (OpenKimi, a verl fork) uses the leave-one-out forms ("rloo" for the
mean, "ploo" for the partition); so do we by default (`PMDConfig.leave_one_out`).

4. What PMD-mean actually solves (arXiv 2602.05933)
---------------------------------------------------
Replacing τ·log Z_t by the mean reward r̄ changes the fixed point. At the population level the
minimiser of (2) with b = r̄, over normalised policies, is

    π_{t+1}(y) = π_t(y) · (τ/λ) · W₀( (λ/τ)·e^{(r(y) − r̄)/τ} ),                            (3)

W₀ the principal Lambert-W function and λ > 0 the one scalar that normalises it; it turns out that
λ = τ·KL(π_t ‖ π_{t+1}). (3) is exactly the mirror-descent step with a mixed regulariser,

    π_{t+1} = argmax_π  E_π[r] − τ·KL(π ‖ π_t) − (λ/2)·χ²(π ‖ π_t),                          (4)

so PMD-mean is PMD plus an adaptive χ² penalty. The χ² term makes the step conservative when
rewards are low (few successes cannot pull all the mass at once) and robust to finite-sample noise.
`toy_bandit.py` computes (1), (3) and (4) exactly and trains on the loss below to show it.

5. The loss, and why the first update is policy gradient
--------------------------------------------------------
With A = r − b (the "advantage") the per-response loss of the reference code (`opmd`) is

    L = 0.5·τ·(A/τ − Δ)² / |y|                                                              (5)

(the 1/|y| is OpenKimi's seq-mean-token-mean normalisation; τ scales it so the gradient's size
does not depend on τ). Its gradient is ∇L = −(A − τ·Δ)·∇log π_θ(y) / |y|. On the first update
after sampling, π_θ = π_t so Δ = 0 and

    ∇L = −A·∇log π_θ(y) / |y|                                                                (6)

which is length-normalised REINFORCE with baseline b. PMD departs from policy gradient only on the
second and later optimizer steps on the same rollouts, where the −τ·Δ term pulls the log-ratio
back towards its target A/τ instead of pushing it without limit: the regression has a fixed point.

6. The paper's training regime: many mini-batch steps per rollout batch
-----------------------------------------------------------------------
The paper's runs (OpenKimi) cut each rollout batch of P prompts × K samples into M mini-batches of
whole prompt groups and take one optimizer step on each, every one regressing against the SAME
sampling policy π_t and the SAME advantages, both computed once before the first step:

    for m = 1..M:   θ ← θ − η·∇_θ (1/|b_m|)·Σ_{i ∈ b_m} L_i(θ),   Δ_i = log π_θ(y_i) − log π_t(y_i)     (7)

Only the first mini-batch sees Δ = 0; from the second on π_θ ≠ π_t (the earlier steps moved it), so
(5) differs from policy gradient on almost every step, and each expensive rollout batch buys M
optimizer steps. `PMDConfig.minibatches` is M, `updates_per_batch` repeats the whole pass.

7. The baselines we compare with: GRPO and GSPO
-----------------------------------------------
Both use the group z-score Â_i = (r_i − mean_j r_j)/std_j r_j. GRPO clips a ratio per TOKEN,
ρ_t = π_θ(y_t|·)/π_t(y_t|·); GSPO (arXiv 2507.18071) clips one length-normalised ratio per SEQUENCE,

    s_i = exp( (1/|y_i|)·Σ_t (log π_θ(y_t|·) − log π_t(y_t|·)) ) = (π_θ(y_i)/π_t(y_i))^{1/|y_i|}
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
  3. Mini-batches hold whole prompt groups, contiguous in the batch's (already shuffled) prompt
     order, the same split in every pass, as verl splits its prompt-major rows. The default is
     M = 4 and one pass; the paper's runs use M = 16 and one pass.
  4. The KL(π_t‖π_θ) and λ we log are single-sample Monte-Carlo estimates,
     mean_i (log π_t(y_i) − log π_θ(y_i)) over the batch, measured after the last optimizer step.
  5. Kimi K1.5 adds a length penalty; we do not. Its prompt filter by difficulty is available in
     OpenKimi's form, off by default (`reward_bounds`), and so is its optimizer reset every
     iteration (`reset_optimizer`, off as in OpenKimi).
  6. GRPO and GSPO (for comparison only) have no KL term and share every other line with PMD.
  7. Sampling and training compute π_t with different kernels (a cached decode step vs. a full
     forward pass), so they agree only up to rounding. `pmd_step` measures the gap on every batch
     and stops before any update when it is far beyond rounding (`sampler_gap`, the guard).

9. Beyond the paper: two baselines between PMD-mean and PMD-part
-----------------------------------------------------------------
Section 4's derivation holds for any baseline b ≤ τ·log Z_t: the minimiser of (2) is (3) with r − b
in place of r − r̄, the KL–χ² step (4) with λ = τ·KL(π_t‖π_{t+1}) − (b − r̄) ≥ 0, and λ = 0 exactly at
b = τ·log Z_t. So b sets the χ² weight, and the two measured failures are its two ends: PMD-mean
(largest λ) steps timidly at low reward; PMD-part (λ = 0) estimates τ·log Z_t from K samples, and at
small τ that is the best of the others' rewards: with one success in 8 at τ = 0.1 each failure gets
A/τ = −8.1 nats (PMD-mean: −1.4), pushing every sampled response down (docs/EXPERIMENTS.md).

    tempered:  b = τ_b·log( (1/n)·Σ_{j∈S_i} e^{r_j/τ_b} ),  τ_b ≥ τ                          (9a)

a power mean of the rewards: τ_b = τ is PMD-part, and it falls to r̄ as τ_b → ∞
(τ_b·log E e^{r/τ_b} = r̄ + Var(r)/(2τ_b) + ...). At the population level its λ lies between 0 and
PMD-mean's; from samples it is a log-mean-exp at the milder temperature, which the best sample
dominates less (the failures above get −4.7 nats at τ_b = 3τ, −2.2 at τ_b = 10τ).

    corrected: b = τ·[ log Ẑ + s²/(2n·Ẑ²) ],  Ẑ, s² = mean, unbiased variance of e^{r_j/τ} over S_i  (9b)

By the delta method E[log Ẑ] = log Z − Var(e^{r/τ})/(2n·Z²) + O(n⁻²): the sample log-mean-exp is
biased low (Jensen) and (9b) removes that term, the textbook repair of PMD-part's finite-sample
error. It adds between 0 and τ/2 to every baseline, so where leave-one-out already over-estimates a
failure's baseline (1 success in 7 others, against 1 in 8 under π_t) it makes the push-down larger:
0.805 → 0.855 for the group above, against τ·log Z_t = 0.792. Measured, not assumed:
`toy_bandit.py` and docs/EXPERIMENTS.md ("Beyond the paper") compare both with PMD-mean.

The file has two parts. Part I, down to `pmd_step`, is the algorithm. Part II, the appendix behind
the double ruler, is the engine that makes it fast: the KV cache, the attention and mask handling,
the compiled decode step, log-prob chunking and version shims, and the answer-parsing rules.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from transformers import AttentionInterface


# -----------------------------------------------------------------------------
# Configuration: every hyperparameter in one place


@dataclass
class PMDConfig:
    """All hyperparameters of one PMD iteration. The defaults are the recipe to start from: PMD-mean,
    τ = 1, one pass over each rollout batch in M = 4 mini-batch steps (measured on the tiny model:
    every one of 12 seeds gains ≥ 10 points, docs/EXPERIMENTS.md). The learning rate is the one
    field no default fits: see `lr`."""

    # --- the algorithm
    tau: float = 1.0
    """τ, KL coefficient. The regression target A/τ is a log-ratio of up to 1/τ nats per response:
    small τ asks for big moves and, with several steps per batch, destabilises (docs/EXPERIMENTS.md)."""
    samples_per_prompt: int = 8
    """K. Baselines need a group (K ≥ 2); more samples give a less noisy baseline and fewer
    all-equal groups (which carry no signal), at K times the sampling cost."""
    baseline: str = "mean"
    """"mean" (PMD-mean), "partition" (PMD-part, τ·log-mean-exp), or one of section 9's candidates:
    "tempered" (log-mean-exp at its own temperature `baseline_tau`) or "corrected" (PMD-part with its
    first-order bias removed)."""
    baseline_tau: float | None = None
    """τ_b of the "tempered" baseline, ≥ τ: τ_b = τ is PMD-part, τ_b → ∞ PMD-mean (section 9).
    None: 10·τ, the better of the two values measured (3·τ and 10·τ, docs/EXPERIMENTS.md "Beyond the
    paper"; neither beat PMD-mean). Other baselines ignore it."""
    leave_one_out: bool = True
    """Exclude sample i from its own baseline, as OpenKimi does (b_i independent of r_i)."""
    loss: str = "pmd"
    """"pmd" (eq. 5), or for comparison "grpo" (token-ratio clip) or "gspo" (sequence-ratio clip, eq. 8)."""
    clip_eps: float = 0.2
    """GRPO only: PPO clip range of the token ratio."""
    gspo_clip: tuple = (3e-4, 4e-4)
    """GSPO only: (ε_low, ε_high) of the sequence ratio, the GSPO paper's values."""
    reward_bounds: tuple | None = None
    """(lb, ub): groups whose mean reward is not strictly inside get weight 0 (OpenKimi's
    partition_reward_lb/ub; Kimi's prompt filter). None: every group counts."""

    # --- optimisation
    updates_per_batch: int = 1
    """U, passes over the same rollouts. With M = 1 and U = 1 the one step is exactly REINFORCE
    (eq. 6); more steps let the regression pull Δ towards A/τ, where PMD differs from policy gradient."""
    minibatches: int = 4
    """M: each pass is split into M mini-batches of whole prompt groups, one optimizer step each
    (eq. 7), so a rollout batch gives U × M steps. Needs M ≤ P. The paper's runs: M = 16."""
    reset_optimizer: bool = False
    """Clear Adam's moments and step count at the start of every iteration, as Kimi K1.5 does
    (off in OpenKimi)."""
    micro_batch_size: int = 32
    """Sequences per forward/backward; gradients are accumulated to the mini-batch. Memory only."""
    lr: float = 1e-6
    """AdamW learning rate. Measured here: 5e-5 for the 0.8M tiny model, 1e-5 for SmolLM2-135M;
    1e-6 is the usual start for a 0.5B model (not measured here), and the default."""
    grad_clip: float = 1.0
    """Max global gradient norm per optimizer step; guards against the rare huge step."""
    grad_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower. Used only during updates."""

    # --- sampling
    max_new_tokens: int = 256
    """Response budget in tokens; longer responses are truncated (and flagged)."""
    temperature: float = 1.0
    """Sampling temperature; 1.0 samples from π_t itself (departure 1). 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 samples from π_t itself (departure 1)."""
    compile_decode: bool = False
    """Compile the decode step with torch.compile (a CUDA graph on CUDA): the first call per shape
    compiles (tens of seconds), later calls replay. Off until measured on a GPU (docs/SPEED.md)."""
    prompt_bucket: int = 64
    """With compile_decode: prompts are left-padded to a multiple of this many tokens, so that batches
    share one compiled shape."""
    logprob_chunk: int = 1024
    """Tokens per chunk when gathering log-probs: bounds the (chunk, V) float32 logits in memory."""
    measure_kl: bool = True
    """After the updates, one more no-grad pass for KL(π_t‖π_θ), λ and the residual (metrics only)."""
    max_sampler_gap: float = 0.25
    """The guard: stop before any update if log π_t as the sampler drew it and as the trainer computes
    it differ by more than this many nats per response token on average (`sampler_gap`). Measured on
    SmolLM2-135M-Instruct (CPU, 32 rollouts × 40 tokens): 3e-6 in float32, 0.03–0.04 in bfloat16,
    1.8–1.9 for a sampler that ignores its attention mask."""
    max_sampler_gap_token: float = 5.0
    """The guard's bound on the gap of any one response token (nats), which catches a broken row that
    the mean would dilute. Measured as above: 2e-5 in float32, 0.3–0.5 in bfloat16, 13–15 broken."""

    # --- numerics
    dtype: str = "bfloat16"
    """Dtype the scripts load the model in on CUDA; CPU always runs float32."""
    seed: int = 0
    """Seed the scripts give torch (sampling) and the data order."""

    def __post_init__(self):
        # Bad values end with one clear sentence (the scripts turn ValueError into exit code 2).
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0 (got {self.tau}): it divides the advantage.")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (got {self.samples_per_prompt}): "
                             "the baseline needs a group.")
        if self.baseline not in ("mean", "partition", "tempered", "corrected"):
            raise ValueError(f"baseline must be 'mean', 'partition', 'tempered' or 'corrected' (got {self.baseline!r}).")
        if self.baseline == "tempered" and self.baseline_tau is None:
            self.baseline_tau = 10 * self.tau
        if self.baseline_tau is not None and not self.baseline_tau >= self.tau:
            raise ValueError(f"baseline_tau must be >= tau = {self.tau} (got {self.baseline_tau}): below τ the "
                             "baseline overshoots τ·log Z and no normalised policy fits its targets.")
        if self.baseline == "corrected" and self.samples_per_prompt < 3:
            raise ValueError("the corrected baseline needs samples_per_prompt >= 3 (a variance over the others).")
        if self.loss not in ("pmd", "grpo", "gspo"):
            raise ValueError(f"loss must be 'pmd', 'grpo' or 'gspo' (got {self.loss!r}).")
        if self.minibatches < 1:
            raise ValueError(f"minibatches must be >= 1 (got {self.minibatches}).")
        if self.reward_bounds is not None and not self.reward_bounds[0] < self.reward_bounds[1]:
            raise ValueError(f"reward_bounds must be (lb, ub) with lb < ub (got {tuple(self.reward_bounds)}).")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0 (got {self.max_new_tokens}).")
        if self.updates_per_batch < 1 or self.micro_batch_size < 1 or self.prompt_bucket < 1:
            raise ValueError("updates_per_batch, micro_batch_size and prompt_bucket must be >= 1.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr}).")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1].")
        if not (self.max_sampler_gap > 0 and self.max_sampler_gap_token > 0):
            raise ValueError("max_sampler_gap and max_sampler_gap_token must be > 0.")
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32 (got {self.dtype!r}).")


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
    then over sequences. The loss VALUE means little (it is a regression residual, not a reward);
    watch reward, accuracy and KL instead. `weights` (B,), optional: per-sequence weights (the
    group filter); the mean still divides by B, as OpenKimi's `partition_weights` do.
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
    # ρ = π_θ(y_t | y_<t) / π_t(y_t | y_<t), one ratio per token
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
    # s_i = exp( (1/|y_i|)·Σ_t (log π_θ − log π_t) ), the sequence ratio's |y_i|-th root
    s = torch.exp(((logp_tok - logp_old_tok) * mask).sum(-1) / n_tok)      # (B,)
    # per-sequence loss −min(s·Â, clip(s, 1−ε_low, 1+ε_high)·Â), then the mean over sequences
    surrogate = torch.minimum(s * advantages, s.clamp(1 - clip_low, 1 + clip_high) * advantages)  # (B,)
    return -surrogate.mean()


# -----------------------------------------------------------------------------
# Log-probabilities of responses under a causal LM


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
    a time (`_chunked_logprobs`, in the appendix).

    Each row's real tokens (attention_mask 1) must be contiguous, as in `Rollouts`: left padding,
    prompt, response, right padding.
    """
    B, T = input_ids.shape
    body = model.base_model                                                # the transformer without lm_head
    lm_head = model.get_output_embeddings()                                # (H → V) linear layer
    # Speed: the body runs on the rows shifted left to start at column 0 and cut to the longest row's
    # real tokens (`_left_align`); positions come from the mask, so nothing changes but rounding.
    ids, real, resp = _left_align(input_ids, attention_mask, response_mask)  # (B, W) each
    hidden = body(input_ids=ids, attention_mask=real.long(), position_ids=_position_ids(real.long()),
                  use_cache=False).last_hidden_state                       # (B, W, H)
    # Token t is predicted by the hidden state at t−1. Mask rule: a position counts iff the token it
    # predicts is a response token (prompt tokens and padding never count; the final EOS does).
    predicts_response = resp[:, 1:]                                        # (B, W−1)
    h = hidden[:, :-1][predicts_response]                                  # (N, H), N = Σ|y|
    targets = ids[:, 1:][predicts_response]                                # (N,)
    logp, ent = _chunked_logprobs(lm_head, h, targets, chunk, entropy)     # (N,), (N,) or None

    def to_layout(flat):                                                   # (N,) → (B, T), the input's layout
        out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
        out[:, 1:] = out[:, 1:].masked_scatter(response_mask[:, 1:].bool(), flat)  # differentiable scatter
        return out

    return (to_layout(logp), to_layout(ent)) if entropy else to_layout(logp)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens: (B, T) inputs → (B,)."""
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

    Per decode step: the last token of every row goes through the model with the KV cache, the next
    token is drawn, rows that already ended get padding. The engine (cache, masks, the optional
    compiled step) is in the appendix; what it must get right is tested against a plain forward pass
    for every common architecture. We check "all rows ended?" only every 16 steps, since on a GPU
    each check is a GPU→CPU synchronisation.
    """
    device = next(model.parameters()).device
    eos = torch.tensor(_eos_ids(model, tokenizer), device=device)          # (n_eos,)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    prompt_ids = enc["input_ids"].to(device)                               # (P, Tp)
    prompt_mask = enc["attention_mask"].to(device)                         # (P, Tp)
    if cfg.compile_decode:                                                 # left-pad Tp up to a bucket: shared shapes
        extra = -prompt_ids.shape[1] % cfg.prompt_bucket
        prompt_ids = torch.nn.functional.pad(prompt_ids, (extra, 0), value=pad_id)     # (P, Tp)
        prompt_mask = torch.nn.functional.pad(prompt_mask, (extra, 0), value=0)        # (P, Tp)
    P, Tp = prompt_ids.shape
    B, L = P * k, Tp + cfg.max_new_tokens
    _check_full_attention(model.config, L)

    tokens = torch.full((B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, Tr_max)
    # log-probs of the drawn tokens, for the guard in `pmd_step`: under the distribution drawn from,
    # and under π_t itself (temperature 1), which are one tensor when the two are the same
    drawn_lp = torch.zeros(B, cfg.max_new_tokens, dtype=torch.float32, device=device)  # (B, Tr_max)
    policy_lp = drawn_lp if cfg.temperature == 1 and cfg.top_p == 1 else torch.zeros_like(drawn_lp)
    finished = torch.zeros(B, dtype=torch.bool, device=device)             # (B,)
    lengths = torch.zeros(B, dtype=torch.long, device=device)              # (B,)
    steps = 0
    with _sampling_mode(model):
        dec = _decoder(model, B, k, L, cfg.compile_decode)
        # Prefill once, repeat K times: each prompt runs through the model once, however many samples
        # it gets; its keys and values are stored K times (rows p*K .. p*K+K−1) and so are its logits.
        logits = dec.prefill(model, prompt_ids, prompt_mask)               # (B, V)
        for t in range(cfg.max_new_tokens):
            tok, lp = sample_next_token(logits, cfg.temperature, cfg.top_p)  # (B,), (B,)
            tok = torch.where(finished, torch.full_like(tok, pad_id), tok)  # ended rows get padding
            tokens[:, t] = tok
            drawn_lp[:, t] = lp
            if policy_lp is not drawn_lp:                                  # log softmax(z)[tok], temperature 1
                z = logits.float()                                         # (B, V)
                policy_lp[:, t] = z.gather(1, tok.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, -1)
            lengths += (~finished).long()                                  # the EOS itself is counted
            finished |= torch.isin(tok, eos)
            steps = t + 1
            if t + 1 == cfg.max_new_tokens or ((t + 1) % 16 == 0 and bool(finished.all())):
                break
            logits = dec.decode(model, tok)                                # (B, V) after feeding tok

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
# Rewards: exact-match on the final answer of a math problem (the parsing rules are in the appendix)


def extract_answer(text: str) -> str | None:
    """The FINAL answer of a completion as a clean number string ("-7", "1234", "3/4"), or None.

    Looks, in order, for: the number after the last "####"; the last number in the last \\boxed{};
    the number after the last "answer is"/"answer:"; else the last number in the text. Taking the
    first number of the text (a bug elsewhere) would grade the working, not the answer.
    """
    text = _normalise_text(text)
    if "####" in text:
        m = _NUM_RE.search(text.rsplit("####", 1)[1])
        return _clean(m.group()) if m else None
    boxed = _last_boxed(text)
    if boxed is not None:
        nums = _NUM_RE.findall(boxed)
        return _clean(nums[-1]) if nums else None
    hits = list(_ANSWER_IS_RE.finditer(text))
    if hits:
        m = _NUM_RE.search(text[hits[-1].end():])
        if m:
            return _clean(m.group())
    nums = _NUM_RE.findall(text)
    return _clean(nums[-1]) if nums else None


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals `gold` as a number (18.00 = 18, 3/4 = 0.75), else 0.0."""
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    a, b = _to_fraction(pred), _to_fraction(str(gold))
    if a is None or b is None:
        return float(pred == _clean(str(gold)))
    return float(a == b)


def majority_vote(completions: list[str]) -> int | None:
    """Index of the completion whose final answer is the most frequent (maj@k), or None.

    Answers are compared as numbers (18.00 = 18, 3/4 = 0.75); a tie goes to the answer seen first;
    unparseable completions never vote, and None comes back only if none parses.
    """
    counts, first = {}, {}                                                 # answer → votes, → first index
    for i, c in enumerate(completions):
        a = extract_answer(c)
        if a is None:
            continue
        value = _to_fraction(a)
        key = value if value is not None else _clean(a)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[a] for a, n in counts.items() if n == best)


# -----------------------------------------------------------------------------
# One PMD iteration: log π_t once, the guard, advantages, then updates_per_batch × M regression steps


def _minibatches(P: int, K: int, M: int) -> list[torch.Tensor]:
    """Row indices of M disjoint mini-batches of whole prompt groups, prompts in batch order.

    Whole groups, not shuffled rows: a group's rows share one baseline and one filter weight, so a
    mini-batch then holds complete regression problems, and it is what verl does with its
    prompt-major rows (the prompts are already in a seeded random order). P need not divide by M:
    the sizes then differ by one group.
    """
    groups = torch.arange(P).tensor_split(M)                               # M × (P_m,) prompt indices
    return [(g.unsqueeze(1) * K + torch.arange(K)).flatten() for g in groups]  # M × (P_m·K,) rows


def old_logprobs(model, rollouts: Rollouts, batches: list, cfg: PMDConfig, entropy: bool = False):
    """Token log-probs of every rollout under the model as it is now, (B, T), no graph, eval mode.

    Called before the first optimizer step this is log π_t, the policy that sampled the rollouts
    (and with `entropy`, also its per-token entropies (B, T), see `token_logprobs`); called after the
    last step, log π_θ for the KL metric."""
    R = rollouts
    out = torch.zeros(R.input_ids.shape, dtype=torch.float32, device=R.input_ids.device)  # (B, T)
    ent = torch.zeros_like(out)                                            # (B, T)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows in batches:
            res = token_logprobs(model, R.input_ids[rows], R.attention_mask[rows], R.response_mask[rows],
                                 cfg.logprob_chunk, entropy=entropy)
            if entropy:
                out[rows], ent[rows] = res
            else:
                out[rows] = res
    model.train(was_training)
    return (out, ent) if entropy else out


class SamplerMismatch(ValueError):
    """The sampler drew from a distribution that is not the one the trainer computes."""


def sampler_gap(rollouts: Rollouts, logp_old_tok: torch.Tensor) -> tuple[float, float] | None:
    """(mean, max) over response tokens of |log π_t(y_t) as the trainer computes it − as the sampler
    drew it| in nats, or None for rollouts that did not come from `sample_rollouts`.

    Sampling (a cached decode step) and training (a full forward pass) compute the same π_t with
    different kernels, so they agree only up to rounding. A gap far beyond rounding means the sampler
    drew from another policy (a wrong attention mask, wrong positions, another model's weights) and
    the regression would fit responses π_t never produced ("train–inference mismatch"). The sampler's
    temperature-1 log-probs are compared, so the check holds whatever temperature it drew at."""
    if rollouts.policy_logprobs is None:
        return None
    resp = rollouts.response_mask.bool()                                   # (B, T)
    if not bool(resp.any()):
        return 0.0, 0.0
    gap = (logp_old_tok - rollouts.policy_logprobs)[resp].abs()           # (N,) one per response token
    return float(gap.mean()), float(gap.max())


def compute_advantages(r: torch.Tensor, cfg: PMDConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewards (P, K) → (advantages for the loss, PMD's A = r − b, per-row weights), each (B,).

    The group filter (`cfg.reward_bounds`) gives weight w_p = 1 iff lb < mean_k r_pk < ub, else 0.
    For GRPO and GSPO a zero advantage already means zero loss and zero gradient, so w·A is the
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
        return adv_pmd, adv_pmd, weights
    return grpo_advantages(r).reshape(P * K) * weights, adv_pmd, weights  # Â·w, (B,)


def policy_loss(lp_tok: torch.Tensor, old_tok: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor,
                response_mask: torch.Tensor, lengths: torch.Tensor, cfg: PMDConfig) -> torch.Tensor:
    """The loss of `cfg.loss` on b rows: token log-probs (b, T) now and under π_t, the rest (b,)."""
    if cfg.loss == "pmd":                                                  # eq. (5); Δ = 0 on the first step
        return pmd_loss(lp_tok.sum(-1), old_tok.sum(-1), adv, cfg.tau, lengths, weights)
    if cfg.loss == "grpo":
        return grpo_loss(lp_tok, old_tok, adv, response_mask, cfg.clip_eps)
    return gspo_loss(lp_tok, old_tok, adv, response_mask, *cfg.gspo_clip)


def optimizer_step(model, optimizer, rollouts: Rollouts, micro_batches: list, logp_old_tok: torch.Tensor,
                   adv: torch.Tensor, weights: torch.Tensor, cfg: PMDConfig) -> tuple[float, float]:
    """One optimizer step on one mini-batch, gradients accumulated over its micro-batches.
    Returns (loss, gradient norm); raises FloatingPointError, weights untouched, if either is not finite."""
    R, params = rollouts, [p for p in model.parameters() if p.requires_grad]
    lengths = R.response_lengths.clamp(min=1).float()                      # (B,) |y|
    n_rows = sum(len(rows) for rows in micro_batches)                      # rows in this mini-batch
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=R.input_ids.device)
    for rows in micro_batches:
        lp_tok = token_logprobs(model, R.input_ids[rows], R.attention_mask[rows], R.response_mask[rows],
                                cfg.logprob_chunk)                          # (b, T) log π_θ, with graph
        loss = policy_loss(lp_tok, logp_old_tok[rows], adv[rows], weights[rows], R.response_mask[rows],
                           lengths[rows], cfg)
        loss = loss * (len(rows) / n_rows)                                 # micro-batches sum to the mini-batch mean
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
    """What one iteration did, measured on its rollouts (see the glossary in the README)."""
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
    return {
        # residual of the regression (2), A/τ − Δ in nats per response: its mean, and its RMS (the
        # fit's quality). With a mean baseline Σ_i A_i = 0 in each group, so the mean equals the KL.
        "residual": float((adv_pmd / cfg.tau - delta).mean()),
        "residual_rms": float((adv_pmd / cfg.tau - delta).pow(2).mean().sqrt()),
        "kl": kl,
        # implied χ² weight λ = τ·KL(π_t ‖ π_{t+1}) (arXiv 2602.05933)
        "lambda": cfg.tau * kl,
    }


def pmd_step(model, optimizer, rollouts: Rollouts, rewards, cfg: PMDConfig) -> dict:
    """One PMD iteration on sampled rollouts. rewards: B floats, prompt-major. Returns metrics.

    log π_t once (one no-grad pass), the guard, the advantages, then updates_per_batch passes, each
    cut into M mini-batches of whole prompt groups with one optimizer step each (eq. 7): all steps
    regress against the same log π_t and advantages. The learning rate is whatever the caller set on
    the optimizer. With the group filter each mini-batch's mean still divides by all its rows, and
    for PMD it is not free: a group with A = 0 still contributes 0.5·τ·Δ²/|y|, a KL-like anchor that
    pulls its Δ back to 0 once earlier steps have moved it; dropping the group drops the anchor.

    Raises SamplerMismatch (the guard) or FloatingPointError, both before touching the weights.
    """
    device, R = rollouts.input_ids.device, rollouts
    B, K, M = R.input_ids.shape[0], cfg.samples_per_prompt, cfg.minibatches
    if B % K:
        raise ValueError(f"batch of {B} rollouts is not a whole number of groups of K={K}")
    P = B // K
    if M > P:
        raise ValueError(f"cannot split {P} prompt groups into {M} mini-batches (minibatches must be <= prompts)")
    r = torch.as_tensor(rewards, dtype=torch.float32, device=device).reshape(P, K)  # (P, K)
    batches = _micro_batches(R, cfg.micro_batch_size)                      # the whole batch, for no-grad passes
    minibatches = [_micro_batches(R, cfg.micro_batch_size, rows) for rows in _minibatches(P, K, M)]

    # log π_t(y_t): the policy that sampled the rollouts, frozen for the whole iteration
    t0 = time.perf_counter()
    logp_old_tok, entropy_tok = old_logprobs(model, R, batches, cfg, entropy=True)  # (B, T), (B, T)
    _sync(device)
    t_logprobs = time.perf_counter() - t0
    gap = sampler_gap(R, logp_old_tok)                                     # the guard: same π_t on both sides?
    if gap is not None and (gap[0] > cfg.max_sampler_gap or gap[1] > cfg.max_sampler_gap_token):
        raise SamplerMismatch(f"the sampler's log-probs differ from the trainer's by {gap[0]:.3g} nats per "
                              f"response token on average (at most {gap[1]:.3g}), beyond the bounds "
                              f"{cfg.max_sampler_gap:g} and {cfg.max_sampler_gap_token:g}")
    adv, adv_pmd, weights = compute_advantages(r, cfg)                     # (B,) each
    if cfg.reset_optimizer:
        optimizer.state.clear()                                            # Kimi K1.5: fresh moments every iteration

    t0 = time.perf_counter()
    model.train()
    if cfg.grad_checkpointing and not _is_checkpointing(model):
        # switched on once and left on: it only acts in train mode, so sampling (eval mode) keeps its cache
        model.gradient_checkpointing_enable()
    losses, grad_norms = [], []
    for update in range(cfg.updates_per_batch):
        for m, micro_batches in enumerate(minibatches):
            try:
                loss, grad_norm = optimizer_step(model, optimizer, R, micro_batches, logp_old_tok, adv, weights, cfg)
            except FloatingPointError as e:
                raise FloatingPointError(f"non-finite loss or gradient at update {update + 1}, "
                                         f"mini-batch {m + 1} ({e})") from None
            losses.append(loss)
            grad_norms.append(grad_norm)
    _sync(device)
    metrics = step_metrics(R, r, weights, entropy_tok, losses, grad_norms, gap)
    metrics.update(time_logprobs=t_logprobs, time_update=time.perf_counter() - t0)
    if cfg.measure_kl:                                                     # one more no-grad pass
        t0 = time.perf_counter()
        metrics.update(kl_metrics(logp_old_tok.sum(-1), old_logprobs(model, R, batches, cfg).sum(-1), adv_pmd, cfg))
        metrics["time_kl"] = time.perf_counter() - t0
    return metrics


# =============================================================================
# APPENDIX: the engine. Nothing below is PMD; it is what makes the functions above fast and exact on
# every transformers version the README names. Read it only to change how sampling or log-probs work.
# =============================================================================

# -----------------------------------------------------------------------------
# Log-prob plumbing: rows left-aligned, the output layer in chunks, micro-batches in length order


def _gather_logprobs(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor,
                     entropy: bool = False):
    """log softmax(lm_head(h))[target] for n rows: (n, H), (n,) → (n,), via logit − logsumexp.

    With `entropy`, also the entropy of each row's distribution, (n,), no gradient (a metric).
    """
    logits = lm_head(h).float()                                            # (n, V), float32 for this chunk only
    lse = torch.logsumexp(logits, dim=-1)                                  # (n,)
    # log π(y_t | y_<t) = z_{y_t} − log Σ_v e^{z_v}
    logp = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse         # (n,)
    if not entropy:
        return logp
    with torch.no_grad():
        # H = −Σ_v p_v·log p_v = log Σ_v e^{z_v} − Σ_v p_v·z_v   (p = softmax(z))
        ent = lse - (logits.softmax(-1) * logits).sum(-1)                  # (n,)
    return logp, ent


def _left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor):
    """Shift each row's real tokens to start at column 0 and keep W columns, the most real tokens of
    any row: (B, T) × 3 → ids, real, resp, each (B, W).

    A row's real tokens (its prompt's, then its response's) are contiguous, so the transformer body
    needs only W columns instead of the widest prompt plus the longest response. Nothing changes but
    float rounding: positions come from the mask, a token attends to the same tokens, and the response
    tokens keep their order, so the flat list of their log-probs is the same in both layouts.
    """
    B, T = input_ids.shape
    mask = attention_mask.long()                                           # (B, T)
    n_real = mask.sum(-1)                                                  # (B,)
    lead = mask.argmax(-1)                                                 # (B,) first real column
    last = T - 1 - mask.flip(-1).argmax(-1)                                # (B,) last real column
    if not bool(((last - lead + 1 == n_real) | (n_real == 0)).all()):
        raise ValueError("token_logprobs: a row's attention mask has a hole; real tokens must be contiguous")
    W = int(n_real.max())
    col = torch.arange(W, device=input_ids.device)                         # (W,)
    src = (lead.unsqueeze(1) + col).clamp(max=T - 1)                       # (B, W) source column
    real = col < n_real.unsqueeze(1)                                       # (B, W)
    return input_ids.gather(1, src), real, response_mask.gather(1, src).bool() & real  # (B, W) each


def _chunked_logprobs(lm_head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int,
                      entropy: bool):
    """`_gather_logprobs` over (N, H) hidden states `chunk` rows at a time: (N,) log-probs and (N,)
    entropies (None without `entropy`). With gradients on, each chunk is checkpointed: backward
    recomputes its (chunk, V) logits instead of keeping them all alive."""
    pieces = []
    for s in range(0, h.shape[0], chunk):
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(
                _gather_logprobs, lm_head, h[s:s + chunk], targets[s:s + chunk], entropy, use_reentrant=False))
        else:
            pieces.append(_gather_logprobs(lm_head, h[s:s + chunk], targets[s:s + chunk], entropy))
    cat = lambda xs: torch.cat(xs) if xs else h.new_zeros(0, dtype=torch.float32)  # (N,)
    if not entropy:
        return cat(pieces), None
    return cat([lp for lp, _ in pieces]), cat([ent for _, ent in pieces])


def _micro_batches(rollouts: Rollouts, size: int, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Row indices of each micro-batch, `size` rows each, taken in order of length (real tokens).

    The loss is a sum over rows, so which rows share a micro-batch changes nothing but float
    rounding. But a micro-batch costs as much as its longest row times its rows (`token_logprobs`
    left-aligns the rows and cuts the rest), so grouping short rows with short rows saves compute on
    ragged responses: the update's time then follows the real tokens (`bench.py`, ragged row).
    `rows`: split only these rows (one mini-batch); default all.
    """
    if rows is None:
        rows = torch.arange(rollouts.input_ids.shape[0])                   # (B,)
    n_real = rollouts.attention_mask.sum(-1).cpu()[rows]                   # (b,)
    return list(rows[n_real.argsort(stable=True)].split(size))             # [(≤ size,), ...] shortest first


# -----------------------------------------------------------------------------
# The decode engine: attention, KV cache, masks, the compiled step


def _eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a response (instruct models often have two)."""
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else ([] if e is None else [e]))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token; responses could never end")
    return sorted(ids)


def _check_full_attention(config, L: int) -> None:
    """Refuse models whose attention is not full over L = prompt + new tokens: `sample_rollouts`
    builds full-attention masks only."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"sample_rollouts supports full-attention models only (this one has {layer_types})")
    # A sliding window shorter than the sequence would hide early tokens, which our full-attention
    # mask does not; one at least as long as the sequence hides nothing (Mistral v0.1: 4096 tokens).
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False and window < L:
        raise ValueError(f"sample_rollouts supports full-attention models only: this one attends to a "
                         f"sliding window of {window} tokens, fewer than the {L} of prompt + max_new_tokens")


# Where a decode step's time goes at 512 sequences on an H100 (measured with the stock HF path):
# Qwen2.5 has 14 query heads but only 2 key/value heads (grouped-query attention, GQA). Given a
# padding mask, the stock SDPA path first copies K and V out to 14 heads (`repeat_kv`), which costs
# 24.4 ms per step over 24 layers; the same SDPA call with `enable_gqa=True` costs 2.0 ms. We register
# that call as an attention implementation of its own and switch to it while sampling, so the model
# code needs no fork. Training keeps the model's own attention.
SAMPLING_ATTENTION = "pmd_sdpa_gqa"


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA on grouped-query heads without copying K/V: (b, Hq, q, D) × (b, Hkv, L, D) → (b, q, Hq, D).

    attention_mask: (b, 1, q, L) bool, True = may attend (built by `sample_rollouts`). No dropout:
    sampling runs in eval mode.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)  # (b, Hq, q, D)
    return out.transpose(1, 2).contiguous(), None                          # (b, q, Hq, D), no weights


AttentionInterface.register(SAMPLING_ATTENTION, gqa_sdpa_attention)


@contextlib.contextmanager
def _sampling_mode(model):
    """Eval mode (dropout off, and HF's activation checkpointing, which would skip the cache) and our
    attention, restored as found afterwards."""
    was_training, attn_impl = model.training, model.config._attn_implementation
    model.eval()
    model.config._attn_implementation = SAMPLING_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = attn_impl
        model.train(was_training)


class KVCache:
    """Keys and values of every layer for B rows × L positions, allocated once, written in place.

    A HF model calls `update(k, v, layer)` in each attention layer and attends to what it returns,
    so this small class is the whole KV cache. It has two phases:

      prefill  k, v: (P, Hkv, Tp, D), one row per PROMPT. Each prompt's keys are stored K times
               (rows p*K .. p*K+K−1), so a prompt is run through the model once however many samples
               it gets. The prompt attends only to itself, so k, v are returned unchanged.
      decode   k, v: (B, Hkv, 1, D), one new token per row, written at column `write` (a (1,) tensor,
               so every decode step is the same computation). Returns the whole (B, Hkv, L, D)
               buffers; the attention mask hides the columns not written yet.

    Fixed shapes and fixed addresses are what lets a compiled decode step be captured once as a
    CUDA graph and replayed every step (`PMDConfig.compile_decode`).
    """

    def __init__(self, repeats: int, length: int, static: bool = False):
        self.repeats, self.length = repeats, length                        # K, L
        self.static = static                                               # buffers will be read by a CUDA graph
        self.keys: list[torch.Tensor] = []                                 # per layer (B, Hkv, L, D)
        self.values: list[torch.Tensor] = []                               # per layer (B, Hkv, L, D)
        self.write = None                                                  # (1,) column of the next decode token
        self.prefilling = True

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.prefilling:
            if len(self.keys) == layer_idx:                                # first use: allocate this layer
                P, Hkv, _, D = k.shape
                self.keys.append(k.new_zeros(P * self.repeats, Hkv, self.length, D))
                self.values.append(v.new_zeros(P * self.repeats, Hkv, self.length, v.shape[-1]))
                if self.static:                                            # a graph input that never moves:
                    torch._dynamo.mark_static_address(self.keys[-1])       # no copy-in before each replay,
                    torch._dynamo.mark_static_address(self.values[-1])     # and in-place writes are allowed
            Tp = k.shape[2]
            self.keys[layer_idx][:, :, :Tp] = k.repeat_interleave(self.repeats, dim=0)    # (B, Hkv, Tp, D)
            self.values[layer_idx][:, :, :Tp] = v.repeat_interleave(self.repeats, dim=0)  # (B, Hkv, Tp, D)
            return k, v
        self.keys[layer_idx].index_copy_(2, self.write, k)                 # column `write` ← (B, Hkv, 1, D)
        self.values[layer_idx].index_copy_(2, self.write, v)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class _Decoder:
    """Everything one decode step reads, preallocated for one shape (B rows, L = Tp + Tr_max positions).

    The masks are handed to the model as 4D tensors, (rows, 1, queries, keys), bool, True = may
    attend. transformers' mask builders pass a 4D mask through unchanged for every architecture (a
    dict keyed by layer type is read by some models only: on the others attention would run over the
    padding). Our attention (`gqa_sdpa_attention`) takes it as it is.
    """

    cache: KVCache
    mask: torch.Tensor            # (B, 1, 1, L) bool: which cache columns each row may attend to
    positions: torch.Tensor       # (B, 1) position id of the token being fed
    step: object                  # _decode_step, or its compiled version
    column: int = 0               # the cache column the next decode token is written to
    cache_kw: dict = field(default_factory=dict)  # the cache argument, by this version's name

    def prefill(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Run the P prompts once, fill the cache K times each, set up decoding: → logits (B, V)."""
        P, Tp = prompt_ids.shape
        K, device = self.cache.repeats, prompt_ids.device
        # Query i may see key j iff j ≤ i (causal) and j is a real token. A padding query sees only
        # itself: its output is never used, but a row with nothing to attend to would be NaN, and NaN
        # keys poison the real rows that mask them (0·NaN = NaN).
        i = torch.arange(Tp, device=device)
        causal = i.unsqueeze(0) <= i.unsqueeze(1)                          # (Tp, Tp) [query, key]
        mask = (causal & prompt_mask.bool().unsqueeze(1)) | torch.eye(Tp, dtype=torch.bool, device=device)
        self.cache.prefilling = True
        out = model(input_ids=prompt_ids, position_ids=_position_ids(prompt_mask),
                    attention_mask=mask.unsqueeze(1),                      # (P, 1, Tp, Tp)
                    use_cache=True, logits_to_keep=1, **_cache_kwargs(model, self.cache, i))
        self.cache.prefilling = False
        # Decode state, written in place (a compiled step keeps reading the same tensors).
        self.mask.zero_()
        self.mask[:, 0, 0, :Tp] = prompt_mask.bool().repeat_interleave(K, dim=0)        # (B, Tp) real prompt tokens
        self.positions.copy_(prompt_mask.sum(-1, keepdim=True).repeat_interleave(K, dim=0))  # (B, 1) next position
        self.cache.write.fill_(Tp)                                         # next cache column
        self.column = Tp
        self.cache_kw = _cache_kwargs(model, self.cache, self.cache.write)
        return out.logits[:, -1].repeat_interleave(K, dim=0)               # (B, V): row p*K + j ← prompt p

    def decode(self, model, tok: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (B,), at the next cache column: → next-token logits (B, V)."""
        self.mask[:, 0, 0, self.column] = True                             # the token fed now becomes visible
        if self.step is not _decode_step and tok.device.type == "cuda":   # compiled: a CUDA graph
            torch.compiler.cudagraph_mark_step_begin()                     # last step's logits are consumed
        logits = self.step(model, self.cache_kw, tok.unsqueeze(1), self.positions, self.mask)  # (B, V)
        self.positions += 1
        self.cache.write += 1
        self.column += 1
        return logits


def _decode_step(model, cache_kw: dict, tokens: torch.Tensor, positions: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """One token per row through the model with the cache: (B, 1) → next-token logits (B, V)."""
    out = model(input_ids=tokens, position_ids=positions, attention_mask=mask,
                use_cache=True, **cache_kw)
    return out.logits[:, -1]                                               # (B, V)


def _decoder(model, B: int, K: int, L: int, compile: bool) -> _Decoder:
    """A fresh decoder for eager runs; for compiled ones, one per shape, kept on the model and reused.

    Compiling costs tens of seconds, and a CUDA graph is only valid for the addresses it was
    captured with, so the compiled step, its cache and its buffers live as long as the model and
    are reused by every call with the same (B, L). Prompts are left-padded to a multiple of
    `PMDConfig.prompt_bucket` so that calls share shapes.
    """
    weight = next(model.parameters())
    device = weight.device
    if compile:
        store = model.__dict__.setdefault("_pmd_decoders", {})            # {(B, K, L, dtype, device): _Decoder}
        key = (B, K, L, weight.dtype, device)
        if key in store:
            return store[key]
    dec = _Decoder(cache=KVCache(K, L, static=compile),
                   mask=torch.zeros(B, 1, 1, L, dtype=torch.bool, device=device),
                   positions=torch.zeros(B, 1, dtype=torch.long, device=device), step=_decode_step)
    dec.cache.write = torch.zeros(1, dtype=torch.long, device=device)
    if compile:
        for buf in (dec.mask, dec.positions, dec.cache.write):            # updated in place between steps
            torch._dynamo.mark_static_address(buf)
        # CUDA: "reduce-overhead" captures the step as a CUDA graph (one launch instead of hundreds of
        # kernels, which is where most of an eager 0.5B decode step goes). The CPU compiles without graphs.
        mode = "reduce-overhead" if device.type == "cuda" else None
        dec.step = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
        # Trap: every shape compiles the same function once more, and dynamo allows only
        # `recompile_limit` (8) compiles of one function; with fullgraph=True the next one raises.
        # One compile per shape is the design here, so each new decoder makes room for itself.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, getattr(torch._dynamo.config, limit) + 1)
        store[key] = dec
    return dec


# -- Version shims: one code path across the transformers versions the README names


def _cache_kwargs(model, cache, columns: torch.Tensor) -> dict:
    """The cache argument by its name in this transformers version (`past_key_values`, renamed `cache`
    in 5.2x), plus `cache_position` = the cache columns being written, for 4.x versions that want it."""
    params = inspect.signature(model.forward).parameters
    kw = {"cache" if "cache" in params else "past_key_values": cache}
    if "cache_position" in params:
        kw["cache_position"] = columns
    return kw


def _is_checkpointing(model) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new name, old name
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# Answer parsing details


_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
# A number: an optional minus (not when it follows a word character, so "3-4" is not −4), an optional
# "$", digits with optional thousands separators, an optional decimal part, an optional "/denominator".
_NUM_RE = re.compile(r"(?:(?<![\w)])-)?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?:\.\d+)?(?:\s?/\s?\d+)?")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)


def _normalise_text(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-")             # unicode minus and en dash
    text = text.replace("\\$", "$").replace("\\!", "").replace("\\,", "")
    return _FRAC_RE.sub(r"\1/\2", text)                                    # \frac{3}{4} → 3/4


def _clean(num: str) -> str:
    return num.replace(",", "").replace("$", "").replace(" ", "")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _to_fraction(s: str) -> Fraction | None:
    s = _clean(s).rstrip(".")
    try:
        if "/" in s:
            num, den = s.split("/")
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
