"""The tool task and the embedded tool model: a three-digit by a two-digit multiplication, which the tiny model
cannot do alone and can with its tool.

An episode of the format the model is warm-started on (the character tokenizer of learner/tiny_model.py,
with `<call>`, `</call>`, `<result>` and `</result>` as single tokens):

    prompt 123*45=   model <call>123*45</call>   observation <result>5535</result>   model \\boxed{5535}</s>

The warm start teaches only that format: the call's operands are copies of the problem's with each digit
wrong with probability `noise` (so the call often asks the wrong product), and the answer copies the
observation. The base policy thus answers right about as often as it copies both operands right: poor but
not zero, and what RL can improve is the use of the tool, not multiplication. `calculator` and `python`
accept the same call (an expression is a Python program whose value the python tool prints).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from envs.base import CALL_END, CALL_START, RESULT_END, RESULT_START

TOOL_TOKENS = (CALL_START, CALL_END, RESULT_START, RESULT_END)
# The embedded tool model's warm start (`duet train env.name=calculator` with model.path unset).
WARM_START = {"steps": 300, "lr": 3e-3, "batch": 64, "noise": 0.25, "seed": 0}


def multiplication_problem(a: int, b: int) -> dict:
    return {"problem": f"{a}*{b}=", "answer": str(a * b), "source": "synthetic-mul"}


def multiplication_rows(n: int, seed: int) -> list[dict]:
    """n problems a*b (100 <= a <= 999, 10 <= b <= 99), drawn with the seed."""
    rng = random.Random(seed)
    return [multiplication_problem(rng.randint(100, 999), rng.randint(10, 99)) for _ in range(n)]


def multiplication_universe() -> list[tuple[int, int]]:
    """Every (a, b) of the task, in a fixed order (900 × 90 = 81,000 problems)."""
    return [(a, b) for a in range(100, 1000) for b in range(10, 100)]


def noisy(number: int, noise: float, rng: random.Random) -> int:
    """`number` with each digit replaced, with probability `noise`, by another digit (the first never by 0)."""
    digits = list(str(number))
    for i, d in enumerate(digits):
        if rng.random() < noise:
            choices = [c for c in "0123456789" if c != d and (i > 0 or c != "0")]
            digits[i] = rng.choice(choices)
    return int("".join(digits))


def episode_segments(a: int, b: int, noise: float, rng: random.Random) -> list[tuple[str, bool]]:
    """A warm-start episode as (text, trained) segments after the prompt: the call (trained), the tool's
    observation (context only), the answer (trained; the end-of-sequence token follows it)."""
    x, y = noisy(a, noise, rng), noisy(b, noise, rng)
    product = str(x * y)
    return [
        (f"{CALL_START}{x}*{y}{CALL_END}", True),
        (f"{RESULT_START}{product}{RESULT_END}", False),
        (f"\\boxed{{{product}}}", True),
    ]


def supervised_step(model, opt, tokenizer, batch: list[tuple[str, list[tuple[str, bool]]]]) -> float:
    """One optimizer step of next-token loss on the trained segments of each (prompt, segments) (the
    end-of-sequence token after the last segment is trained too)."""
    import torch

    rows = []
    for prompt, segments in batch:
        ids, labels = list(tokenizer(prompt)["input_ids"]), [-100] * len(tokenizer(prompt)["input_ids"])
        for text, trained in segments:
            piece = tokenizer(text)["input_ids"]
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        rows.append((ids, labels))
    width = max(len(i) for i, _ in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for k, (i, lab) in enumerate(rows):
        input_ids[k, : len(i)] = torch.tensor(i)
        label_ids[k, : len(lab)] = torch.tensor(lab)
        attn[k, : len(i)] = 1
    loss = model(input_ids=input_ids, attention_mask=attn, labels=label_ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def warm_start(
    model,
    tokenizer,
    problems: Sequence[tuple[int, int]],
    steps: int,
    lr: float,
    batch: int,
    noise: float,
    seed: int,
) -> float:
    """`steps` AdamW steps on warm-start episodes of `problems` (drawn with replacement); the last loss."""
    import torch

    rng = random.Random(seed + 17)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = float("nan")
    threads = torch.get_num_threads()
    # One thread: a model this small gains nothing from more, and on a busy machine OpenMP's spinning threads
    # made each step 6x slower (measured: 0.95 s vs 0.15 s per step at load 5 on 2 cores).
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            picked = [problems[rng.randrange(len(problems))] for _ in range(batch)]
            loss = supervised_step(
                model, opt, tokenizer, [(f"{a}*{b}=", episode_segments(a, b, noise, rng)) for a, b in picked]
            )
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return loss


def ensure_tool_model(
    cache_dir: str | Path,
    problems: Sequence[tuple[int, int]] | None = None,
    steps: int = WARM_START["steps"],
    lr: float = WARM_START["lr"],
    batch: int = WARM_START["batch"],
    noise: float = WARM_START["noise"],
    seed: int = WARM_START["seed"],
) -> Path:
    """The tiny Llama warm-started on the tool-call format (see the module docstring), built once and cached
    under a name that hashes everything that shapes its weights. `problems`: the (a, b) it may see (the
    benchmark's warm-start split); default: the whole task."""
    from learner.tiny_model import ARCH, VOCAB, build_model, build_tokenizer

    problems = list(problems) if problems is not None else multiplication_universe()
    key = json.dumps(
        {
            "arch": ARCH,
            "vocab": [*VOCAB, *TOOL_TOKENS],
            "problems": hashlib.sha256(json.dumps(problems).encode()).hexdigest()[:16],
            "steps": steps,
            "lr": lr,
            "batch": batch,
            "noise": noise,
            "seed": seed,
        }
    )
    root = Path(os.path.expanduser(str(cache_dir)))
    final = root / f"tiny-tool-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (final / "duet_model.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    tokenizer = build_tokenizer(tmp, TOOL_TOKENS)
    model = build_model(tmp, seed)
    loss = warm_start(model, tokenizer, problems, steps, lr, batch, noise, seed)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "duet_model.json").write_text(
        json.dumps({"task": "tool-call format, multiplication", "final_loss": loss, "key": key}, indent=1)
    )
    try:
        tmp.rename(final)
    except OSError:  # built by another process meanwhile
        if not (final / "duet_model.json").exists():
            raise
    return final
