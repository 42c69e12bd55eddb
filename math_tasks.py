"""
math_tasks.py: what train_math.py trains on, and how it is scored: the problems (built-in arithmetic,
or GSM8K-format JSONL), the prompts, the reward (exact match on the final answer) and the held-out
evaluation. Nothing here is PMD: the algorithm is pmd_mean.py.

Departures from a plain exact-match grader:
  1. The answer is the number after the last "####", else the last number in the last \\boxed{},
     else the answer announced by "answer is", else the last number of the text (`extract_answer`).
     An empty \\boxed{} scores 0, as a refusal to answer.
  2. Numbers compare as numbers: 18.00 = 18, 3/4 = 0.75 = \\frac34, 1{,}000 = 1,000 = 1000.
  3. A gold answer must be exactly one number (`parse_gold`); a data file with another is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from pmd_mean import PMDConfig, sample_rollouts


class UsageError(Exception):
    """Bad input from the user: the scripts print it as one sentence and exit with code 2."""


# -----------------------------------------------------------------------------
# Problems: a built-in arithmetic task


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
    The test split holds n DISTINCT problems (an accuracy over repeats would claim more problems than
    it measured); the training split is a stream of draws, repeats allowed.
    """
    if split == "test":
        held_out = count_held_out(digits, ops, terms, limit=20 * n)
        if held_out is not None and n > held_out:
            raise UsageError(f"--eval-problems {n} is more than the {held_out} distinct held-out problems of "
                             f"{terms} {digits}-digit numbers with {ops!r}.")
    rng, out, seen = random.Random(f"{split}-{seed}"), [], set()
    width = len(str(terms * (10 ** digits - 1))) if pad else 0             # "46" → "046" for 2-digit sums
    while len(out) < n:
        nums, signs = arithmetic_problem(rng, digits, ops, terms)
        expression = str(nums[0]) + "".join(f"{op}{x}" for op, x in zip(signs, nums[1:]))
        if is_held_out(expression) != (split == "test") or (split == "test" and expression in seen):
            continue
        seen.add(expression)
        steps, value = [], nums[0]
        for i, (op, x) in enumerate(zip(signs, nums[1:])):
            value = value + x if op == "+" else value - x
            rest = "".join(f"{o}{y}" for o, y in zip(signs[i + 1:], nums[i + 2:]))
            steps.append(f"{value:0{width}d}{rest}")                       # "46+56" (or "046+56"), "102"
        words = str(nums[0]) + "".join(f" {op} {x}" for op, x in zip(signs, nums[1:]))  # "12 + 34"
        out.append({"question": f"{expression}=", "answer": str(value), "solution": "=".join(steps),
                    "ask": f"What is {words}? Put your final answer within \\boxed{{}}."})
    return out


def count_held_out(digits: int, ops: str, terms: int, limit: int) -> int | None:
    """How many distinct problems the held-out split has, counted when the whole space holds at most
    `limit` problems; None for a larger space (about a tenth of it is held out, plenty)."""
    signs = sorted(set(ops))
    if (10 ** digits) ** terms * len(signs) ** (terms - 1) > limit:
        return None
    numbers = range(10 ** digits)
    return sum(is_held_out(str(nums[0]) + "".join(f"{op}{x}" for op, x in zip(ops_, nums[1:])))
               for nums in itertools.product(numbers, repeat=terms)
               for ops_ in itertools.product(signs, repeat=terms - 1))


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


def answer_budget(terms: int) -> int:
    """Tokens a tiny model's answer may take: "1234<eos>" for two terms, a worked chain for more."""
    return 8 * (terms - 1)


# -----------------------------------------------------------------------------
# Problems: GSM8K-format JSONL, and the split into training and held-out problems


def load_jsonl(path: str) -> list[dict]:
    """GSM8K format: one {"question", "answer"} object a line, UTF-8, the answer ending in '#### N'."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"data file {path} is a directory, not a JSONL file.")
    if not p.is_file():
        raise UsageError(f"data file {path} does not exist.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path} is not UTF-8 text (byte {e.start} is not): is it a JSONL file?") from None
    except OSError as e:
        raise UsageError(f"data file {path} cannot be read ({e.strerror}).") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
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
        if not obj["question"].strip():
            raise UsageError(f"data file {path}, line {i}: the question is empty.")
        gold = parse_gold(obj["answer"])
        if gold is None:
            raise UsageError(f"data file {path}, line {i}: the answer must end in '#### <number>' with "
                             f"exactly one number after it (such as 18, -7, 1,234 or 3/4).")
        rows.append({"question": obj["question"], "answer": gold})
    if not rows:
        raise UsageError(f"data file {path} is empty.")
    return rows


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
        conv = lambda split: [{"question": r["question"], "answer": parse_gold(r["answer"])} for r in ds[split]]
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


# -----------------------------------------------------------------------------
# Prompts


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


def prompt_kind(tokenizer) -> str:
    """"chat" when the tokenizer has a chat template (instruct models), else "base"."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "base"


# -----------------------------------------------------------------------------
# The reward: exact match on the final answer (the parsing rules are at the end of the file)


def extract_answer(text: str) -> str | None:
    """The FINAL answer of a completion as a clean number string ("-7", "1234", "3/4"), or None.

    Looks, in order, for: the number after the last "####"; the last number in the last \\boxed{};
    the answer announced by the last "answer is"/"answer:" (`_announced_answer`: the number right
    after it, or the result of the equation that ends its sentence); else the last number in the
    text. Taking the first number of the text (a bug elsewhere) would grade the working, not the answer.
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
        announced = _announced_answer(text[hits[-1].end():])
        if announced is not None:
            return announced
    nums = _NUM_RE.findall(text)
    return _clean(nums[-1]) if nums else None


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the completion's final answer equals `gold` as a number (18.00 = 18, 3/4 = 0.75), else 0.0."""
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    gold = _normalise_text(str(gold))                                      # a gold "−7" (U+2212) is −7 too
    a, b = _to_fraction(pred), _to_fraction(gold)
    if a is None or b is None:
        return float(pred == _clean(gold))
    return float(a == b)


def parse_gold(answer: str) -> str | None:
    """The gold answer of a GSM8K-format solution: the clean number after its last "####", or None
    unless that text is exactly one number ("1,234", "-7", "$18", "0.75", "3/4", "18.").

    Stricter than `extract_answer`, which reads the first number it finds there: as a gold, "5e3"
    would become 5 and "5 apples and 3" 5, silently. Refused (None), not guessed: "5e3" (no GSM8K
    answer is written so, and the grader reads no exponents in completions: a suspect row should stop
    the run, not become 5 or 5000), "50%" (0.5 or 50?), "1,23", "" and anything else but one number.
    """
    if "####" not in answer:
        return None
    tail = _normalise_text(answer.rsplit("####", 1)[1]).strip()
    m = _NUM_RE.fullmatch(tail.removesuffix(".").strip())
    return _clean(m.group()) if m else None


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
# Evaluation on held-out problems: greedy accuracy (pass@1), pass@k, avg@k, maj@k


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


def evaluate(model, tokenizer, problems, kind, cfg: PMDConfig, k: int, batch: int, seed: int) -> dict:
    """Greedy accuracy (pass@1) and the rest of `greedy_scores`; with k > 0 also, from k samples per
    held-out problem, pass@k (any of the k is right; the paper's Best@k), avg@k (the mean correctness
    of the k) and maj@k (the most frequent answer is right, `majority_vote`). `batch`: sequences per
    sampling batch.

    Runs under its own RNG, seeded with `seed`, so that evaluating never changes the training run's
    samples.
    """
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
# Answer parsing details


# \frac{3}{4} (also \dfrac, \tfrac, \frac{-1}{2}) and LaTeX's short form \frac34 = \frac{3}{4}: an argument
# is a braced group or ONE digit. \frac123 (LaTeX: ½ then 3) is left as it is, to be read as 123,
# rather than turned into "1/23".
_FRAC_RE = re.compile(r"\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d)(?!\d))")
# A number: an optional minus (not when it follows a word character, so "3-4" is not −4), an optional
# "$", digits with optional thousands separators, an optional decimal part, an optional "/denominator".
_NUM_RE = re.compile(r"(?:(?<![\w)])-)?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))(?:\.\d+)?(?:\s?/\s?\d+)?")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
# The end of a sentence: ". ! ? ;" but not a decimal point ("12.5"), or a line break.
_SENTENCE_END_RE = re.compile(r"[.!?;](?!\d)|\n")
# An arithmetic operator, typed or in LaTeX: what makes "12 + 34 = 46" a result reached from 12.
_OPERATOR_RE = re.compile(r"[-+*/×÷]|\\times|\\cdot")


def _normalise_text(text: str) -> str:
    text = text.replace("\u2212", "-").replace("\u2013", "-")             # unicode minus and en dash
    text = text.replace("\\$", "$").replace("\\!", "").replace("\\,", "")  # 1\,000 → 1000
    text = text.replace("{,}", ",")                                        # 1{,}000 → 1,000 (LaTeX's thousands comma)
    return _FRAC_RE.sub(lambda m: f"{m[1] or m[2]}/{m[3] or m[4]}", text)  # \frac{3}{4}, \frac34 → 3/4


def _clean(num: str) -> str:
    # "".join(split()) drops every whitespace: _NUM_RE's "\s?" can take the line break before
    # "\n46", and a clean answer must not keep it
    return "".join(num.split()).replace(",", "").replace("$", "")


def _announced_answer(rest: str) -> str | None:
    """The answer in `rest`, the text after "answer is": its first number N, unless N's sentence goes
    on as arithmetic to a result, "N + ... = M" (an operator between N and the sentence's last "=",
    and M the only number after that "="), then M.

        "The answer is 46."                          → 46
        "The answer is simple: 12 + 34 = 46."        → 46 (12 is the working, 46 its result)
        "The answer is 3 apples + 4 apples = 7."     → 7
        "The answer is:\\n12 + 34 = 46"              → 46 (the sentence starts at N, not at "answer is")
        "The answer is 46. Next, 7 + 1 = 8."         → 46 (the equation is in the next sentence)
        "The answer is 46, since 46 = 40 + 6."       → 46 (two numbers after "=": a decomposition)
        "The answer is 7, where a = 3."              → 7  (no operator before "=": not N's result)
        "The answer is 5, as 5 >= 3."                → 5  ("<=", ">=", "!=", "==" are not "=")
        "The answer is 4 dollars and 5 cents"        → 4  (no "=": the number right after it)
    """
    first = _NUM_RE.search(rest)
    if first is None:
        return None
    end = _SENTENCE_END_RE.search(rest, first.end())
    end = end.start() if end else len(rest)
    eq = rest.rfind("=", first.end(), end)                                 # each step one scan: linear time
    if eq > 0 and rest[eq - 1] not in "<>!=" and _OPERATOR_RE.search(rest, first.end(), eq):
        after = _NUM_RE.findall(rest, eq + 1, end)
        if len(after) == 1:
            return _clean(after[0])
    return _clean(first.group())


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
