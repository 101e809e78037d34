"""Evaluation: avg@n and pass@k of a policy on problems with reference answers, per data source.

    duet eval --model PATH --dataset FILE [--dataset FILE ...] [--samples-per-prompt n]
              [--temperature t] [--top-p p] [--top-k k] [--max-tokens m] [--num-engines N]
              [--problem-field f] [--answer-field f] [--source-field f] [--prompt-template T]
              [--max-prompts N] [--out FILE.json] [--config FILE] [section.field=value ...]

The same RolloutEngine actors as training sample n completions per problem (through a RolloutFleet),
the RewardPool scores them, and the results are summarised as
- avg@n: the mean accuracy over all n samples of every problem (the paper's Mean@n);
- pass@k for k = 1, 2, 4, ... ≤ n and k = n, with the unbiased estimator (Chen et al., 2021)

      pass@k = mean over problems of  1 − C(n − c, k) / C(n, k)

  where c of the problem's n samples are correct. pass@1 = c/n averaged, so pass@1 equals avg@n;
- the mean completion length (tokens) and the share of completions cut at max_tokens
  (finish_reason == "length");
overall and per data source. A sample is correct when the verifier's reason is "correct".

Dataset layouts (JSONL or Parquet; one problem per row), as commonly published:
- MATH-500 (HuggingFaceH4/MATH-500): "problem", "answer" (LaTeX), plus "solution", "subject",
  "level", "unique_id". `--source-field subject` gives per-subject metrics.
- AMC 2023 (math-ai/amc23): "question", "answer" (numbers, often floats such as 27.0; integral floats
  are written as integers); AI-MO/aimo-validation-amc: "problem", "answer".
- AIME 2025 (opencompass/AIME2025): "question", "answer"; (yentinglin/aime_2025,
  MathArena/aime_2025): "problem", "answer" (integers).
When the configured field is in no row, the first of the common aliases that the first row has is
used instead (problem: problem, question, prompt; answer: answer, final_answer, ground_truth,
expected_answer), and the choice is printed. A row without a source gets the file's stem
(`aime2025.jsonl` → "aime2025"), so several `--dataset` files are reported apart.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.config import Config, ConfigError, DataConfig, load_config, validate_tree
from cluster.data import DatasetError, read_rows, rows_to_prompts, synthetic_rows
from cluster.records import Completion, Prompt, VerifyItem

PROBLEM_ALIASES = ("problem", "question", "prompt")
ANSWER_ALIASES = ("answer", "final_answer", "ground_truth", "expected_answer")


# ---------------------------------------------------------------- metrics (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 − C(n − c, k) / C(n, k), with c of n samples correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """The k of pass@k reported for n samples: powers of two below n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return [*ks, n]


def _count(x: Any) -> int:
    return int(sum(x)) if isinstance(x, (list, tuple)) else int(x)


def _summarize_one(records: Sequence[dict]) -> dict:
    n = min(r["n"] for r in records)
    out: dict[str, float | int] = {
        "avg@n": sum(_count(r["correct"]) / r["n"] for r in records) / len(records)
    }
    for k in ks_for(n):
        out[f"pass@{k}"] = sum(pass_at_k(r["n"], _count(r["correct"]), k) for r in records) / len(records)
    lengths = [length for r in records for length in r["lengths"]]
    completions = sum(r["n"] for r in records)
    out["mean_length"] = sum(lengths) / max(len(lengths), 1)
    out["truncated_fraction"] = sum(_count(r["truncated"]) for r in records) / max(completions, 1)
    out["problems"] = len(records)
    out["samples"] = n
    out["completions"] = completions
    return out


def summarize(records: Sequence[dict]) -> dict:
    """Overall and per-source metrics of per-problem records.

    A record is `{"source": str, "n": samples, "correct": count (or list of bools),
    "lengths": [tokens per completion], "truncated": count (or list of bools)}`. Returns
    `{"overall": {"avg@n", "pass@1", "pass@2", ..., "pass@n", "mean_length", "truncated_fraction",
    "problems", "samples", "completions"}, "by_source": {source: {same keys}}}`; with problems of
    different n, k runs up to the smallest n.
    """
    if not records:
        raise ValueError("summarize: no records")
    by_source: dict[str, list[dict]] = {}
    for r in records:
        by_source.setdefault(str(r.get("source", "")), []).append(r)
    return {
        "overall": _summarize_one(records),
        "by_source": {src: _summarize_one(rs) for src, rs in sorted(by_source.items())},
    }


def eval_metrics(summary: dict, prefix: str = "eval/") -> dict[str, float]:
    """Flat metrics for metrics.jsonl: `eval/avg@n`, `eval/pass@k`, ... (overall), and
    `eval/<source>/avg@n` etc. when there is more than one source."""
    out = {f"{prefix}{k}": v for k, v in summary["overall"].items()}
    if len(summary["by_source"]) > 1:
        for src, m in summary["by_source"].items():
            out.update({f"{prefix}{src or 'unknown'}/{k}": v for k, v in m.items()})
    return out


# ---------------------------------------------------------------- datasets


def _pick_field(rows: list[dict], wanted: str, aliases: Sequence[str], what: str, origin: str) -> str:
    if any(wanted in r for r in rows) or not rows:
        return wanted
    for alias in aliases:
        if alias in rows[0]:
            print(f"evaluation: {origin}: no {what} field {wanted!r}; using {alias!r}", file=sys.stderr)
            return alias
    raise DatasetError(
        f"{origin}: no row has the {what} field {wanted!r} (nor any of {list(aliases)}); "
        f"row 0 has {sorted(rows[0])}"
    )


def _clean_answer(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # AMC23 ships 27.0 for 27
    return value


def prompts_from_rows(
    rows: list[dict],
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    source_field: str = "source",
    prompt_template: str = "{problem}",
    default_source: str = "",
    max_prompts: int | None = None,
    origin: str = "dataset",
) -> list[Prompt]:
    """Validate rows (resolving field aliases) and turn them into prompts; bad rows raise DatasetError."""
    problem_field = _pick_field(rows, problem_field, PROBLEM_ALIASES, "problem", origin)
    answer_field = _pick_field(rows, answer_field, ANSWER_ALIASES, "answer", origin)
    rows = [
        {
            **r,
            answer_field: _clean_answer(r.get(answer_field)),
            source_field: r.get(source_field) or default_source,
        }
        for r in rows
    ]
    data = DataConfig(
        problem_field=problem_field,
        answer_field=answer_field,
        source_field=source_field,
        prompt_template=prompt_template,
    )
    try:
        prompts = rows_to_prompts(rows, data, origin=origin)
    except (KeyError, IndexError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"prompt template {prompt_template!r} cannot be applied: {e!r}") from None
    return prompts[:max_prompts] if max_prompts else prompts


def load_eval_file(path: str | Path, cfg: Config) -> list[Prompt]:
    """One evaluation file with cfg.eval's field names and cfg.data's prompt template."""
    e = cfg.eval
    if not Path(path).is_file():
        raise DatasetError(f"evaluation dataset {path}: no such file")
    return prompts_from_rows(
        read_rows(path),
        problem_field=e.problem_field,
        answer_field=e.answer_field,
        source_field=e.source_field,
        prompt_template=cfg.data.prompt_template,
        default_source=Path(path).stem,
        max_prompts=e.max_prompts,
        origin=str(path),
    )


def eval_prompts(cfg: Config) -> list[Prompt]:
    """The held-out set of cfg.eval: its file, or (synthetic task) a synthetic set of its own seed."""
    e = cfg.eval
    if e.path is not None:
        return load_eval_file(e.path, cfg)
    if cfg.data.path is not None:
        raise ConfigError("eval.path: required to evaluate when data.path is set (no held-out set)")
    rows = synthetic_rows(e.synthetic_problems, cfg.data.synthetic_max_operand, e.synthetic_seed)
    return prompts_from_rows(
        rows, prompt_template=cfg.data.prompt_template, max_prompts=e.max_prompts, origin="synthetic"
    )


def eval_sampling(cfg: Config) -> dict:
    """Sampling settings of evaluation (cfg.eval; max_tokens defaults to rollout.max_tokens)."""
    e = cfg.eval
    return {
        "temperature": e.temperature,
        "top_p": e.top_p,
        "top_k": e.top_k,
        "max_tokens": e.max_tokens or cfg.rollout.max_tokens,
    }


# ---------------------------------------------------------------- running it


def generate(fleet_or_engines: Any, prompts: list[Prompt], n: int, sampling: dict) -> list[list[Completion]]:
    """n completions per prompt, in the prompts' order, from a RolloutFleet or a list of engine handles."""
    import ray

    prompts = [Prompt(i, p.text, p.answer, p.source) for i, p in enumerate(prompts)]  # index = position
    if hasattr(fleet_or_engines, "submit"):
        submitted = fleet_or_engines.submit(prompts, n, sampling=sampling)
    else:
        engines = list(fleet_or_engines)
        chunks = [prompts[i :: len(engines)] for i in range(len(engines))]
        submitted = [
            (k, chunk, engines[k].generate.remote(chunk, n, sampling))
            for k, chunk in enumerate(chunks)
            if chunk
        ]
    groups: list[list[Completion]] = [[] for _ in prompts]
    for _, chunk, ref in submitted:
        for p, group in zip(chunk, ray.get(ref), strict=True):
            groups[p.index] = group
    return groups


def evaluate(
    fleet_or_engines: Any,
    reward_pool: Any,
    prompts: list[Prompt],
    n: int,
    sampling: dict,
    verifier: str = "math",
) -> dict:
    """Sample n completions per prompt, score them, and summarize (see `summarize`).

    `fleet_or_engines`: a RolloutFleet (its current weights: the driver calls this between steps)
    or a list of RolloutEngine handles. `reward_pool`: a RewardPool. Adds `elapsed_s` to the result.
    """
    t0 = time.perf_counter()
    groups = generate(fleet_or_engines, prompts, n, sampling)
    items = [
        VerifyItem(completion=c.text, reference=p.answer, verifier=verifier, prompt=p.text)
        for p, group in zip(prompts, groups)
        for c in group
    ]
    results = iter(reward_pool.score(items))
    records = []
    for p, group in zip(prompts, groups):
        correct = sum(next(results).reason == "correct" for _ in group)
        records.append(
            {
                "source": p.source,
                "n": len(group),
                "correct": correct,
                "lengths": [len(c.token_ids) for c in group],
                "truncated": sum(c.finish_reason == "length" for c in group),
            }
        )
    summary = summarize(records)
    summary["elapsed_s"] = time.perf_counter() - t0
    return summary


def format_table(summary: dict) -> str:
    """A plain-text table: one row per source and one overall."""
    keys = [k for k in summary["overall"] if k.startswith(("avg@", "pass@"))]
    head = ["source", "problems", *keys, "mean len", "truncated"]
    rows = [[src, m] for src, m in summary["by_source"].items()]
    if len(rows) > 1:
        rows.append(["overall", summary["overall"]])
    lines = []
    table = [head] + [
        [
            src or "(none)",
            str(m["problems"]),
            *[f"{m.get(k, float('nan')):.3f}" for k in keys],
            f"{m['mean_length']:.1f}",
            f"{m['truncated_fraction']:.3f}",
        ]
        for src, m in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        lines.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_model(path: str) -> None:
    p = Path(path).expanduser()
    if not p.is_dir() and not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", path):
        raise ConfigError(f"--model: {path!r} is not a folder (nor a Hugging Face hub id)")
    if p.is_dir() and not (p / "config.json").exists():
        raise ConfigError(
            f"--model: {path!r} has no config.json (for a `duet train` run, use "
            "RUN_DIR/checkpoints/step_XXXXXX/hf)"
        )


def _check_lengths(model_path: str, prompts: list[Prompt], cfg: Config, max_tokens: int) -> None:
    """Fail before starting engines when a prompt cannot fit in rollout.max_model_len."""
    file = Path(model_path).expanduser() / "tokenizer.json"
    if not file.is_file():  # a hub id or a slow tokenizer: the engine will say
        return
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(file))
    longest = max(len(enc.ids) for enc in tok.encode_batch([p.text for p in prompts]))
    if longest + max_tokens > cfg.rollout.max_model_len:
        raise ConfigError(
            f"rollout.max_model_len: {cfg.rollout.max_model_len} tokens cannot hold the longest prompt "
            f"({longest}) plus max_tokens ({max_tokens}); pass rollout.max_model_len={longest + max_tokens}"
        )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="duet eval",
        description="avg@n and pass@k of a model on problems with reference answers (see cluster/evaluation.py).",
    )
    ap.add_argument(
        "--model", help="HF model folder (e.g. RUN_DIR/checkpoints/step_XXXXXX/hf); default: tiny"
    )
    ap.add_argument(
        "--dataset",
        action="append",
        help="JSONL or Parquet file (repeatable); default: eval.path, else the synthetic held-out set",
    )
    ap.add_argument("--samples-per-prompt", "-n", type=int, help="n (default eval.samples_per_prompt)")
    ap.add_argument("--temperature", type=float)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--max-tokens", type=int, help="default: eval.max_tokens, else rollout.max_tokens")
    ap.add_argument("--num-engines", type=int)
    ap.add_argument("--problem-field")
    ap.add_argument("--answer-field")
    ap.add_argument("--source-field")
    ap.add_argument("--prompt-template", help="Python format string with {problem}")
    ap.add_argument("--max-prompts", type=int, help="only the first N problems (of each file)")
    ap.add_argument("--verifier", default="math", help="reward verifier (default: math)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--config", help="YAML config file (rollout, rewards, eval sections apply)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.max_model_len=2048")
    return ap


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    tree = cfg.model_dump()
    flags = {
        "eval": {
            "samples_per_prompt": args.samples_per_prompt,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "max_tokens": args.max_tokens,
            "max_prompts": args.max_prompts,
            "problem_field": args.problem_field,
            "answer_field": args.answer_field,
            "source_field": args.source_field,
        },
        "rollout": {"num_engines": args.num_engines},
        "data": {"prompt_template": args.prompt_template},
        "model": {"path": args.model},
    }
    for section, values in flags.items():
        tree[section].update({k: v for k, v in values.items() if v is not None})
    return validate_tree(tree)


def eval_main(argv: list[str]) -> int:
    """`duet eval`: validate everything, start engines and reward workers, evaluate, report."""
    args = _parser().parse_args(argv)
    try:
        cfg = _config(args)
        files = args.dataset or ([cfg.eval.path] if cfg.eval.path else [])
        prompts = [p for f in files for p in load_eval_file(f, cfg)] if files else eval_prompts(cfg)
        prompts = [Prompt(i, p.text, p.answer, p.source) for i, p in enumerate(prompts)]
        if cfg.model.path is not None:
            _check_model(cfg.model.path)
        if args.verifier == "custom" and not cfg.rewards.custom_function:
            raise ConfigError("--verifier custom needs rewards.custom_function=package.module:function")
    except (ConfigError, DatasetError) as e:
        print(f"duet eval: {e}", file=sys.stderr)
        return 2
    import ray

    from cluster.driver import init_ray, resolve_model
    from cluster.fleet import RolloutFleet
    from cluster.placement import make_plan
    from rewards.pool import RewardPool

    model_path = resolve_model(cfg)
    sampling = eval_sampling(cfg)
    n = cfg.eval.samples_per_prompt
    try:
        _check_lengths(model_path, prompts, cfg, sampling["max_tokens"])
    except ConfigError as e:
        print(f"duet eval: {e}", file=sys.stderr)
        return 2
    owns_ray = not ray.is_initialized()
    init_ray(cfg)
    fleet = pool = None
    try:
        fleet = RolloutFleet(cfg, make_plan(cfg), model_path)
        pool = RewardPool(cfg.rewards)
        fleet.start(cfg.rollout.num_engines)
        print(
            f"duet eval: {len(prompts)} problems × {n} samples on {cfg.rollout.num_engines} engine(s), "
            f"model {model_path}",
            file=sys.stderr,
        )
        summary = evaluate(fleet, pool, prompts, n, sampling, args.verifier)
    finally:
        for part in (fleet, pool):
            if part is not None:
                try:
                    part.shutdown()
                except Exception:
                    pass
        if owns_ray:
            ray.shutdown()
    print(format_table(summary))
    print(f"({summary['elapsed_s']:.1f} s)")
    if args.out:
        result = {
            "model": model_path,
            "datasets": files or ["synthetic"],
            "samples_per_prompt": n,
            "sampling": sampling,
            "verifier": args.verifier,
            **summary,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0
