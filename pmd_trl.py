"""
pmd_trl.py: PMD-mean as a TRL trainer, to scale out on an engine that already does it (DDP, DeepSpeed,
vLLM), with the loss and the baselines taken from pmd_mean.py, not re-written.

    pip install -r requirements-trl.txt                                  # TRL, pinned (see the file)
    python pmd_trl.py --model tiny --device cpu --max-steps 2 --out runs/trl   # one process, CPU or GPU

TRL's `RLOOTrainer` already samples K responses per prompt, scores them, keeps the sampling policy's
sequence log-probs log π_t(y) and reuses one rollout batch for `num_iterations` optimizer steps:
everything pmd_step needs around the loss. `PMDMeanTrainer` changes two things:

  advantages   A = r − b with b from `pmd_mean.compute_baseline` (PMD-mean: the leave-one-out mean,
               which is also what RLOO computes; PMD-part: τ·log-mean-exp), from the raw rewards;
  loss         `pmd_mean.pmd_loss`, eq. (5) of pmd_mean.py, 0.5·τ·(A/τ − Δ)²/|y| averaged over
               sequences, with Δ = Σ_t (log π_θ − log π_t) a SUM over each response's tokens.

`test_engines.py` checks that the trainer's loss and gradients equal pmd_step's on the same rollouts,
on the first step (Δ = 0) and on a later one (Δ ≠ 0). Shapes as in pmd_mean.py; with N processes
each holds B = P·K/N of the B_all = P·K rows of a rollout batch (P_all = P prompts).

Scaling out (the same script; TRL and accelerate do the rest). Run here on the CPU only: one process,
`accelerate launch --cpu` with one process, and two processes with `torchrun --nproc_per_node 2`
(gloo); the GPU, DeepSpeed and vLLM commands below were NOT run (docs/SCALING.md).

    accelerate launch --num_processes 8 pmd_trl.py --model Qwen2.5-1.5B-Instruct \\
        --data gsm8k --prompts-per-step 64 --micro-batch 16 --max-steps 400
    # DeepSpeed ZeRO-2 / ZeRO-3 with the configs TRL ships (8 processes, bf16 mixed precision):
    CONFIGS=$(python -c "import trl, os; print(os.path.dirname(trl.__file__))")/accelerate_configs
    accelerate launch --config_file $CONFIGS/zero3.yaml \\
        pmd_trl.py --model Qwen2.5-1.5B-Instruct --dtype bfloat16 --data gsm8k
    # vLLM samples, colocated on the training GPUs (`pip install vllm` first): add --vllm

--prompts-per-step is P for the whole step, across all processes (each gets P·K/N sequences);
--max-steps counts optimizer steps, TRL's unit: one rollout batch serves --updates of them.

Departures (beyond those at the top of pmd_mean.py, math_tasks.py and train_math.py):
  1. Sampling is TRL's: `model.generate` (or vLLM), not `pmd_mean.sample_rollouts`. log π_t comes
     from a no-grad pass after sampling (pmd_step, with one mini-batch, takes it from its first
     update's forward pass: the same numbers without dropout, which both turn off).
  2. TRL scores log-probs without position ids, so a left-padded row's positions start at its
     padding, not at its first token as in pmd_mean. For RoPE models (Qwen, Llama) attention depends
     only on position differences, so this changes nothing but rounding (the equivalence test uses
     left-padded prompts; gradients agree to 3e-7 of the largest).
  3. One rollout batch gives `--updates` optimizer steps on the whole batch (TRL's num_iterations);
     TRL shuffles the rows once after sampling. There are no mini-batches of whole prompt groups
     (train_math's --minibatches, eq. 7 of pmd_mean.py): TRL's steps_per_generation would split
     shuffled rows instead, so it is not offered. The learning rate warms up linearly over
     W = lr_warmup·updates optimizer steps, then stays constant, as in train_math.py.
  4. β = 0 is enforced: RLOO's KL-to-a-reference penalty is not part of PMD, whose KL is to the
     sampling policy and sits inside the loss through τ. Advantage normalisation and reward
     clipping are refused for the same reason (they would change A).
  5. Three of TRL's defaults are switched back to train_math's: the weights are float32 and bf16
     autocast (TRL's `bf16`, which it turns on even on the CPU, where it moved token log-probs by
     3e-3 nats in the equivalence test) is on only where --dtype is bfloat16, which by default it is
     where the device computes bfloat16 fast, as in train_math.py; activation checkpointing (on in
     TRL) follows --grad-checkpointing; the warm-up's first step has lr/W, not HF's 0.
  6. Held-out greedy accuracy (train_math's `greedy_scores`, our sampler) is measured before and
     after training in single-process runs only; with N processes (and ZeRO-3 shards) it is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    from trl import RLOOConfig, RLOOTrainer
except ImportError:
    if __name__ != "__main__":
        raise
    print("error: pmd_trl.py needs TRL: pip install -r requirements-trl.txt", file=sys.stderr)
    sys.exit(2)

import models
from math_tasks import Arithmetic, UsageError, greedy_scores, load_data, make_prompt, math_reward, prompt_kind
from pmd_mean import ALGORITHMS, PMDConfig, compute_baseline, pmd_loss


# -----------------------------------------------------------------------------
# Configuration: TRL's RLOO config plus PMD's three choices


@dataclass
class PMDTrainerConfig(RLOOConfig):
    """`RLOOConfig` with τ and the baseline of pmd_mean.PMDConfig; β defaults to (and must stay) 0."""

    tau: float = field(default=1.0, metadata={"help": "τ, the KL coefficient of the mirror step (as PMDConfig.tau)."})
    baseline: str = field(default="mean", metadata={"help": "'mean' (PMD-mean) or 'partition' (PMD-part)."})
    loss_norm: str = field(default="token", metadata={"help": "'token' (÷|y|, eq. 5) or 'sequence' (eq. 2), as "
                                                              "PMDConfig.loss_norm."})
    leave_one_out: bool = field(default=True, metadata={"help": "Exclude sample i from its own baseline (OpenKimi)."})
    beta: float = field(default=0.0, metadata={"help": "Must be 0: PMD has no KL to a reference model."})
    disable_dropout: bool = field(default=True, metadata={"help": "No dropout, as in pmd_step: at Δ = 0 the no-grad "
                                  "log π_t pass and the training pass must compute the same function."})

    def __post_init__(self):
        super().__post_init__()
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0 (got {self.tau}): it divides the advantage.")
        if self.baseline not in ("mean", "partition"):
            raise ValueError(f"baseline must be 'mean' or 'partition' (got {self.baseline!r}).")
        if self.loss_norm not in ("token", "sequence"):
            raise ValueError(f"loss_norm must be 'token' or 'sequence' (got {self.loss_norm!r}).")
        if self.beta != 0.0:
            raise ValueError(f"beta must be 0 (got {self.beta}): PMD's KL is to the sampling policy, inside "
                             "the loss through tau, and RLOO's reference-model penalty would change the rewards.")
        if self.normalize_advantages or self.reward_clip_range is not None:
            raise ValueError("normalize_advantages and reward_clip_range must stay off: A = r − b is PMD's target.")


# -----------------------------------------------------------------------------
# The PMD part: advantages from compute_baseline, loss from pmd_loss


class PMDMeanTrainer(RLOOTrainer):
    """RLOOTrainer with pmd_mean's baselines and eq. (5) as the loss. Overrides TRL private methods
    (`_calculate_rewards`, `_generate_and_score_completions`, `_compute_loss`) and calls one
    (`_get_per_token_logps_and_entropies`), hence the pin in requirements-trl.txt."""

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # (B_all, F)
        # r = Σ_f w_f·r_f, over ALL processes' rows (TRL gathers them: a group may span processes);
        # a reward function's None is NaN here and is refused below (RLOO would zero its advantage)
        self._pmd_rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).sum(1)  # (B_all,)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)              # TRL's rows, old_logps, advantages
        K = self.num_generations if self.model.training else self.num_generations_eval
        r = self._pmd_rewards.view(-1, K)                                  # (P_all, K), prompt-major as TRL repeats
        if torch.isnan(r).any():
            raise ValueError("a reward function returned None; PMD needs a reward for every response")
        args = self.args
        # A = r − b, b ≈ τ·log Z_t (PMD-mean: the leave-one-out mean; PMD-part: τ·log-mean-exp)
        adv = (r - compute_baseline(r, args.tau, args.baseline, args.leave_one_out)).view(-1)  # (B_all,)
        n = len(inputs)                                                    # this process's rows
        out["advantages"] = adv[self.accelerator.process_index * n:(self.accelerator.process_index + 1) * n]  # (B,)
        return out

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]              # (B, Tp)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]  # (B, Tr)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)                         # (B, T)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)                  # (B, T)
        logp_tok, entropy, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled)                        # (B, Tr) each
        mask = completion_mask.to(logp_tok.dtype)                          # (B, Tr): response tokens up to EOS
        # log π_θ(y) = Σ_t log π_θ(y_t | x, y_<t): a SUM over the response (TRL's per-token losses
        # average tokens; the regression target A/τ is a log-ratio of whole responses)
        logp = (logp_tok * mask).sum(1)                                    # (B,)
        lengths = mask.sum(1).clamp(min=1)                                 # (B,) |y|
        if self.args.loss_norm == "sequence":                              # the paper's (2): no ÷|y|
            lengths = torch.ones_like(lengths)
        # L = mean_i 0.5·τ·(A_i/τ − Δ_i)²/|y_i|,  Δ_i = log π_θ(y_i) − log π_t(y_i)   (eq. 5)
        loss = pmd_loss(logp, inputs["old_logps"], inputs["advantages"], self.args.tau, lengths)
        if not torch.isfinite(loss):                                       # stop as train_math.py does
            raise FloatingPointError(f"non-finite loss ({float(loss.detach())}) at optimizer step {self.state.global_step + 1}")
        if self.aux_loss_enabled:                                          # MoE load balancing, as RLOO adds it
            loss = loss + self.router_aux_loss_coef * aux_loss

        # Metrics (pmd_mean's names): KL(π_t‖π_θ) ≈ mean(−Δ) and the residual A/τ − Δ, before this step
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            delta = self.accelerator.gather(logp - inputs["old_logps"])    # (B_all,)
            resid = self.accelerator.gather(inputs["advantages"] / self.args.tau - (logp - inputs["old_logps"]))
            ent = self.accelerator.reduce(torch.stack([(entropy * mask).sum(), mask.sum()]), reduction="sum")
        self._metrics[mode]["kl"].append(float(-delta.mean()))
        self._metrics[mode]["residual_rms"].append(float(resid.pow(2).mean().sqrt()))
        self._metrics[mode]["entropy"].append(float(ent[0] / ent[1].clamp(min=1)))
        return loss

    def create_scheduler(self, num_training_steps, optimizer=None):
        """For "constant_with_warmup", train_math's warm-up, lr·min(1, (s+1)/W): HF's starts at lr = 0,
        which would make the first optimizer step void. Any other schedule is HF's own."""
        if self.lr_scheduler is None and self.args.lr_scheduler_type == "constant_with_warmup":
            W = max(1, self.args.get_warmup_steps(num_training_steps))
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                  lambda s: min(1.0, (s + 1) / W))
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)


def math_reward_fn(completions, answer, **_) -> list[float]:
    """TRL's reward-function signature around `math_tasks.math_reward` (the dataset's `answer` column)."""
    return [math_reward(c, a) for c, a in zip(completions, answer)]


# -----------------------------------------------------------------------------
# Command line: math_tasks' data, models' models, TRL's loop


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def fail(message):                                                     # argparse's own errors: one line too
        raise UsageError(message + ".")
    p.error = fail
    # model and data (as train_math.py)
    p.add_argument("--model", default="tiny", help="tiny | a short name (" + ", ".join(models.SHORT_NAMES)
                   + ") | a hub id | a local directory")
    p.add_argument("--data", default="arithmetic", help="arithmetic | a GSM8K-format JSONL path | gsm8k (needs `datasets` and network)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: a seeded 10%% of --data)")
    p.add_argument("--digits", type=int, default=2, help="arithmetic difficulty: digits per operand (1 to 9)")
    p.add_argument("--ops", default="+", help="arithmetic operators, e.g. + or +-")
    p.add_argument("--cache", "--tiny-cache", dest="tiny_cache", default="~/.cache/pmd_mean", metavar="DIR",
                   help="where the warm-started tiny model and models converted from a GGUF file are cached")
    p.add_argument("--fresh", action="store_true", help="rebuild the tiny model")
    p.add_argument("--no-warm-start", action="store_true",
                   help="tiny only: an untrained tiny model, built in seconds (tests; its reward stays ~0)")
    # the algorithm
    p.add_argument("--algo", default="pmd-mean", help="pmd-mean | pmd-part")
    p.add_argument("--tau", type=float, default=None, help="τ (default: PMDConfig.tau)")
    p.add_argument("--loss-norm", default="token", help="token (÷|y|, eq. 5; default) | sequence (eq. 2)")
    p.add_argument("--samples-per-prompt", "-k", type=int, default=8, help="K samples per prompt")
    p.add_argument("--prompts-per-step", type=int, default=16, help="P prompts per rollout batch, all processes")
    p.add_argument("--updates", type=int, default=2,
                   help="optimizer steps per rollout batch, each on the whole batch (TRL num_iterations)")
    p.add_argument("--no-leave-one-out", action="store_true", help="baseline includes the sample itself")
    # optimisation and sampling
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-5 tiny, 1e-6 otherwise)")
    p.add_argument("--lr-warmup", type=int, default=20, help="rollout batches of linear learning-rate warm-up")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default 8 tiny, 512 otherwise)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--vllm", action="store_true", help="sample with vLLM, colocated (TRL's use_vllm; needs vllm)")
    p.add_argument("--dtype", default=None, help="compute dtype, float32 | bfloat16 (TRL's bf16 autocast; default: "
                   "bfloat16 where the device computes it fast); the weights stay float32")
    # the run
    p.add_argument("--max-steps", type=int, default=200, help="optimizer steps in all")
    p.add_argument("--eval-problems", type=int, default=500, help="distinct held-out problems, before and after")
    p.add_argument("--seed", type=int, default=0, help="seeds model init, data order and sampling")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--out", default="runs/trl", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = p.parse_args(argv)
    if args.algo not in ("pmd-mean", "pmd-part"):
        raise UsageError(f"unknown --algo {args.algo!r}: pmd_trl.py runs pmd-mean or pmd-part.")
    if args.no_warm_start and args.model != "tiny":
        raise UsageError("--no-warm-start applies to --model tiny only.")
    for name in ("max_steps", "prompts_per_step", "eval_problems", "lr_warmup", "updates", "digits"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if args.digits > 9 or args.eval_problems > 100_000:
        raise UsageError("--digits must be at most 9 and --eval-problems at most 100000.")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise UsageError("--micro-batch must be at least 1.")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32) (got {args.seed}).")
    if args.ops == "" or set(args.ops) - set("+-"):
        raise UsageError(f"--ops must be made of + and - (got {args.ops!r}).")
    if not args.out.strip():
        raise UsageError("--out must name a directory (it is empty).")
    return args


def make_config(args) -> PMDConfig:
    """The PMDConfig of the flags, with train_math's defaults. One optimizer step on the whole batch per
    update (M = 1): TRL splits shuffled rows, not prompt groups, so train_math's --minibatches has no
    faithful counterpart here (docs/SCALING.md)."""
    given = {"lr": args.lr, "max_new_tokens": args.max_new_tokens, "tau": args.tau}
    kw = {**models.model_defaults(args.model), **{k: v for k, v in given.items() if v is not None}}
    try:
        return PMDConfig(**ALGORITHMS[args.algo], leave_one_out=not args.no_leave_one_out, loss_norm=args.loss_norm,
                         samples_per_prompt=args.samples_per_prompt, temperature=args.temperature,
                         grad_checkpointing=args.grad_checkpointing, dtype=args.dtype,
                         updates_per_batch=args.updates, minibatches=1, **kw)
    except ValueError as e:                                                # PMDConfig's one sentence
        raise UsageError(str(e)) from None


def trainer_config(args, cfg) -> PMDTrainerConfig:
    """The PMDConfig that train_math would use (cfg), spelled as TRL arguments."""
    world = int(os.environ.get("WORLD_SIZE", "1"))                         # set by accelerate launch, torchrun
    P, K = args.prompts_per_step, cfg.samples_per_prompt
    if (P * K) % world:
        raise UsageError(f"P·K = {P * K} sequences per step do not split over {world} processes.")
    per_process = P * K // world                                           # B / N
    micro = min(args.micro_batch or per_process, per_process)
    if per_process % micro:
        raise UsageError(f"--micro-batch {micro} does not divide the {per_process} sequences per process.")
    try:
        return PMDTrainerConfig(
            output_dir=args.out, tau=cfg.tau, baseline=cfg.baseline, leave_one_out=cfg.leave_one_out,
            loss_norm=cfg.loss_norm, num_generations=K, per_device_train_batch_size=micro,
            gradient_accumulation_steps=per_process // micro,              # one step = the whole rollout batch
            num_iterations=cfg.updates_per_batch, max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p,
            learning_rate=cfg.lr, lr_scheduler_type="constant_with_warmup",
            warmup_steps=args.lr_warmup * cfg.updates_per_batch, weight_decay=0.0, max_grad_norm=cfg.grad_clip,
            max_steps=args.max_steps, logging_steps=1, save_strategy="no", report_to="none",
            seed=args.seed, use_cpu=args.device == "cpu", bf16=cfg.dtype == "bfloat16",   # autocast, float32 weights
            gradient_checkpointing=cfg.grad_checkpointing, use_vllm=args.vllm, vllm_mode="colocate")
    except ValueError as e:                                                # TRL's own checks
        raise UsageError(str(e).splitlines()[0]) from None


def train(args) -> int:
    device = models.pick_device(args.device)                               # rejects a bad --device
    args.dtype, why = models.pick_dtype(device, args.dtype)
    cfg = make_config(args)
    print(f"compute dtype: {cfg.dtype} ({why}); the optimizer updates float32 weights")
    task = Arithmetic(args.digits, args.ops)                               # two terms, answers padded
    train_set, test_set = load_data(args.data, args.eval_data, args.eval_problems, args.seed, task)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to replace what it holds, or choose another --out.")
    targs = trainer_config(args, cfg)
    device = str(targs.device)                                             # this process's device
    with targs.main_process_first(desc="building the tiny model"):         # one process builds the cache
        if args.no_warm_start:
            tokenizer, kind = models.byte_tokenizer(), "tiny"
            model = models.tiny_model(len(tokenizer), seed=args.seed).to(device)
        elif args.model == "tiny":
            model, tokenizer = models.build_tiny(task, args.seed, models.WARMUP_ACCURACY, models.WARMUP_STEPS,
                                                 args.tiny_cache, args.fresh, device)
            kind = "tiny"
        else:
            model, tokenizer = models.load_model(args.model, device, args.tiny_cache)   # float32 weights
            kind = prompt_kind(tokenizer)
    tokenizer.padding_side = "left"                                        # TRL's requirement for prompts

    import datasets
    rows = [{"prompt": make_prompt(p, tokenizer, kind), "answer": p["answer"]} for p in train_set]
    single = targs.world_size == 1
    score = lambda: greedy_scores(model, tokenizer, test_set, kind, cfg, batch=64)["accuracy"]
    before = score() if single else None
    try:                                                                   # the first file written: inputs all checked
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory {out} ({e.strerror}).") from None
    trainer = PMDMeanTrainer(model=model, reward_funcs=math_reward_fn, args=targs,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    try:
        trainer.train()
    except FloatingPointError as e:
        print(f"error: training stopped: {e}; no model was saved.", file=sys.stderr)
        return 1
    after = score() if single else None

    if trainer.is_world_process_zero():
        trainer.save_state()                                               # out/trainer_state.json: every log line
        trainer.save_model(str(out / "final"))
        tokenizer.save_pretrained(out / "final")
        logs = [h for h in trainer.state.log_history if "loss" in h]       # one line per optimizer step
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in logs))
        (out / "summary.json").write_text(json.dumps({"accuracy_before": before, "accuracy_after": after,
                                                      "steps": trainer.state.global_step}, indent=1))
        acc = f"held-out accuracy {before:.1%} → {after:.1%}; " if single else ""
        print(f"{acc}{trainer.state.global_step} optimizer steps; outputs in {out}")
    return 0


def main(argv=None) -> int:
    try:
        return train(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
