"""
test_engines.py: pmd_mean.py against the engines it scales out on, and against OpenKimi's own code.

    python -m pytest -q test_engines.py        # CPU, under a minute; TRL tests skip without TRL

1. OpenKimi (the paper's verl code: set PMD_OPENKIMI to the folder holding its `core_algos.py`, from
   the public OpenKimi repository; loaded with stub verl modules; skipped without it; needs no
   TRL): its `ploo` advantage and `opmd` loss against
   `compute_baseline` / `pmd_loss` on random groups, and the one case where they disagree
   (τ = 0.01, one success in eight) against the exact value worked out by hand.
2. TRL (`pmd_trl.PMDMeanTrainer`; skipped without TRL): on the same rollouts, from our sampler, the
   trainer's advantages, loss and gradients equal pmd_step's, on the first step (Δ = 0) and on a
   later one (Δ ≠ 0); β ≠ 0 is refused; `pmd_trl.py` runs two steps as a script and logs them.
3. Without network, a hub model name fails in seconds with one sentence (train_math.py, pmd_trl.py).

Models are the tiny Qwen2 built in code, untrained (no warm start, no download).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pmd_mean import PMDConfig, compute_baseline, pmd_loss, pmd_step, sample_rollouts
from models import byte_tokenizer, tiny_model

HERE = Path(__file__).resolve().parent
OPENKIMI = Path(os.environ.get("PMD_OPENKIMI", "/nonexistent"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# -----------------------------------------------------------------------------
# 1. OpenKimi's core_algos.py, imported without verl


@pytest.fixture(scope="module")
def openkimi():
    """OpenKimi's core_algos module. Its imports (verl's registries and AlgoConfig, omegaconf's
    DictConfig) are stubbed in sys.modules only while it loads: the registers become identity
    decorators, the config classes empty classes."""
    path = OPENKIMI / "core_algos.py"
    if not path.is_file():
        pytest.skip("set PMD_OPENKIMI to the folder holding OpenKimi's core_algos.py")
    register = lambda name: (lambda fn: fn)                               # @register_adv_est("ploo") → fn
    stubs = {"verl": {}, "verl.trainer": {}, "verl.trainer.ppo": {},
             "verl.trainer.ppo.core_algos": {"register_adv_est": register, "register_policy_loss": register},
             "verl.trainer.config": {"AlgoConfig": type("AlgoConfig", (), {})},
             "omegaconf": {"DictConfig": type("DictConfig", (), {})}}
    with pytest.MonkeyPatch.context() as mp:
        for name, attrs in stubs.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            mp.setitem(sys.modules, name, module)
        spec = importlib.util.spec_from_file_location("openkimi_core_algos", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def openkimi_ploo(openkimi, rewards: torch.Tensor, tau: float, seed: int = 0) -> torch.Tensor:
    """OpenKimi's `ploo` advantage for rewards (P, K), returned as (P, K).

    verl's layout: one row per response with the reward on its last token, groups named by an index
    array. We shuffle the rows and give each a different length, so the grouping and the token sum
    are exercised too, then put the answer back in (P, K) order."""
    P, K = rewards.shape
    B, L = P * K, 5
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(B, generator=g)                                 # row b holds flat response order[b]
    lengths = torch.randint(1, L + 1, (B,), generator=g)                   # (B,)
    mask = (torch.arange(L) < lengths.unsqueeze(1)).to(rewards.dtype)      # (B, L) right-padded
    token_rewards = torch.zeros(B, L, dtype=rewards.dtype)                 # (B, L)
    token_rewards[torch.arange(B), lengths - 1] = rewards.reshape(-1)[order]
    index = np.array([f"prompt-{int(i) // K}" for i in order])             # (B,) group names
    adv, _ = openkimi.compute_partition_loo_outcome_advantage(token_rewards, mask, index, tau=tau)  # (B, L)
    out = torch.empty(B, dtype=rewards.dtype)
    out[order] = adv[:, 0]                                                 # every token holds A; take the first
    return out.reshape(P, K)


@pytest.mark.parametrize("tau", [1.0, 0.3, 0.1])
def test_openkimi_ploo_equals_partition_baseline(openkimi, tau):
    """ploo = r − τ·log((1/(K−1))·Σ_{j≠i} e^{r_j/τ}) = r − compute_baseline(r, τ, "partition"), on
    random groups of 0/1 and of continuous rewards (float64: no cancellation at these τ)."""
    g = torch.Generator().manual_seed(1)
    for rewards in (torch.bernoulli(torch.full((6, 8), 0.3), generator=g).double(),
                    torch.rand(5, 4, generator=g, dtype=torch.float64)):
        ours = rewards - compute_baseline(rewards, tau, "partition", leave_one_out=True)
        theirs = openkimi_ploo(openkimi, rewards, tau)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)


def test_mean_baseline_is_verl_rloo():
    """PMD-mean in OpenKimi is verl's own `rloo`: A_i = r_i·n/(n−1) − mean·n/(n−1) (not in
    core_algos.py, so written out here), which is r_i − the mean of the others."""
    r = torch.rand(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    n = r.shape[1]
    rloo = r * n / (n - 1) - r.mean(1, keepdim=True) * n / (n - 1)
    torch.testing.assert_close(r - compute_baseline(r, 1.0, "mean", leave_one_out=True), rloo, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.01])
def test_openkimi_opmd_equals_pmd_loss(openkimi, tau):
    """opmd (seq-mean-token-mean) = pmd_loss on the sequence sums, value and gradient, with
    right-padded responses of different lengths (padding holds garbage that must not count)."""
    B, L = 9, 7
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, L + 1, (B,), generator=g)                   # (B,)
    mask = (torch.arange(L) < lengths.unsqueeze(1)).double()               # (B, L)
    old = -3 * torch.rand(B, L, generator=g, dtype=torch.float64)          # (B, L) log π_t per token
    new = (old + 0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)).requires_grad_()  # (B, L)
    A = torch.randn(B, generator=g, dtype=torch.float64)                   # (B,)
    config = types.SimpleNamespace(policy_loss={"pmd_tau": tau})
    theirs, _ = openkimi.compute_policy_loss_opmd(old, new, A.unsqueeze(1) * mask, mask,
                                                  "seq-mean-token-mean", config)
    (g_theirs,) = torch.autograd.grad(theirs, new)
    ours = pmd_loss((new * mask).sum(-1), (old * mask).sum(-1), A, tau, mask.sum(-1))
    (g_ours,) = torch.autograd.grad(ours, new)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-15)


def test_openkimi_ploo_one_success_in_eight_at_tau_001(openkimi):
    """τ = 0.01, eight responses, one right (r = 1) and seven wrong (r = 0): OpenKimi's ploo gives
    the successful response A = 0.184 where the exact leave-one-out value is A = 1.

    Exact: the success's baseline averages e^{r_j/τ} over the seven failures only, all e^0, so
    b = τ·log 1 = 0 and A = 1. A failure's baseline holds the success: b = τ·log((e^100 + 6)/7)
    = 1 − τ·log 7 + O(e^−100) = 0.98054, A = −0.98054.

    OpenKimi shifts by the GROUP max (1, the success's own reward) and takes each leave-one-out sum
    as (group sum − own term): for the success, (1 + 7·e^−100) − 1. Two things then go wrong. In
    float32 and float64 alike 7·e^−100 ≈ 2.6e−43 vanishes next to 1, so the difference is exactly 0;
    and even exact, its mean e^−100 is far below the clamp at 1e−8. The clamp decides:
    b = 1 + τ·log(1e−8) = 0.8158, A = τ·log(1e8) = 0.1842, 5.4× less push than the exact A = 1 for
    the one success of a hard prompt, by an amount set by the clamp. The clamp binds whenever
    e^{−1/τ} < 1e−8, i.e. τ < 1/log(1e8) = 0.054 (A = 0.92 at τ = 0.05, 0.37 at τ = 0.02); at
    τ = 0.1 only float32 rounding shows (A = 0.99996). The failures' values are right (their own
    term is the tiny one), and so is every group with two or more successes (the others' max is
    then 1). compute_baseline shifts by the max over j ≠ i and sums over j ≠ i directly (a masked
    logsumexp), so it has neither problem and gives the exact values.
    """
    tau = 0.01
    r = [1.0] + [0.0] * 7
    # Exact, by hand in float64: b_i = m + τ·log( (1/7)·Σ_{j≠i} e^{(r_j − m)/τ} ), m = max_{j≠i} r_j
    exact = []
    for i in range(8):
        others = r[:i] + r[i + 1:]
        m = max(others)
        exact.append(r[i] - (m + tau * math.log(sum(math.exp((x - m) / tau) for x in others) / 7)))
    assert exact[0] == 1.0 and abs(exact[1] - (-1 + tau * math.log(7))) < 1e-15
    rewards = torch.tensor([r], dtype=torch.float64)                        # (1, 8)
    ours = rewards - compute_baseline(rewards, tau, "partition", leave_one_out=True)
    torch.testing.assert_close(ours[0], torch.tensor(exact, dtype=torch.float64), rtol=0, atol=1e-12)
    for dtype in (torch.float32, torch.float64):
        theirs = openkimi_ploo(openkimi, rewards.to(dtype), tau)[0].double()
        assert abs(theirs[0] - tau * math.log(1e8)) < 1e-5, f"{dtype}: success A = {float(theirs[0])}"
        assert abs(theirs[0] - 0.1842) < 1e-4                                # vs the exact 1.0
        torch.testing.assert_close(theirs[1:], ours[0, 1:], rtol=0, atol=1e-5)  # failures agree


# -----------------------------------------------------------------------------
# 2. TRL: PMDMeanTrainer against pmd_step on the same rollouts


def ragged(rollouts, tokenizer):
    """The same rollouts cut to lengths 1..Tr, each cut row ending in EOS, padding after: an untrained
    model almost never samples EOS, and the masks (|y|, the sum over tokens) must be exercised."""
    R, Tp = rollouts, rollouts.prompt_len
    B, Tr = R.input_ids.shape[0], R.input_ids.shape[1] - Tp
    lengths = torch.tensor([8, 3, 5, 8, 1, 6, 8, 2, 7, 4, 8, 5][:B]).clamp(max=Tr)  # (B,)
    keep = torch.arange(Tr) < lengths.unsqueeze(1)                         # (B, Tr)
    response = R.input_ids[:, Tp:].masked_fill(~keep, tokenizer.pad_token_id)  # (B, Tr)
    cut = lengths < Tr
    response[cut, lengths[cut] - 1] = tokenizer.eos_token_id               # a cut row ends in EOS
    return dataclasses.replace(
        R, input_ids=torch.cat([R.input_ids[:, :Tp], response], 1),
        attention_mask=torch.cat([R.attention_mask[:, :Tp], keep.long()], 1),
        response_mask=torch.cat([torch.zeros_like(R.attention_mask[:, :Tp]), keep.long()], 1),
        response_lengths=lengths, finished=cut, truncated=~cut,
        completions=tokenizer.batch_decode([r[:n].tolist() for r, n in zip(response, lengths)], skip_special_tokens=True))


def _trainer_and_rollouts(tmp_path, baseline: str, tau: float = 0.5, loss_norm: str = "token"):
    """(trainer, its model, a deep copy for pmd_step, rollouts, rewards, cfg, TRL inputs).

    The rollouts come from our sampler; the trainer's `_generate` is replaced by one that returns
    them, so TRL's own `_generate_and_score_completions` computes log π_t, calls the reward
    function and our advantages. Prompts have different lengths: TRL's left-padded rows have no
    position ids (departure 2 of pmd_trl.py), and the check covers that; responses too (`ragged`)."""
    pytest.importorskip("trl")
    import datasets
    import pmd_trl

    P, K = 3, 4
    B = P * K
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_model(len(tokenizer), layers=2, width=64, seed=0)
    prompts = ["1+2=", "12+34=", "7+45="]                                  # 4, 6 and 5 tokens
    cfg = PMDConfig(samples_per_prompt=K, max_new_tokens=8, tau=tau, baseline=baseline, updates_per_batch=1, minibatches=1,
                    grad_clip=1e9, measure_kl=False, micro_batch_size=64, loss_norm=loss_norm)  # no clipping
    torch.manual_seed(0)
    rollouts = ragged(sample_rollouts(model, tokenizer, prompts, K, cfg), tokenizer)
    rewards = torch.rand(B, generator=torch.Generator().manual_seed(1)).tolist()  # B rewards in [0, 1)
    rewards[4:8] = [1.0, 1.0, 1.0, 1.0]                                    # an all-equal group (A = 0)
    model_ref = copy.deepcopy(model)                                       # before TRL patches model.forward

    def preset_reward(completions, **_):
        return rewards

    args = pmd_trl.PMDTrainerConfig(
        output_dir=str(tmp_path / "trl"), tau=tau, baseline=baseline, loss_norm=loss_norm, num_generations=K,
        per_device_train_batch_size=B, max_completion_length=cfg.max_new_tokens, use_cpu=True,
        bf16=False,                                                        # TRL's default is bf16 autocast, even on CPU
        report_to="none", save_strategy="no", seed=0)
    trainer = pmd_trl.PMDMeanTrainer(model=model, reward_funcs=preset_reward, args=args, processing_class=tokenizer,
                                     train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]))
    Tp = rollouts.prompt_len

    def our_rollouts(_prompts):                                            # TRL's (prompt ids, completion ids, texts)
        prompt_ids = [row[m.bool()].tolist() for row, m in zip(rollouts.input_ids[:, :Tp],
                                                                rollouts.attention_mask[:, :Tp])]
        completion_ids = [row[:n].tolist() for row, n in zip(rollouts.input_ids[:, Tp:], rollouts.response_lengths)]
        return prompt_ids, completion_ids, rollouts.completions

    trainer._generate = our_rollouts
    model.train()
    inputs = trainer._generate_and_score_completions([{"prompt": prompts[i // K]} for i in range(B)])
    # same token layout as ours: left-padded prompt | right-padded response
    assert torch.equal(torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1), rollouts.input_ids)
    assert torch.equal(inputs["completion_mask"], rollouts.response_mask[:, Tp:])
    return trainer, model, model_ref, rollouts, rewards, cfg, inputs


def _grad_gap(a, b) -> tuple[float, float]:
    """(max |grad_a − grad_b| over all parameters, max |grad_b|)."""
    gap = max(float((p.grad - q.grad).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    return gap, max(float(q.grad.abs().max()) for q in b.parameters())


@pytest.mark.parametrize("baseline,loss_norm", [("mean", "token"), ("partition", "token"), ("mean", "sequence")])
def test_trl_first_step_equals_pmd_step(tmp_path, baseline, loss_norm):
    """First step on fresh rollouts (Δ = 0): advantages, loss and gradients equal pmd_step's, with
    either loss normalisation."""
    trainer, model, model_ref, rollouts, rewards, cfg, inputs = _trainer_and_rollouts(tmp_path, baseline,
                                                                                      loss_norm=loss_norm)
    r = [rewards[i:i + 4] for i in range(0, 12, 4)]
    # advantages, computed here without compute_baseline (leave-one-out, float64 by hand)
    tau = cfg.tau
    expect = []
    for group in r:
        for i, ri in enumerate(group):
            others = group[:i] + group[i + 1:]
            b = (sum(others) / 3 if baseline == "mean"
                 else max(others) + tau * math.log(sum(math.exp((x - max(others)) / tau) for x in others) / 3))
            expect.append(ri - b)
    torch.testing.assert_close(inputs["advantages"].double(), torch.tensor(expect, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert float(inputs["advantages"][4:8].abs().max()) < 1e-6               # the all-equal group

    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    metrics = pmd_step(model_ref, torch.optim.SGD(model_ref.parameters(), lr=0.0), rollouts, rewards, cfg)
    assert abs(loss.item() - metrics["loss"]) <= 1e-6 * metrics["loss"]
    gap, scale = _grad_gap(model, model_ref)
    assert scale > 1e-3 and gap <= 1e-5 * scale, (gap, scale)


def test_trl_later_step_equals_pmd_step(tmp_path):
    """Second optimizer step on the same rollouts (Δ ≠ 0, old log-probs fixed): pmd_step with two
    updates and plain SGD against the trainer's loss, an identical SGD step, and its loss again."""
    trainer, model, model_ref, rollouts, rewards, cfg, inputs = _trainer_and_rollouts(tmp_path, "mean")
    lr = 2.0
    loss1 = trainer.compute_loss(model, inputs)
    loss1.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)                                      # SGD, as torch.optim.SGD does it
            p.grad = None
    loss2 = trainer.compute_loss(model, inputs)                            # π_θ has moved; log π_t has not
    loss2.backward()
    kl = trainer._metrics["train"]["kl"][-1]                               # mean(−Δ) of this second call
    assert abs(kl) > 1e-3, f"the step barely moved π_θ (KL {kl}): the test would not test Δ ≠ 0"

    cfg2 = PMDConfig(**{**cfg.__dict__, "updates_per_batch": 2})
    metrics = pmd_step(model_ref, torch.optim.SGD(model_ref.parameters(), lr=lr), rollouts, rewards, cfg2)
    ref_loss2 = 2 * metrics["loss"] - loss1.item()                         # metrics["loss"] = mean of the two
    assert abs(loss2.item() - ref_loss2) <= 1e-5 * ref_loss2, (loss2.item(), ref_loss2)
    gap, scale = _grad_gap(model, model_ref)                               # pmd_step leaves the 2nd step's grads
    assert scale > 1e-3 and gap <= 1e-4 * scale, (gap, scale)


def test_trl_config_refuses_a_reference_kl(tmp_path):
    pytest.importorskip("trl")
    import pmd_trl

    with pytest.raises(ValueError, match="beta must be 0"):
        pmd_trl.PMDTrainerConfig(output_dir=str(tmp_path), beta=0.05, num_generations=2,
                                 per_device_train_batch_size=2, use_cpu=True, report_to="none")
    assert pmd_trl.PMDTrainerConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                    use_cpu=True, report_to="none").beta == 0.0


def test_pmd_trl_script_two_steps(tmp_path):
    """`pmd_trl.py` as a user runs it (untrained tiny model): exit 0, one log line per optimizer step
    with a finite loss and the PMD metrics, TRL's trainer_state.json, a loadable final model."""
    pytest.importorskip("trl")
    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "pmd_trl.py"), "--model", "tiny", "--no-warm-start", "--device", "cpu",
           "--max-steps", "2", "--prompts-per-step", "4", "-k", "4", "--eval-problems", "8", "--out", str(out)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert all(math.isfinite(x["loss"]) and "kl" in x and "residual_rms" in x for x in lines)
    assert "reward" in lines[0]                                            # one rollout batch, two updates
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["loss"] for h in history if "loss" in h] == [x["loss"] for x in lines]
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["accuracy_after"] <= 1


@pytest.mark.parametrize("argv,needle", [(["--algo", "grpo"], "unknown --algo"), (["--lr", "inf"], "lr must be"),
                                         (["--loss-norm", "batch"], "loss_norm must be"),
                                         (["--dtype", "float16"], "float16 is not supported")])
def test_pmd_trl_bad_input_is_one_sentence(argv, needle, tmp_path):
    pytest.importorskip("trl")
    res = subprocess.run([sys.executable, str(HERE / "pmd_trl.py"), *argv, "--out", str(tmp_path / "o")], env=ENV,
                         capture_output=True, text=True, timeout=120, cwd=HERE)
    assert res.returncode == 2 and res.stderr.startswith("error:") and needle in res.stderr, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


def test_pmd_trl_stops_on_a_non_finite_loss_and_saves_nothing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("trl")
    import pmd_trl

    monkeypatch.setattr(pmd_trl, "pmd_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    out = tmp_path / "run"
    assert pmd_trl.main(["--model", "tiny", "--no-warm-start", "--device", "cpu", "--max-steps", "2",
                         "--prompts-per-step", "2", "-k", "2", "--eval-problems", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 1" in err and not (out / "final").exists()


# -----------------------------------------------------------------------------
# 3. Offline: a hub name fails fast


@pytest.mark.parametrize("script", ["train_math.py", "pmd_trl.py"])
def test_hub_model_offline_fails_fast(tmp_path, script):
    """A hub host that does not resolve (the .invalid domain never does) and an empty cache: exit 2
    and one sentence within seconds, not after ~50 s of the hub client's retries."""
    if script == "pmd_trl.py":
        pytest.importorskip("trl")
    env = {k: v for k, v in ENV.items() if k.lower() not in ("https_proxy", "http_proxy", "all_proxy",
                                                              "hf_hub_offline")}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))
    steps = ["--steps", "1"] if script == "train_math.py" else ["--max-steps", "1"]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(HERE / script), "--model", "Qwen2.5-0.5B", "--device", "cpu",
                          *steps, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=120, cwd=HERE)
    seconds = time.perf_counter() - t0
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(err) == 1 and "could not load model 'Qwen2.5-0.5B'" in err[0] and "--model tiny" in err[0]
    assert "Traceback" not in res.stderr
    assert seconds < 30, f"{script} took {seconds:.1f} s to fail offline (the hub client's retries take ~50 s)"
