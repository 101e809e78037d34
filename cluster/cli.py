"""`duet`: the command line.

duet train [--config FILE] [--preset NAME] [--run-dir DIR] [--dry-run] [section.field=value ...]
duet serve-reward [--host 127.0.0.1] [--port N] [--token T]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cluster.config import PRESETS, Config, ConfigError, load_config
from cluster.data import DatasetError, load_prompts

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_runnable(cfg: Config) -> int:
    """Everything that can be checked before an actor starts: the model path and every dataset row.
    Returns the number of prompts."""
    path = cfg.model.path
    if path is not None and not Path(path).expanduser().is_dir() and not _HUB_ID.match(path):
        raise ConfigError(f"model.path: {path!r} is not a folder (nor a Hugging Face hub id)")
    if (
        path is not None
        and Path(path).expanduser().is_dir()
        and not (Path(path).expanduser() / "config.json").exists()
    ):
        raise ConfigError(f"model.path: {path!r} has no config.json: not a Hugging Face model folder")
    return len(load_prompts(cfg.data, cfg.run.seed))


def _train(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="duet train", description="Run GRPO post-training.")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="named algorithm preset")
    ap.add_argument("--run-dir", help="output folder (default: a new folder under runs/)")
    ap.add_argument(
        "--dry-run", action="store_true", help="resolve and check the config, print the placement plan"
    )
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=4")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, args.preset)
        n_prompts = check_runnable(cfg)
    except (ConfigError, DatasetError) as e:
        print(f"duet train: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from cluster.placement import make_plan

        print(
            f"config OK: {n_prompts} prompts, {cfg.train.steps} steps, G={cfg.rollout.group_size}, "
            f"{cfg.rollout.prompts_per_step} prompts/step ({cfg.rollout.prompts_per_step * cfg.rollout.group_size} "
            "rollouts/step)"
        )
        print(make_plan(cfg).describe())
        return 0
    from cluster.driver import train

    run_dir = train(cfg, args.run_dir)
    print(f"run written to {run_dir}")
    return 0


def _serve_reward(argv: list[str]) -> int:
    from rewards.server import serve_reward_main

    return serve_reward_main(argv)


COMMANDS = {"train": _train, "serve-reward": _serve_reward}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
