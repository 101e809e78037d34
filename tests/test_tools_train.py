"""Training on episodes, end to end on the real stack (the driver in this process, one shared Ray):

- synchronous, `env.name=calculator` on the embedded default (tool model, multiplication task): tool calls
  from the first step; the step reports its episodes and splits its generation time into model and tool
  time; the real learner trains on the model's tokens only (its token count equals the model's tokens
  generated; the observations' are masked) and its log-probs match the engine's there; in-run evaluation
  runs episodes; a resumed run repeats the same episodes (its redone step equals the original);
- asynchronous (k = 1), `env.name=python` with the dr-grpo preset: episodes spanning weight updates stay
  within the staleness bound.
"""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.driver import Trainer
from cluster.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COMMON = [
    "train.steps=3",
    "rollout.prompts_per_step=8",
    "train.check_weights_every_steps=1",
    "run.progress=false",
    "run.ray_metrics=false",
    "control.enabled=false",
    "rewards.num_workers=1",
    "env.num_workers=1",
]
EPISODE_KEYS = ("episodes/turns_mean", "tools/calls", "tools/errors", "tools/time_s", "tokens/observation")
SAME_ON_RESUME = ("data/prompts", "reward/mean", "tools/calls", "tools/errors", "tokens/generated",
                  "tokens/observation", "episodes/turns_mean", "rollouts")  # fmt: skip


def test_sync_episodes_train_evaluate_and_resume_exactly(local_ray, tmp_path, model_cache):
    cfg = load_config(
        overrides=[
            *COMMON,
            "env.name=calculator",
            f"model.cache_dir={model_cache}",
            "checkpoint.every_steps=2",
            "checkpoint.final=false",
            "algorithm.filter_tied=false",  # every group is trained: the learner's tokens are all the step's
            "eval.every_steps=3",
            "eval.synthetic_problems=8",
            "eval.samples_per_prompt=2",
        ]
    )
    run = tmp_path
    Trainer(cfg, run).run()
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(k in m for k in EPISODE_KEYS), sorted(m)
        assert m["tools/calls"] >= 8 * 2 and m["episodes/turns_mean"] > 1.5  # it calls from its first step
        assert m["tokens/observation"] > 0
        assert m["time/generate_model_s"] + m["time/generate_tool_s"] == pytest.approx(m["time/generate_s"])
        assert m["time/generate_tool_s"] > 0
        # the learner's loss covers the model's tokens only, and its log-probs there are the engine's
        assert m["train/tokens"] == m["tokens/generated"]
        assert m["train/logprob_gap"] < 1e-3
        assert m["sync/checksum_match"] is True
    assert 0.0 <= metrics[-1]["eval/avg@n"] <= 1.0 and metrics[-1]["eval/mean_length"] > 15

    original = metrics[-1]
    Trainer(cfg, run, resume=True).run()  # from step 2's checkpoint: step 3 again
    redone = read_metrics(run)
    assert [m["step"] for m in redone] == [1, 2, 3]
    for key in SAME_ON_RESUME:
        assert redone[-1][key] == original[key], key
    assert redone[-1]["train/loss"] == pytest.approx(original["train/loss"], abs=1e-6)


def test_async_episodes_python_tool_dr_grpo(local_ray, tmp_path, model_cache):
    cfg = load_config(
        preset="dr-grpo",
        overrides=[
            *COMMON,
            "env.name=python",
            f"model.cache_dir={model_cache}",
            "train.max_staleness_versions=1",
            "checkpoint.final=false",
        ],
    )
    Trainer(cfg, tmp_path).run()
    metrics = read_metrics(tmp_path)
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert all(int(age) <= 1 for age in m["staleness/histogram"])
        assert m["tools/calls"] > 0 and m["episodes/model_wait_s"] > 0 and m["episodes/tool_wait_s"] > 0
        assert "time/generate_tool_s" not in m  # asynchronous: generation is off the step's path


def test_sync_episodes_dapo_groups_of_sixteen_refill_and_mask_overlong(local_ray, tmp_path, model_cache):
    """The dapo preset on episodes: groups of 16 episodes per prompt (as 16-grpo), tied groups dropped and
    refilled with fresh prompts, episodes cut at their token budget masked out; the learner trains on them."""
    cfg = load_config(
        preset="dapo",
        overrides=[
            *COMMON,
            "train.steps=2",
            "rollout.prompts_per_step=2",
            "env.name=calculator",
            f"model.cache_dir={model_cache}",
            "checkpoint.final=false",
        ],
    )
    assert (cfg.rollout.group_size, cfg.algorithm.refill, cfg.algorithm.overlong) == (16, True, "mask")
    Trainer(cfg, tmp_path).run()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert not [k for k in EPISODE_KEYS if k not in m], m.keys()
        assert m["tools/calls"] > 0 and m["refill/rounds"] >= 0
        # Whole groups of 16 episodes: every prompt sampled this step (refills included) got 16 of them.
        assert m["rollouts"] == 16 * len(m["data/prompts"]), (m["rollouts"], m["data/prompts"])
    assert metrics[-1]["policy_version"] >= 1  # something trained
