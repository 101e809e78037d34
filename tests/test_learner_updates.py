"""Several optimizer steps per batch (learner.updates_per_batch): π_old is the policy that generated the
batch, so from the second mini-batch on the PPO ratio moves away from 1 (and the clip can bind).

Real Ray actors, a real 2-rank DeepSpeed learner (CPU, gloo), the tiny model.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def _groups(tokenizer):
    from cluster.records import Completion, Prompt, ScoredGroup

    groups = []
    for i, (a, b) in enumerate([(3, 4), (2, 5), (1, 6)]):
        prompt = Prompt(i, f"{a}+{b}=", str(a + b))
        prompt_ids = tokenizer(prompt.text)["input_ids"]
        answers = [a + b, a + b + 1, a + b, a + b + 2]
        completions, rewards = [], []
        for ans in answers:
            ids = tokenizer(f"\\boxed{{{ans}}}")["input_ids"] + [tokenizer.eos_token_id]
            completions.append(
                Completion(i, prompt_ids, ids, [0.0] * len(ids), f"\\boxed{{{ans}}}", "stop", 0, 0)
            )
            rewards.append(1.0 if ans == a + b else 0.0)
        reasons = ["correct" if r else "wrong" for r in rewards]
        groups.append(ScoredGroup(prompt, completions, rewards, reasons))
    return groups


def test_updates_per_batch_moves_the_ratio(local_ray, tiny_model):
    ray = local_ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.config import load_config
    from learner.group import LearnerGroup, build_rows

    path = str(tiny_model)
    groups = _groups(AutoTokenizer.from_pretrained(path))
    n_tokens = float(sum(len(c.token_ids) for g in groups for c in g.completions))
    cfg = load_config(
        overrides=[
            "learner.num_ranks=2",
            "learner.updates_per_batch=2",
            "learner.lr=5e-3",
            "learner.micro_batch_size=2",
        ]
    )
    pg = placement_group([{"CPU": 1}] * 2)
    ray.get(pg.ready())
    learner = LearnerGroup(cfg, path, pg, "cpu", 1)
    try:
        # π_old of a rank: the log-prob of each completion token under the weights, aligned as in HF.
        rows = build_rows(groups, cfg)[0]
        old = ray.get(learner.workers[1].old_logprobs.remote(rows, 0))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for row, got in zip(rows, old):
            ids = torch.tensor([row["prompt_ids"] + row["completion_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0].float() / cfg.rollout.temperature
            logp = torch.log_softmax(logits, -1)
            p = len(row["prompt_ids"])
            want = [logp[p - 1 + i, t].item() for i, t in enumerate(row["completion_ids"])]
            assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5), (got, want)

        # M = 2: π_old is taken once; the second update sees the policy the first one moved.
        stats = learner.train_step(groups)
        assert stats["train/updates"] == 2.0
        assert stats["train/tokens"] == n_tokens  # every token trained on once, over the two updates
        assert abs(stats["train/ratio/mean"] - 1.0) > 1e-4, stats
        assert stats["train/grad_norm"] > 0.0

        # M = 1 on the same data: π_old is the policy that starts the step, the ratio is exactly 1.
        cfg.learner.updates_per_batch = 1
        stats = learner.train_step(groups)
        assert "train/updates" not in stats and "time/old_logprobs_s" not in stats
        assert stats["train/ratio/mean"] == 1.0, stats
        assert stats["train/clip_frac/total"] == 0.0
        assert stats["train/tokens"] == n_tokens
    finally:
        learner.shutdown()
        remove_placement_group(pg)
