"""`duet`: the command line.

duet train [--config FILE] [--preset NAME] [--run-dir DIR] [--resume RUN_DIR] [--dry-run] [section.field=value ...]
duet eval [--model PATH] [--dataset FILE ...] [--out FILE] [--config FILE] [section.field=value ...]
duet submit --address http://HEAD:8265 [--config FILE] [overrides]
duet logs JOB_ID [-f]    duet status --job JOB_ID    duet stop JOB_ID
duet status [--run-dir DIR | --url URL]    duet scale --engines N [--run-dir DIR | --url URL]
duet serve-reward [--host 127.0.0.1] [--port N] [--token T]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cluster.config import (
    Config,
    ConfigError,
    add_config_arguments,
    config_from_arguments,
    refuse_secret_overrides,
)
from cluster.data import DatasetError, load_prompts
from cluster.runtime import check_model, check_run_dir, resolve_lora_targets, run_dir_path


def check_runnable(cfg: Config) -> int:
    """Everything that can be checked before an actor starts: the model path, the environment, a control token file, every dataset row and,
    when the run evaluates (eval.every_steps), the held-out set. Returns the number of prompts."""
    from envs.base import check_environment

    check_model(cfg)
    check_environment(cfg)
    if cfg.model.path is not None and (Path(cfg.model.path).expanduser() / "config.json").is_file():
        resolve_lora_targets(
            cfg, str(Path(cfg.model.path).expanduser())
        )  # else the driver does, as it starts
    cfg.control.read_token()
    n = len(load_prompts(cfg.data, cfg.run.seed))
    if cfg.eval.every_steps:
        check_eval(cfg)
    return n


def check_eval(cfg: Config) -> None:
    """The in-run evaluation's settings, checked before the run starts instead of at its first evaluation."""
    from cluster.evaluation import eval_prompts

    e = cfg.eval
    if e.every_steps > cfg.train.steps:
        raise ConfigError(
            f"eval.every_steps: {e.every_steps} is more than train.steps ({cfg.train.steps}): the run would "
            "never evaluate; lower it, or set eval.every_steps=0 for no evaluation"
        )
    if e.max_tokens is not None and e.max_tokens >= cfg.rollout.max_model_len:
        raise ConfigError(
            f"eval.max_tokens: {e.max_tokens} leaves no room for the prompt in rollout.max_model_len "
            f"({cfg.rollout.max_model_len}); lower it or raise rollout.max_model_len"
        )
    try:
        eval_prompts(cfg)
    except DatasetError as ex:
        raise DatasetError(f"eval.path: {ex}") from None


def _train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="duet train", description="Run GRPO post-training.")
    ap.add_argument("--run-dir", help="output folder (default: a new folder under runs/)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last complete checkpoint")
    ap.add_argument(
        "--dry-run", action="store_true", help="resolve and check the config, print the placement plan"
    )
    add_config_arguments(ap)
    args = ap.parse_args(argv)
    if args.resume:
        if args.config or args.preset:
            print(
                "duet train: --resume takes the run's own config (RUN_DIR/config.yaml); add overrides only",
                file=sys.stderr,
            )
            return 2
        args.config = str(Path(args.resume) / "config.yaml")
        args.run_dir = args.resume
    try:
        refuse_secret_overrides(args.overrides)
        cfg = config_from_arguments(args)
        n_prompts = check_runnable(cfg)
        if not args.dry_run:
            check_run_dir(run_dir_path(cfg, args.run_dir), resume=bool(args.resume))
    except (ConfigError, DatasetError) as e:
        print(f"duet train: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from cluster.preflight import PreflightError, dry_run_plan

        try:
            plan, warnings = dry_run_plan(cfg)
        except PreflightError as e:
            print(f"duet train: {e}", file=sys.stderr)
            return 1
        print(
            f"config OK: {n_prompts} prompts, {cfg.train.steps} steps, G={cfg.rollout.group_size}, "
            f"{cfg.rollout.prompts_per_step} prompts/step ({cfg.rollout.prompts_per_step * cfg.rollout.group_size} "
            "rollouts/step)"
        )
        print(plan.describe())
        for w in warnings:
            print(f"warning: {w}")
        return 0
    from cluster.driver import train
    from cluster.preflight import PreflightError
    from cluster.runtime import RunStopped

    try:
        run_dir = train(cfg, args.run_dir, resume=bool(args.resume))
    except ConfigError as e:  # found once the run's folder is known (e.g. --resume without a checkpoint)
        print(f"duet train: {e}", file=sys.stderr)
        return 2
    except (RunStopped, PreflightError) as e:
        print(f"duet train: {e}{_job_resume_hint(str(e), args.run_dir)}", file=sys.stderr)
        return 1
    print(f"run written to {run_dir}")
    return 0


def _job_resume_hint(message: str, run_dir: str | None) -> str:
    """A run stopped inside a Ray job (`duet submit`) is resumed by submitting again, from where it was
    submitted: say so next to the `duet train --resume` the message names."""
    if "--resume" not in message or "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return ""
    where = run_dir or "RUN_DIR"
    return f" (this run is a Ray job: resume it with duet submit --address http://HEAD:8265 --resume {where})"


# Subcommands live next to what they drive; imported only when called (a fast `duet --help`).
COMMANDS = {
    "train": "cluster.cli:_train",
    "eval": "cluster.evaluation:eval_main",
    "submit": "cluster.jobs:submit_main",
    "logs": "cluster.jobs:logs_main",
    "stop": "cluster.jobs:stop_main",
    "status": "cluster.control:status_main",
    "scale": "cluster.control:scale_main",
    "serve-reward": "rewards.server:serve_reward_main",
}


def _resolve(target: str):
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return _resolve(COMMANDS[argv[0]])(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
