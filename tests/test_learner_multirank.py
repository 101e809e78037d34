"""Multi-rank learners with uneven shards: 2 ranks × ZeRO-2 and 2 ranks × ZeRO-3 equal a 1-rank run.

Token-balanced shards give ranks different micro-batch counts, and with fewer rows than ranks a rank gets
none. Every rank must still run the same forward/backward passes (ZeRO-2 reduces gradients in each
backward, ZeRO-3 gathers parameters in each forward and backward), or the collectives stop matching:
ZeRO-2 crashes, ZeRO-3 hangs. `learner.zero3_persistence_threshold=0` makes ZeRO-3 partition every
parameter of the tiny model (all of them are below DeepSpeed's default threshold of 1e5 elements).

Real Ray actors, real DeepSpeed engines (CPU, gloo), the tiny model, fp32.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _groups(tokenizer, problems: list[tuple[int, int]], answers_per_problem: list[list[int]]):
    from cluster.records import Completion, Prompt, ScoredGroup

    groups = []
    for i, ((a, b), answers) in enumerate(zip(problems, answers_per_problem)):
        prompt = Prompt(i, f"{a}+{b}=", str(a + b))
        prompt_ids = tokenizer(prompt.text)["input_ids"]
        completions, rewards = [], []
        for ans in answers:
            text = f"\\boxed{{{ans}}}"
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            completions.append(Completion(i, prompt_ids, ids, [0.0] * len(ids), text, "stop", 0, 0))
            rewards.append(1.0 if ans == a + b else 0.0)
        groups.append(ScoredGroup(prompt, completions, rewards, ["x"] * len(rewards)))
    return groups


def _run(ray, path: str, overrides: list[str], ranks: int, batches) -> list[tuple[dict, dict]]:
    """(stats, full weights) after each batch, on a fresh learner of `ranks` ranks."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.config import load_config
    from learner.group import LearnerGroup, build_rows

    cfg = load_config(overrides=[*overrides, f"learner.num_ranks={ranks}"])
    pg = placement_group([{"CPU": 1}] * ranks)
    ray.get(pg.ready(), timeout=60)
    learner = LearnerGroup(cfg, path, pg, "cpu", 1)
    out = []
    try:
        for groups, premise in batches:
            if ranks > 1:  # the case this batch is meant to be
                premise(learner._shard(build_rows(groups, cfg)[0]), cfg.learner.micro_batch_size)
            stats = learner.train_step(groups)
            out.append((stats, learner.full_state_dict()))  # under ZeRO-3: gathered by all ranks
    finally:
        learner.shutdown()
        remove_placement_group(pg)
    return out


def _counts_differ(shards, mb):
    counts = [-(-len(s) // mb) for s in shards]
    assert len(set(counts)) > 1 and min(counts) > 0, counts


def _one_rank_empty(shards, mb):
    assert sorted(len(s) for s in shards) == [0, 1], [len(s) for s in shards]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_uneven_shards_equal_one_rank(local_ray, tiny_model, zero_stage):
    ray = local_ray
    from transformers import AutoTokenizer

    path = str(tiny_model)
    tok = AutoTokenizer.from_pretrained(path)
    # (a) 3 prompts × G = 3, micro-batch 1: 9 rows on 2 ranks, 5 and 4 micro-batches.
    uneven = _groups(tok, [(3, 4), (12, 5), (1, 16)], [[7, 8, 17], [17, 7, 170], [17, 1, 16]])
    # (b) 1 row on 2 ranks: rank 1 gets none. A lone completion has advantage 0; the k1 KL term
    # (gradient ∇log π per token, even at π = π_ref) gives it a gradient all the same.
    lone = _groups(tok, [(2, 2)], [[4]])
    overrides = [
        f"learner.zero_stage={zero_stage}",
        "learner.zero3_persistence_threshold=0",
        "learner.micro_batch_size=1",
        # Adam's first steps are about lr·sign(g): fp32 rounding in gradient elements that cancel to
        # nearly 0 shows up as differences of a fraction of lr (seen: 4e-6 at lr 1e-3). At lr 1e-4
        # those stay under 1e-6 while every weight with a gradient moves by about 1e-4.
        "learner.lr=1e-4",
        "algorithm.kl_coef=0.1",
        "algorithm.kl_estimator=k1",
        "algorithm.aggregation=token_mean",
    ]
    batches = [(uneven, _counts_differ), (lone, _one_rank_empty)]
    two = _run(ray, path, overrides, 2, batches)
    one = _run(ray, path, overrides, 1, batches)

    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for (stats2, w2), (stats1, w1), case in zip(two, one, ["uneven counts", "empty rank"]):
        assert abs(stats2["train/loss"] - stats1["train/loss"]) <= 1e-6, (case, stats2, stats1)
        assert stats2["train/tokens"] == stats1["train/tokens"] > 0, case
        assert w2.keys() == w1.keys()
        for name in w1:
            diff = (w2[name] - w1[name]).abs().max().item()
            assert diff <= 1e-6, f"{case}: {name} differs by {diff}"
        assert any(not torch.equal(w1[n], start[n]) for n in w1), f"{case}: the step moved no weight"
        start = w1
    if zero_stage == 2:
        # One rank at ZeRO-0, the default for one rank (DeepSpeed's all-reduce over a group of one switched
        # off, learner/rank.py), takes the same steps as one rank at ZeRO-2.
        stage0 = [o if not o.startswith("learner.zero_stage=") else "learner.zero_stage=0" for o in overrides]
        for (stats0, w0), (stats1, w1) in zip(_run(ray, path, stage0, 1, batches), one):
            assert abs(stats0["train/loss"] - stats1["train/loss"]) <= 1e-6, (stats0, stats1)
            assert (
                abs(stats0["train/grad_norm"] - stats1["train/grad_norm"]) <= 1e-5 * stats1["train/grad_norm"]
            )
            for name in w1:
                diff = (w0[name] - w1[name]).abs().max().item()
                assert diff <= 1e-6, f"ZeRO-0: {name} differs from ZeRO-2 by {diff}"
