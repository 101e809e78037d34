"""Every named preset runs end to end on the real stack (a few steps each, one shared Ray)."""

from __future__ import annotations

import pytest

from cluster.config import PRESETS, load_config
from cluster.driver import Trainer
from cluster.metrics import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_2_grpo_preset_is_the_default_config():
    """Why 2-grpo has no run below: it is the default config, which tests/test_train_e2e.py runs."""
    assert load_config(preset="2-grpo") == load_config()


@pytest.mark.parametrize("preset", sorted(set(PRESETS) - {"2-grpo"}))
def test_preset_runs(preset, local_ray, tmp_path, model_cache, tiny_model):
    cfg = load_config(
        preset=preset,
        overrides=[
            "train.steps=2",
            "train.check_weights_every_steps=1",
            "rollout.prompts_per_step=8",
            f"model.cache_dir={model_cache}",
            "run.progress=false",
            "run.ray_metrics=false",
            "control.enabled=false",
            "checkpoint.final=false",
        ],
    )
    Trainer(cfg, tmp_path).run()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["rollouts"] >= 8 * cfg.rollout.group_size  # refill (dapo) may add rounds
        assert m["sync/checksum_match"] is True
        if preset == "dapo":
            assert m["groups/trained"] <= 8 and m["refill/rounds"] >= 1


class BatchSpy(Trainer):
    """The real Trainer, keeping what each step generated and what the learner was handed."""

    def learn(self, batch, scored, metrics, t_step):
        self.steps = [*getattr(self, "steps", []), (scored, batch)]
        return super().learn(batch, scored, metrics, t_step)


def test_pair_aware_sampling_with_refill(local_ray, tmp_path, model_cache, tiny_model):
    """2-GRPO with algorithm.extend_tied_to=8 and refill, synchronous (issue 23): tied pairs get more
    rollouts of their prompt on the same weights, the counts add up, the learner is handed only untied
    pairs drawn from the groups, and no prompt is trained twice."""
    cfg = load_config(
        preset="2-grpo",
        overrides=[
            "algorithm.extend_tied_to=8",
            "algorithm.refill=true",
            "algorithm.max_refill_rounds=2",
            "train.steps=2",
            "rollout.prompts_per_step=16",
            f"model.cache_dir={model_cache}",
            "run.progress=false",
            "run.ray_metrics=false",
            "control.enabled=false",
            "checkpoint.final=false",
        ],
    )
    trainer = BatchSpy(cfg, tmp_path)
    trainer.run()
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    for m, (scored, batch) in zip(metrics, trainer.steps):
        # the counts add up: every rollout generated is counted, extension rounds' included
        first_round = 2 * m["groups/total"]
        assert (
            m["rollouts"] == first_round + m["rollouts/extension"] == sum(len(g.completions) for g in scored)
        )
        assert m["rollouts/extension"] >= 2 * m["groups/extended"]
        assert m["groups/tied_at_cap"] <= m["groups/extended"]
        # every group whose first pair tied was extended; only those still tied at 8 carry no gradient
        assert m["groups/extended"] == round(m["groups/total"] * m["reward/tied_fraction"])
        assert m["groups/with_signal"] == m["groups/total"] - m["groups/tied_at_cap"]
        assert m["rollouts/per_signal_group"] == pytest.approx(m["rollouts"] / m["groups/with_signal"])
        # the learner's batch: untied pairs only, each drawn from a group generated this step
        assert batch and all(len(g.completions) == 2 and not g.tied for g in batch)
        by_prompt = {g.prompt.index: g for g in scored}
        for pair in batch:
            group = by_prompt[pair.prompt.index]
            assert all(c in group.completions for c in pair.completions)  # by value: it crossed Ray
            # synchronous: every rollout of a group, extension's included, on the step's weights
            assert {c.version_start for c in group.completions} == {m["policy_version"] - 1}
        assert m["groups/trained"] == len(batch) <= 16
    assert sum(m["groups/extended"] for m in metrics) > 0, "no group was extended: nothing tested"
    assert any(len(g.completions) == 8 for scored, _ in trainer.steps for g in scored), (
        "no group reached the cap"
    )
    trained = [i for m in metrics for i in m["data/trained_prompts"]]
    assert len(trained) == len(set(trained))  # every prompt of the epoch trained at most once
