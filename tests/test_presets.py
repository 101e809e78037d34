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
