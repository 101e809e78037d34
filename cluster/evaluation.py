"""Evaluation: avg@n and pass@k of a policy on problems with reference answers, per data source.

    duet eval [--model PATH] [--dataset FILE ...] [--out FILE.json] [--config FILE] [--preset NAME]
              [section.field=value ...]

It takes the same config as `duet train` (file, preset, dotted overrides; `--model` is model.path,
`--dataset` replaces eval.path and may be repeated): `eval.*` (samples_per_prompt, temperature, top_p,
top_k, max_tokens, max_prompts, problem_field, answer_field, source_field), `data.prompt_template`,
`rollout.*` (num_engines, max_model_len, ...) and `rewards.*` (the verifier is rewards.verifier).

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
  "level", "unique_id". `eval.source_field=subject` gives per-subject metrics.
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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster.config import (
    Config,
    ConfigError,
    DatasetFields,
    SamplingConfig,
    add_config_arguments,
    config_from_arguments,
    refuse_secret_overrides,
)
from cluster.data import DatasetError, read_rows, rows_to_prompts, synthetic_rows
from cluster.records import Completion, Prompt
from cluster.scoring import Scoring

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
        f"the first row has {sorted(rows[0])}"
    )


def _clean_answer(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)  # AMC23 ships 27.0 for 27
    return value


def prompts_from_rows(
    rows: list[dict],
    fields: DatasetFields | None = None,
    prompt_template: str = "{problem}",
    *,
    default_source: str = "",
    max_prompts: int | None = None,
    origin: str = "dataset",
) -> list[Prompt]:
    """Validate rows (resolving field aliases) and turn them into prompts; bad rows raise DatasetError."""
    fields = fields or DatasetFields()
    places = getattr(rows, "places", None)  # where each row is in its file (read_rows), for messages
    resolved = DatasetFields(
        problem_field=_pick_field(rows, fields.problem_field, PROBLEM_ALIASES, "problem", origin),
        answer_field=_pick_field(rows, fields.answer_field, ANSWER_ALIASES, "answer", origin),
        source_field=fields.source_field,
    )
    rows = [
        {
            **r,
            resolved.answer_field: _clean_answer(r.get(resolved.answer_field)),
            resolved.source_field: r.get(resolved.source_field) or default_source,
        }
        for r in rows
    ]
    try:
        prompts = rows_to_prompts(rows, resolved, prompt_template, origin=origin, places=places)
    except (KeyError, IndexError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"prompt template {prompt_template!r} cannot be applied: {e!r}") from None
    return prompts[:max_prompts] if max_prompts else prompts


def load_eval_file(path: str | Path, cfg: Config) -> list[Prompt]:
    """One evaluation file with cfg.eval's field names and cfg.data's prompt template."""
    if not Path(path).is_file():
        raise DatasetError(f"evaluation dataset {path}: no such file")
    return prompts_from_rows(
        read_rows(path),
        cfg.eval,
        cfg.data.prompt_template,
        default_source=Path(path).stem,
        max_prompts=cfg.eval.max_prompts,
        origin=str(path),
    )


def eval_prompts(cfg: Config, files: Sequence[str | Path] = ()) -> list[Prompt]:
    """The held-out set: `files`, else eval.path, else (synthetic task) a synthetic set of its own seed.
    Indexed by position across all files."""
    e = cfg.eval
    files = list(files) or ([e.path] if e.path is not None else [])
    if files:
        prompts = [p for f in files for p in load_eval_file(f, cfg)]
        return [Prompt(i, p.text, p.answer, p.source) for i, p in enumerate(prompts)]
    if cfg.data.path is not None:
        raise ConfigError("eval.path: required to evaluate when data.path is set (no held-out set)")
    rows = synthetic_rows(
        e.synthetic_problems, cfg.data.synthetic_max_operand, e.synthetic_seed, cfg.data.synthetic_task
    )
    return prompts_from_rows(
        rows, prompt_template=cfg.data.prompt_template, max_prompts=e.max_prompts, origin="synthetic"
    )


# ---------------------------------------------------------------- running it


def generate(
    fleet: Any,
    prompts: list[Prompt],
    n: int,
    sampling: SamplingConfig,
    on_stall: Callable[[], object] | None = None,
) -> list[list[Completion]]:
    """n completions per prompt from a RolloutFleet (its current weights), in the prompts' order.
    `on_stall`: see RolloutFleet.generate (the driver's replaces engines that hang)."""
    prompts = [Prompt(i, p.text, p.answer, p.source) for i, p in enumerate(prompts)]  # index = position
    groups: list[list[Completion]] = [[] for _ in prompts]
    for _, chunk, chunk_groups in fleet.generate(
        prompts, n, sampling=sampling, on_stall=on_stall, label="evaluation"
    ):
        for p, group in zip(chunk, chunk_groups, strict=True):
            groups[p.index] = group
    return groups


def evaluate(
    fleet: Any,
    reward_pool: Any,
    prompts: list[Prompt],
    n: int,
    sampling: SamplingConfig,
    verifier: str,
    on_stall: Callable[[], object] | None = None,
) -> dict:
    """Sample n completions per prompt, score them, and summarize (see `summarize`).

    `fleet`: a RolloutFleet (the driver calls this between steps, on the current weights);
    `reward_pool`: a RewardPool. A completion is correct when the verifier's reason is "correct".
    `on_stall`: see RolloutFleet.generate. Adds `elapsed_s` to the result.
    """
    t0 = time.perf_counter()
    groups = generate(fleet, prompts, n, sampling, on_stall)
    records = [
        {
            "source": g.prompt.source,
            "n": len(g.completions),
            "correct": sum(reason == "correct" for reason in g.reasons),
            "lengths": [len(c.token_ids) for c in g.completions],
            "truncated": sum(c.finish_reason == "length" for c in g.completions),
        }
        for g in Scoring(reward_pool, prompts, groups, verifier).result()
    ]
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


def _check_lengths(model_path: str, prompts: list[Prompt], cfg: Config) -> None:
    """Fail before starting engines when a prompt cannot fit in rollout.max_model_len."""
    file = Path(model_path).expanduser() / "tokenizer.json"
    if not file.is_file():  # a hub id or a slow tokenizer: the engine will say
        return
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(file))
    longest = max(len(enc.ids) for enc in tok.encode_batch([p.text for p in prompts]))
    need = longest + cfg.eval.max_tokens
    if need > cfg.rollout.max_model_len:
        raise ConfigError(
            f"rollout.max_model_len: {cfg.rollout.max_model_len} tokens cannot hold the longest prompt "
            f"({longest}) plus eval.max_tokens ({cfg.eval.max_tokens}); pass rollout.max_model_len={need}"
        )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="duet eval",
        description="avg@n and pass@k of a model on problems with reference answers (see cluster/evaluation.py). "
        "Settings come from the same config as `duet train`: eval.*, data.prompt_template, rollout.*, rewards.*.",
    )
    ap.add_argument(
        "--model",
        help="model.path: HF model folder (e.g. RUN_DIR/checkpoints/step_XXXXXX/hf), or a LoRA run's adapter "
        "folder (RUN_DIR/checkpoints/step_XXXXXX/adapter: its base model served with the adapter)",
    )
    ap.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="JSONL or Parquet file (repeatable); default: eval.path, else the synthetic held-out set",
    )
    ap.add_argument("--out", help="write the results as JSON here")
    add_config_arguments(ap)
    return ap


def eval_main(argv: list[str]) -> int:
    """`duet eval`: validate everything, start engines and reward workers, evaluate, report."""
    from cluster.runtime import check_model, init_ray, resolve_model
    from envs.base import check_environment
    from learner.lora import adapter_base, is_adapter_folder

    args = _parser().parse_args(argv)
    adapter = None  # (folder, rank) when --model is a LoRA adapter
    try:
        refuse_secret_overrides(args.overrides)  # before anything else reads them, as `duet train` does
        model_arg = args.model
        if model_arg and is_adapter_folder(model_arg):
            try:
                model_arg, rank = adapter_base(model_arg)
            except ValueError as e:
                raise ConfigError(f"--model: {e}") from None
            adapter = (str(Path(args.model).resolve()), rank)
        cfg = config_from_arguments(args, *([f"model.path={model_arg}"] if model_arg else []))
        prompts = eval_prompts(cfg, args.dataset)
        check_model(cfg)
        check_environment(cfg)
        if cfg.rewards.verifier == "custom" and not cfg.rewards.custom_function:
            raise ConfigError(
                "rewards.custom_function: required by rewards.verifier=custom (package.module:function)"
            )
        model_path = resolve_model(cfg)
        _check_lengths(model_path, prompts, cfg)
    except (ConfigError, DatasetError) as e:
        print(f"duet eval: {e}", file=sys.stderr)
        return 2
    import ray

    from cluster.fleet import RolloutFleet
    from cluster.naming import run_scope
    from cluster.preflight import PreflightError, check_plan
    from envs.pool import ToolPoolError, shutdown_tool_pool, start_tool_pool, wait_tool_pool
    from rewards.pool import RewardPool

    sampling, n = cfg.eval.sampling(), cfg.eval.samples_per_prompt
    owns_ray = not ray.is_initialized()
    init_ray(cfg)
    fleet = pool = tools = None
    try:
        # The plan from the cluster's resources, as `duet train` makes it: run.device=auto means the
        # cluster's GPUs (the driver's own torch may see none on a head node), and a plan the cluster
        # cannot hold fails now, naming what is missing.
        try:
            plan, warnings = check_plan(cfg, connected=True, with_learner=False)
        except PreflightError as e:
            print(f"duet eval: {e}", file=sys.stderr)
            return 2
        for w in warnings:
            print(f"duet eval: {w}", file=sys.stderr)
        scope = run_scope("eval")  # the actors' Ray names (cluster/naming.py)
        fleet = RolloutFleet(cfg, plan, model_path, name_scope=scope)
        fleet.adapter = adapter
        tools = start_tool_pool(cfg, scope)  # env.name != none: episodes, as in training
        pool = RewardPool(cfg.rewards, name_scope=scope)
        fleet.start(cfg.rollout.num_engines)
        if tools is not None:
            wait_tool_pool(tools)
            fleet.tools = tools
        print(
            f"duet eval: {len(prompts)} problems × {n} samples on {cfg.rollout.num_engines} engine(s), "
            f"model {model_path}" + (f" with adapter {adapter[0]}" if adapter else ""),
            file=sys.stderr,
        )
        summary = evaluate(fleet, pool, prompts, n, sampling, cfg.rewards.verifier)
    except ToolPoolError as e:  # e.g. the python tool on a host that cannot isolate it
        print(f"duet eval: {e}", file=sys.stderr)
        return 1
    finally:
        for part in (fleet, pool):
            if part is not None:
                try:
                    part.shutdown()
                except Exception:
                    pass
        if tools is not None:
            shutdown_tool_pool(tools)
        if owns_ray:
            ray.shutdown()
    print(format_table(summary))
    print(f"({summary['elapsed_s']:.1f} s)")
    if args.out:
        result = {
            "model": model_path,
            "adapter": adapter[0] if adapter else None,
            "datasets": args.dataset or ([cfg.eval.path] if cfg.eval.path else ["synthetic"]),
            "samples_per_prompt": n,
            "sampling": sampling.model_dump(),
            "verifier": cfg.rewards.verifier,
            "env": cfg.env.name,
            **summary,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0
