"""The group-size benchmark's task: two-digit addition and subtraction, split four ways, disjoint.

Universe: `a+b=` for 0 <= a, b <= M and `a-b=` for 0 <= b <= a <= M (M = 99: 10,000 + 5,050 problems),
answers written as the integer (the policy answers `\\boxed{n}`; rewards.verifier=math checks it).
Split: problems are grouped by a key under which a+b and b+a are one (a model that has seen 12+47
has in effect seen 47+12), the keys are shuffled with the split seed, and the splits take keys in the
order held_out, validation, train, warm_start until each has its size. No key is in two splits.

The warm start is the embedded tiny Llama (learner.tiny_model's tokenizer and architecture) trained
supervised on the warm-start split only, for a fixed number of steps: stopped early on purpose, so that
the base policy is right on part of the held-out set and RL has room above it.

Pure functions (no Ray, no vLLM): `problem_universe`, `split_problems`, `write_splits`; `ensure_warm_model`
trains with torch in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

SPLITS = ("held_out", "validation", "train", "warm_start")


def problem_universe(max_operand: int) -> list[dict]:
    """Every problem of the task, once, in a fixed order: rows {"problem", "answer", "source", "key"}."""
    if max_operand < 1:
        raise ValueError(f"task.max_operand must be >= 1 (got {max_operand})")
    rows = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            key = f"+{min(a, b)},{max(a, b)}"
            rows.append({"problem": f"{a}+{b}=", "answer": str(a + b), "source": "add", "key": key})
    for a in range(max_operand + 1):
        for b in range(a + 1):
            rows.append({"problem": f"{a}-{b}=", "answer": str(a - b), "source": "sub", "key": f"-{a},{b}"})
    return rows


def split_problems(max_operand: int, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Disjoint splits of the universe with exactly `sizes[name]` problems each (names from SPLITS).

    A key (a problem and its commuted twin) goes whole to one split; when a split needs one problem
    and the next key holds two, it takes the first and the other is used by no split."""
    unknown = sorted(set(sizes) - set(SPLITS))
    if unknown:
        raise ValueError(f"task: unknown split(s) {unknown}; the splits are {list(SPLITS)}")
    for name, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"task.{name}: a split size must be a positive integer (got {n!r})")
    by_key: dict[str, list[dict]] = {}
    for row in problem_universe(max_operand):
        by_key.setdefault(row["key"], []).append(row)
    keys = list(by_key)
    random.Random(seed).shuffle(keys)
    need = sum(sizes.values())
    if need > len(by_key) + sum(len(v) - 1 for v in by_key.values()):
        raise ValueError(
            f"task: the splits ask for {need} problems but max_operand={max_operand} makes only "
            f"{sum(len(v) for v in by_key.values())}"
        )
    out: dict[str, list[dict]] = {}
    it = iter(keys)
    for name in SPLITS:
        if name not in sizes:
            continue
        rows: list[dict] = []
        while len(rows) < sizes[name]:
            try:
                group = by_key[next(it)]
            except StopIteration:
                raise ValueError(
                    f"task: max_operand={max_operand} has too few problems for split {name!r} "
                    f"(after the splits before it); lower the split sizes"
                ) from None
            rows += group[: sizes[name] - len(rows)]
        out[name] = rows
    return out


def digest_rows(rows: Iterable[dict]) -> str:
    return hashlib.sha256(json.dumps([r["problem"] for r in rows]).encode()).hexdigest()[:16]


def write_splits(splits: dict[str, Sequence[dict]], folder: Path) -> dict[str, Path]:
    """One JSONL per split ({"problem", "answer", "source"} per line, the layout data.path and eval.path
    read); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in splits.items():
        path = folder / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            "".join(
                json.dumps({"problem": r["problem"], "answer": r["answer"], "source": r["source"]}) + "\n"
                for r in rows
            )
        )
        tmp.replace(path)
        paths[name] = path
    return paths


def supervised_steps(
    model, tokenizer, rows: Sequence[dict], steps: int, batch: int, lr: float, seed: int
) -> None:
    """`steps` AdamW steps of next-token loss on `\\boxed{answer}</s>` after each problem (the policy's
    answer format), batches drawn with replacement from `rows`."""
    import torch

    from learner.tiny_model import supervised_step

    rng = random.Random(seed + 17)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        picked = [rows[rng.randrange(len(rows))] for _ in range(batch)]
        supervised_step(model, opt, tokenizer, [(r["problem"], r["answer"]) for r in picked])
    model.eval()


def greedy_accuracy(model, tokenizer, rows: Sequence[dict], limit: int = 256) -> float:
    """Share of the first `limit` rows answered exactly `\\boxed{answer}` greedily (a quick check of the
    warm start; the benchmark's figures come from the engines and the verifier)."""
    import torch

    from learner.tiny_model import BOXED

    rows = list(rows)[:limit]
    correct = 0
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([tokenizer(r["problem"])["input_ids"]])
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            correct += text.strip() == f"{BOXED}{r['answer']}}}"
    return correct / max(len(rows), 1)


def ensure_warm_model(
    cache_dir: str | Path, warm_rows: Sequence[dict], steps: int, lr: float, batch: int, seed: int
) -> Path:
    """The tiny Llama warm-started on `warm_rows`, built once and cached under a name that hashes
    everything that shapes its weights (written to a temp folder, then renamed)."""
    from learner.tiny_model import ARCH, VOCAB, build_model, build_tokenizer

    key = json.dumps(
        {
            "arch": ARCH,
            "vocab": VOCAB,
            "rows": digest_rows(warm_rows),
            "steps": steps,
            "lr": lr,
            "batch": batch,
            "seed": seed,
        }
    )
    root = Path(os.path.expanduser(str(cache_dir)))
    final = root / f"tiny-arith-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (final / "duet_model.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    tokenizer = build_tokenizer(tmp)
    model = build_model(tmp, seed)
    supervised_steps(model, tokenizer, warm_rows, steps, batch, lr, seed)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "duet_model.json").write_text(
        json.dumps(
            {"task": "two-digit add/sub warm start", "greedy_accuracy_warm_rows": None, "key": key}, indent=1
        )
    )
    try:
        tmp.rename(final)
    except OSError:  # built by another process meanwhile
        if not (final / "duet_model.json").exists():
            raise
    return final
