"""
train_math.py: PMD-mean on a small LLM, with the same functions as everything else in pmd_mean.py.

    python train_math.py                                   # the tiny offline model, built-in arithmetic
    python train_math.py --model SmolLM2-135M-Instruct --lr 1e-5 ...        # a real model, offline (README)
    python train_math.py --model Qwen2.5-0.5B-Instruct --data gsm8k          # needs `datasets` and network
    python compare.py runs/a runs/b ...                    # tabulate finished runs, mean ± s.e. over seeds

Per step: P prompts × K samples → `sample_rollouts` → `math_reward` → `pmd_step` (M mini-batch
optimizer steps, `--minibatches`) → the sampler's copy of the weights refreshed. `--algo` switches
between PMD-mean (default), PMD-part, GRPO and GSPO on exactly that code path. Greedy accuracy
(pass@1), pass@k, avg@k, maj@k and the unparseable share on held-out problems are measured before
any update, every `--eval-every` steps, and at the end. The tasks, the reward and the evaluation are
in math_tasks.py; the models, their loading and the tiny model's warm start in models.py.

Outputs in `--out DIR` (by default a new folder in runs/; a folder that holds anything is refused
unless `--overwrite`): run.json (the flags and config), metrics.jsonl (a line per step), eval.jsonl (a
line per evaluation), training.png, summary.json, checkpoint/ (the last complete checkpoint, which
`--resume DIR` continues) and final/ (the trained model in float32, loadable with
`AutoModelForCausalLM.from_pretrained`).

Departures (beyond those listed at the top of pmd_mean.py, math_tasks.py and models.py):
  1. The learning rate warms up linearly over `--lr-warmup` RL steps (rollout batches, not
     optimizer steps; not in the papers): Adam's first steps move every weight by about lr
     whatever its gradient.
  2. pass@k, avg@k and maj@k are measured with n = k samples per problem.
  3. The tiny model's defaults (padded answers, τ = 1, one pass in M = 4 mini-batch steps, lr 5e-5,
     16 prompts × 8 samples) were chosen by experiment (docs/EXPERIMENTS.md). For real models (lr
     1e-6, 512 new tokens) they are the usual starting points, not measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import models
from math_tasks import (Arithmetic, UsageError, evaluate, extract_answer, load_data, make_prompt, math_reward,
                        prompt_kind)
from pmd_mean import ALGORITHMS, PMDConfig, SamplerMismatch, pmd_step, refresh_sampler, sample_rollouts, sampler_copy

TIMING_KEYS = ("time_sampling", "time_scoring", "time_logprobs", "time_update", "time_kl", "tokens_per_s")
# What a run writes into --out: --overwrite removes exactly these, and nothing else there.
RUN_FILES = ("run.json", "metrics.jsonl", "eval.jsonl", "summary.json", "training.png", "checkpoint",
             "checkpoint.new", "final")
# The flags a resumed run may be given; the others are the run's own and stay as it was started.
RESUMABLE = {"resume", "steps", "device", "no_plot", "tiny_cache"}


# -----------------------------------------------------------------------------
# Checkpoints: each written in full to a folder of its own, then made `checkpoint` in one atomic step


def save_checkpoint(out: Path, model, tokenizer, optimizer, step: int, run_id: str) -> None:
    """checkpoint-NNNNNN/ in full, then the link `checkpoint` swapped to it by one rename, then the
    older ones removed: at every instant `checkpoint` is a complete checkpoint (or none yet).
    state.pt holds tensors and numbers only, so that resuming needs no pickle (`load_checkpoint`)."""
    new = out / f"checkpoint-{step:06d}"
    shutil.rmtree(new, ignore_errors=True)                                 # a save of this step cut short before
    model.save_pretrained(new)
    tokenizer.save_pretrained(new)
    numpy_state = np.random.get_state()
    torch.save({
        "step": step,                                # steps done; also the data position (step·P)
        "run_id": run_id,
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "rng_python": random.getstate(),
    }, new / "state.pt")
    link = out / "checkpoint.new"
    link.unlink(missing_ok=True)
    link.symlink_to(new.name)
    os.replace(link, out / "checkpoint")                                   # atomic: the old one or the new one
    for old in out.glob("checkpoint-*"):
        if old != new:
            shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_state(ckpt: Path) -> dict:
    """state.pt, read with weights_only=True: tensors and numbers only, never code. A file that holds
    anything else (a pickled object, which could run code when loaded) is refused unread."""
    try:
        return torch.load(ckpt / "state.pt", weights_only=True)
    except Exception as e:
        raise UsageError(f"{ckpt / 'state.pt'} is not a checkpoint this script wrote (it cannot be read as "
                         f"tensors and numbers only: {type(e).__name__}); nothing was loaded from it.") from None


def load_checkpoint(state: dict, optimizer) -> int:
    """Restore the optimizer and every random generator from `read_checkpoint_state`'s dict."""
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    name, keys, *rest = state["rng_numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return state["step"]


def read_jsonl(path: Path, run_id: str | None = None) -> list[dict]:
    """The lines of a metrics.jsonl or eval.jsonl file. A torn last line (the run was killed while
    writing it) is dropped; any other bad line, or a line of another run, is refused in one sentence."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise UsageError(f"{path}, line {i}: not valid JSON (the file is damaged).") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UsageError(f"{path}, line {i}: not a line this script wrote (no step).")
        if run_id is not None and row.get("run_id") != run_id:
            raise UsageError(f"{path} mixes two runs: line {i} belongs to run {row.get('run_id')}, "
                             f"the folder's run.json to run {run_id}.")
        rows.append(row)
    return rows


def read_run(folder: Path) -> dict:
    """A run folder's run.json, checked: refused in one sentence if it is not one this script wrote."""
    try:
        run = json.loads((folder / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{folder / 'run.json'} cannot be read as JSON ({type(e).__name__}).") from None
    if not (isinstance(run, dict) and isinstance(run.get("run_id"), str) and isinstance(run.get("args"), dict)
            and isinstance(run.get("config"), dict)):
        raise UsageError(f"{folder / 'run.json'} is not a run.json this version of train_math.py wrote.")
    return run


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def fail(message):                                                     # argparse's own errors: one sentence too
        raise UsageError(message + ".")
    p.error = fail
    # model and data
    p.add_argument("--model", default="tiny", help="tiny | a short name (" + ", ".join(models.SHORT_NAMES)
                   + ") | a hub id | a local directory | a .gguf file")
    p.add_argument("--data", default="arithmetic", help="arithmetic | a GSM8K-format JSONL path | gsm8k (needs `datasets` and network)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: a seeded 10%% of --data)")
    p.add_argument("--digits", type=int, default=2, help="arithmetic difficulty: digits per operand (1 to 9)")
    p.add_argument("--ops", default="+", help="arithmetic operators, e.g. + or +- (minus can give negatives)")
    p.add_argument("--terms", type=int, default=2,
                   help="numbers per problem (2 to 10); 3 or more: answers are worked chains, 12+34+56=46+56=102")
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True,
                   help="arithmetic: the warm start writes answers zero-padded to one width, 12+34=046 "
                   "(default; --no-pad: 12+34=46, the task of some of the README's experiments)")
    p.add_argument("--warmup-accuracy", type=float, default=models.WARMUP_ACCURACY,
                   help="tiny model: warm-start until this share of 500 training problems is right")
    p.add_argument("--warmup-steps", type=int, default=models.WARMUP_STEPS,
                   help="tiny model: at most this many warm-start steps")
    p.add_argument("--cache", "--tiny-cache", dest="tiny_cache", default="~/.cache/pmd_mean", metavar="DIR",
                   help="where the tiny model and models converted from a GGUF file are cached")
    p.add_argument("--fresh", action="store_true", help="rebuild the tiny model")
    # the algorithm
    p.add_argument("--algo", default="pmd-mean", help=" | ".join(ALGORITHMS))
    p.add_argument("--tau", type=float, default=None, help="τ (default: PMDConfig.tau)")
    p.add_argument("--baseline-tau", type=float, default=None,
                   help="τ_b of pmd-tempered's baseline, ≥ τ (default 10·τ)")
    p.add_argument("--loss-norm", default="token", help="PMD's loss per response: token (÷|y|, eq. 5, OpenKimi's; "
                   "default) | sequence (no ÷|y|: the paper's regression, eq. 2)")
    p.add_argument("--samples-per-prompt", "-k", type=int, default=8, help="K samples per prompt")
    p.add_argument("--prompts-per-step", type=int, default=16, help="P prompts per step")
    p.add_argument("--updates", type=int, default=1, help="passes over each rollout batch")
    p.add_argument("--minibatches", "-m", type=int, default=None,
                   help="M: mini-batches per pass, one optimizer step each (default 4, or P if smaller; the paper: 16)")
    p.add_argument("--reset-optimizer", action="store_true", help="clear Adam's state every iteration (Kimi K1.5)")
    p.add_argument("--reward-bounds", type=float, nargs=2, default=None, metavar=("LB", "UB"),
                   help="groups whose mean reward is not inside (LB, UB) get weight 0 (default: off)")
    p.add_argument("--no-leave-one-out", action="store_true", help="baseline includes the sample itself")
    # optimisation and sampling
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 5e-5 tiny, 1e-6 otherwise)")
    p.add_argument("--lr-warmup", type=int, default=20,
                   help="RL steps (rollout batches, not optimizer steps) of linear learning-rate warm-up")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward")
    p.add_argument("--max-new-tokens", type=int, default=None, help="response budget (default 8 tiny, 512 otherwise)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--dtype", default=None, help="compute dtype, float32 | bfloat16 (default: bfloat16 where the "
                   "device computes it fast, else float32); the weights the optimizer updates are float32 either way")
    # the run
    p.add_argument("--steps", type=int, default=200, help="RL steps in all (a resumed run counts the earlier ones)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at the start and end)")
    p.add_argument("--eval-problems", type=int, default=500, help="distinct held-out problems per evaluation")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="k samples per held-out problem for pass@k, avg@k, maj@k (default K; 0: greedy only)")
    p.add_argument("--eval-batch", type=int, default=512, help="sequences per sampling batch in evaluation")
    p.add_argument("--checkpoint-every", type=int, default=50, help="write a checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="seeds model init, data order and sampling")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--out", default=None, help="output directory (default: a new folder in runs/)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (removes only its own files)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR, as it was started")
    p.add_argument("--no-plot", action="store_true", help="skip training.png")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, set]:
    """(all flags with their defaults, the names of the flags the command line gave)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    only_given = build_parser()
    for action in only_given._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(only_given.parse_args(argv)))


def check_flags(args) -> None:
    """The flags PMDConfig does not check itself: each bad value ends in one sentence naming its flag."""
    if args.algo not in ALGORITHMS:
        raise UsageError(f"unknown --algo {args.algo!r}: use one of {', '.join(ALGORITHMS)}.")
    for name in ("prompts_per_step", "eval_every", "eval_problems", "checkpoint_every", "digits",
                 "lr_warmup", "warmup_steps", "eval_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if args.steps < 0 or (args.eval_samples or 0) < 0:
        raise UsageError("--steps and --eval-samples must be at least 0.")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32) (got {args.seed}).")
    # Upper bounds where a size would only hang or exhaust memory (the sampler's own are in check_memory).
    for name, top in (("digits", 9), ("terms", 10), ("eval_problems", 100_000)):
        if getattr(args, name) > top:
            raise UsageError(f"--{name.replace('_', '-')} must be at most {top} (got {getattr(args, name)}).")
    if args.terms < 2:
        raise UsageError(f"--terms must be at least 2 (got {args.terms}).")
    if args.ops == "" or set(args.ops) - set("+-"):
        raise UsageError(f"--ops must be made of + and - (got {args.ops!r}).")
    if not 0 < args.warmup_accuracy <= 1:
        raise UsageError(f"--warmup-accuracy must be in (0, 1] (got {args.warmup_accuracy}).")
    if args.minibatches is not None and args.minibatches > args.prompts_per_step:
        raise UsageError(f"--minibatches {args.minibatches} is more than the {args.prompts_per_step} prompt groups "
                         "a batch can be split into (mini-batches hold whole groups).")
    if args.out is not None and not args.out.strip():
        raise UsageError("--out must name a directory (it is empty).")


def make_config(args) -> PMDConfig:
    """The PMDConfig the flags describe; the script's defaults where a flag is not given."""
    given = {"lr": args.lr, "max_new_tokens": args.max_new_tokens, "tau": args.tau,
             "micro_batch_size": args.micro_batch, "baseline_tau": args.baseline_tau}
    kw = {**models.model_defaults(args.model, args.terms), **{k: v for k, v in given.items() if v is not None}}
    try:
        return PMDConfig(**ALGORITHMS[args.algo], leave_one_out=not args.no_leave_one_out, loss_norm=args.loss_norm,
                         samples_per_prompt=args.samples_per_prompt, temperature=args.temperature,
                         grad_checkpointing=args.grad_checkpointing, dtype=args.dtype,
                         reset_optimizer=args.reset_optimizer, updates_per_batch=args.updates,
                         minibatches=args.minibatches if args.minibatches is not None else min(4, args.prompts_per_step),
                         reward_bounds=tuple(args.reward_bounds) if args.reward_bounds else None, **kw)
    except ValueError as e:                                                # PMDConfig's one sentence
        raise UsageError(str(e)) from None


def check_writable(folder: Path, what: str) -> None:
    """Fail early if `folder` cannot be created or written, without creating anything."""
    p = folder.expanduser().resolve()
    while not p.exists():
        p = p.parent
    try:                                                                   # a real try: root passes os.access
        if not p.is_dir():                                                 # everywhere, /proc still refuses
            raise NotADirectoryError
        os.rmdir(tempfile.mkdtemp(dir=p))
    except OSError:
        raise UsageError(f"cannot write to the {what} {folder} ({p} is not a writable directory).") from None


def check_out(out: Path, overwrite: bool) -> None:
    """A new run's folder must be empty, or hold a run that --overwrite replaces. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} is not empty; pass --overwrite to replace the run there, "
                         f"--resume {out} to continue it, or choose another --out.")
    check_writable(out, "output directory")


def check_memory(args, cfg: PMDConfig, config, device: str, prompt_tokens: int) -> None:
    """Refuse, before any work, a sampling batch this machine cannot hold: its KV cache (every layer's
    keys and values for B rows × prompt + response tokens) and its (B, V) float32 logits, where B is
    the larger of a training batch (P·K) and an evaluation batch."""
    eval_k = cfg.samples_per_prompt if args.eval_samples is None else args.eval_samples
    B = max(args.prompts_per_step * cfg.samples_per_prompt,
            min(max(args.eval_batch, eval_k), args.eval_problems * max(eval_k, 1)))
    L = prompt_tokens + cfg.max_new_tokens
    layers, V = config.num_hidden_layers, config.vocab_size
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = 4 if cfg.dtype == "float32" else 2
    need = 2 * layers * B * L * heads * head_dim * width + 4 * 4 * B * V
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines()) \
            if Path("/proc/meminfo").is_file() else {}
        free = int(meminfo["MemAvailable"].split()[0]) * 1024 if "MemAvailable" in meminfo else float("inf")
    if need > 0.9 * free:
        raise UsageError(f"sampling {B} sequences of up to {L} tokens (--prompts-per-step × -k, --eval-batch or "
                         f"--eval-samples, with --max-new-tokens) needs about {need / 2**30:,.1f} GiB, more than "
                         f"the {free / 2**30:,.1f} GiB available here.")


def longest_prompt(problems: list[dict], tokenizer, kind: str) -> int:
    """Tokens in the longest prompt of `problems` (by characters, then tokenized: a few, not all)."""
    texts = sorted((make_prompt(p, tokenizer, kind) for p in problems), key=len)[-8:]
    return max(len(tokenizer(t)["input_ids"]) for t in texts)


def default_out(args) -> Path:
    model = Path(args.model).name.removesuffix(".gguf") or "model"
    return Path("runs") / f"{args.algo}-{model}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def plot(out: Path, metrics: list[dict], evals: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 5, figsize=(20, 3.2))
    steps, e_steps = [m["step"] for m in metrics], [e["step"] for e in evals]
    ax[0].plot(steps, [m["reward"] for m in metrics]); ax[0].set_title("mean reward (training samples)")
    for key in [k for k in evals[0] if k == "accuracy" or "@" in k]:      # accuracy, pass@k, avg@k, maj@k
        ax[1].plot(e_steps, [e.get(key, float("nan")) for e in evals], "o-", label=key)
    ax[1].set_title("held-out"); ax[1].legend(fontsize=7)
    ax[2].plot(steps, [m["kl"] for m in metrics]); ax[2].set_title("KL(π_t ‖ π_θ) after the update")
    if "chi2_weight" in metrics[0]:                                        # PMD losses only
        ax[3].plot(steps, [m["chi2_weight"] for m in metrics]); ax[3].set_title("implied χ² weight (τ × mean residual)")
    else:
        ax[3].plot(steps, [m["tau_kl"] for m in metrics]); ax[3].set_title("τ·KL(π_t ‖ π_θ)")
    ax[4].plot(steps, [m.get("entropy", float("nan")) for m in metrics]); ax[4].set_title("entropy of π_t (nats/token)")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# A run to continue: everything read and checked before anything is written


def resumed_run(args, given: set) -> tuple[argparse.Namespace, PMDConfig, dict, dict]:
    """(args, config, run.json, checkpoint state) of the run in --resume DIR, as it was started: its
    --steps unless given, and no flag that would change what it computes."""
    out = Path(args.resume)
    if not (out / "run.json").is_file():
        raise UsageError(f"--resume {out}: no run there (no run.json).")
    fixed = sorted(given - RESUMABLE - ({"out"} if args.out and Path(args.out) == out else set()))
    if fixed:
        names = ", ".join("--" + f.replace("_", "-") for f in fixed)
        raise UsageError(f"--resume continues {out} as it was started, so {names} cannot be given with it "
                         "(drop them, or start a new run with --out).")
    run = read_run(out)
    if not (out / "checkpoint" / "state.pt").is_file():
        raise UsageError(f"--resume {out}: the run stopped before its first checkpoint; start it again.")
    state = read_checkpoint_state(out / "checkpoint")
    if state.get("run_id") != run["run_id"]:
        raise UsageError(f"{out} mixes two runs: its checkpoint belongs to run {state.get('run_id')}, "
                         f"its run.json to run {run['run_id']}.")
    for name in ("metrics.jsonl", "eval.jsonl"):
        if (out / name).is_file():
            read_jsonl(out / name, run["run_id"])                          # refuses a damaged or mixed file
    saved = {**vars(build_parser().parse_args([])), **run["args"]}
    args = argparse.Namespace(**{**saved, **{k: getattr(args, k) for k in given & RESUMABLE}, "out": str(out),
                                 "resume": str(out), "overwrite": False})
    try:
        check_flags(args)
        fields = {f.name for f in dataclasses.fields(PMDConfig)}
        cfg = PMDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["config"].items() if k in fields})
    except (ValueError, TypeError) as e:
        raise UsageError(f"{out / 'run.json'} holds values this script refuses ({str(e).splitlines()[0]})") from None
    if args.steps < state["step"]:
        raise UsageError(f"--steps {args.steps} is fewer than the {state['step']} steps {out}'s checkpoint has done.")
    return args, cfg, run, state


# -----------------------------------------------------------------------------
# The training loop


def train(args, given: set) -> int:
    if args.resume:
        args, cfg, run, state = resumed_run(args, given)
        device, why, run_id = models.pick_device(args.device), "as the run was started", run["run_id"]
    else:
        check_flags(args)
        device = models.pick_device(args.device)
        args.dtype, why = models.pick_dtype(device, args.dtype)
        cfg, state, run_id = make_config(args), None, uuid.uuid4().hex[:12]
        args.out = str(args.out or default_out(args))
        check_out(Path(args.out), args.overwrite)
    out = Path(args.out)
    print(f"compute dtype: {cfg.dtype} ({why}); the optimizer updates float32 weights")

    # Every check that can fail on bad input comes before the first file is written.
    task = Arithmetic(args.digits, args.ops, args.terms, args.pad)
    train_set, test_set = load_data(args.data, args.eval_data, args.eval_problems, args.seed, task)
    check_writable(Path(args.tiny_cache), "--cache directory")
    if args.model == "tiny" and not state:
        tokenizer = models.byte_tokenizer()
        check_memory(args, cfg, models.tiny_config(len(tokenizer)), device,
                     longest_prompt(train_set + test_set, tokenizer, "tiny"))
        model, tokenizer = models.build_tiny(task, args.seed, args.warmup_accuracy, args.warmup_steps,
                                             args.tiny_cache, args.fresh, device)
        kind = "tiny"
    else:
        model, tokenizer = models.load_model(str(out / "checkpoint") if state else args.model, device, args.tiny_cache)
        kind = "tiny" if args.model == "tiny" else prompt_kind(tokenizer)
        check_memory(args, cfg, model.config, device, longest_prompt(train_set + test_set, tokenizer, kind))
    sampler = sampler_copy(model, cfg)          # the weights sampling and evaluation use: `model` in float32
    # Seed after loading: building the tiny model draws random numbers and loading it from the cache
    # does not, and a run must not depend on which happened. (A resumed run restores its RNG below.)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=device == "cuda")
    start = load_checkpoint(state, optimizer) if state else 0

    if state:  # drop lines written after the checkpoint (a crash between checkpoints): they will be redone
        for name in ("metrics.jsonl", "eval.jsonl"):
            kept = [r for r in read_jsonl(out / name, run_id) if r["step"] <= start] if (out / name).is_file() else []
            (out / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        for name in RUN_FILES + tuple(p.name for p in out.glob("checkpoint-*")):   # --overwrite: this run's files only
            path = out / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_id": run_id, "args": vars(args), "config": dataclasses.asdict(cfg),
                                              "device": device}, indent=1))
    metrics_f = (out / "metrics.jsonl").open("a")
    eval_f = (out / "eval.jsonl").open("a")
    P, K = args.prompts_per_step, cfg.samples_per_prompt
    eval_k = K if args.eval_samples is None else args.eval_samples
    t_begin = time.time()
    order = list(range(len(train_set)))
    random.Random(args.seed).shuffle(order)                                # the data order, fixed by the seed

    def log_eval(step):
        e = {"step": step, "run_id": run_id, **evaluate(sampler, tokenizer, test_set, kind, cfg, eval_k,
                                                        args.eval_batch, args.seed + 1_000_003 * (step + 1))}
        eval_f.write(json.dumps(e) + "\n"); eval_f.flush()
        return e

    def eval_line(e):
        line = f"step {e['step']}: held-out accuracy {e['accuracy']:.1%}, unparseable {e['unparseable']:.1%}"
        if eval_k:
            line += (f", pass@{eval_k} {e[f'pass@{eval_k}']:.1%}, avg@{eval_k} {e[f'avg@{eval_k}']:.1%}, "
                     f"maj@{eval_k} {e[f'maj@{eval_k}']:.1%}")
        return line + f", greedy length {e['greedy_length']:.1f} tokens"

    # Ctrl-C: finish the step in progress, write a checkpoint, exit. A second Ctrl-C stops at once.
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)")

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    last_eval = log_eval(start) if start == 0 else None
    if last_eval:
        tqdm.write(eval_line(last_eval))
    last_checkpoint = start if state else None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, dynamic_ncols=True, disable=None)
    try:
        for step in bar:
            # data position: step·P into the seeded order (so resuming needs only the step)
            batch = [train_set[order[(step * P + i) % len(order)]] for i in range(P)]
            prompts = [make_prompt(p, tokenizer, kind) for p in batch]

            t0 = time.perf_counter()
            rollouts = sample_rollouts(sampler, tokenizer, prompts, K, cfg)  # B = P·K rollouts
            t_sample = time.perf_counter() - t0
            t0 = time.perf_counter()
            rewards = [math_reward(c, batch[i // K]["answer"]) for i, c in enumerate(rollouts.completions)]  # B
            t_score = time.perf_counter() - t0
            # linear learning-rate warm-up: Adam's first steps move every weight by ≈ lr whatever its
            # gradient, which knocks a freshly warm-started model off its (sharp) optimum. Counted in
            # rollout batches: with M mini-batches, 20 batches of warm-up are 20·M optimizer steps.
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / args.lr_warmup)
            try:
                m = pmd_step(model, optimizer, rollouts, rewards, cfg)
            except FloatingPointError as e:
                where = (f"the last good checkpoint (step {last_checkpoint}) is in {out / 'checkpoint'}"
                         if last_checkpoint is not None else "no checkpoint was written before it")
                print(f"\nerror: training stopped at step {step + 1}: {e}; {where}.", file=sys.stderr)
                return 1
            except SamplerMismatch as e:
                print(f"\nerror: training stopped at step {step + 1}, before its update: {e}; the samples "
                      f"did not come from the policy being trained (docs/GLOSSARY.md, sampler_gap).",
                      file=sys.stderr)
                return 2
            refresh_sampler(sampler, model)                                # the sampler's copy follows the update
            n_tok = int(rollouts.response_lengths.sum())
            m = {"step": step + 1, "run_id": run_id, **m, "time_sampling": t_sample, "time_scoring": t_score,
                 "tokens_per_s": n_tok / max(t_sample, 1e-9),
                 "unparseable": sum(extract_answer(c) is None for c in rollouts.completions) / len(rewards)}
            metrics_f.write(json.dumps(m) + "\n"); metrics_f.flush()
            done = step + 1
            if done % args.eval_every == 0 or done == args.steps:
                last_eval = log_eval(done)
                tqdm.write(f"{eval_line(last_eval)}, reward {m['reward']:.2f}, KL {m['kl']:.4f}, "
                           f"entropy {m['entropy']:.3f}")
            if done % args.checkpoint_every == 0 or done == args.steps or stop["asked"]:
                save_checkpoint(out, model, tokenizer, optimizer, done, run_id)
                last_checkpoint = done
            bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{last_eval['accuracy']:.2f}" if last_eval else "-",
                            kl=f"{m['kl']:.3f}")
            if stop["asked"]:
                print(f"interrupted: checkpoint of {done} steps written to {out / 'checkpoint'}; "
                      f"continue with --resume {out}", file=sys.stderr)
                return 130
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        metrics_f.close()
        eval_f.close()

    metrics, evals = read_jsonl(out / "metrics.jsonl", run_id), read_jsonl(out / "eval.jsonl", run_id)
    if metrics:                                                            # --steps 0 only evaluates
        model.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
        if not args.no_plot:
            plot(out, metrics, evals)
    first, last = evals[0], evals[-1]
    (out / "summary.json").write_text(json.dumps({
        "run_id": run_id, "first_eval": first, "last_eval": last, "device": device,
        "seconds_this_run": time.time() - t_begin,                     # this process's RL steps and evaluations
        "seconds_in_phases": sum(m.get(k, 0.0) for m in metrics for k in TIMING_KEYS if k.startswith("time_"))},
        indent=1))
    k = eval_k
    extra = (f"; pass@{k} {last[f'pass@{k}']:.1%}, avg@{k} {last[f'avg@{k}']:.1%}, maj@{k} {last[f'maj@{k}']:.1%}"
             if f"pass@{k}" in last else "")
    print(f"held-out accuracy {first['accuracy']:.1%} (step {first['step']}) → {last['accuracy']:.1%} "
          f"(step {last['step']}){extra}; outputs in {out}")
    return 0


def main(argv=None) -> int:
    try:
        args, given = parse_args(argv)
        import transformers
        transformers.utils.logging.disable_progress_bar()                  # no "Loading weights" bars
        return train(args, given)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
