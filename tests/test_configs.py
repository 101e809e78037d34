"""Every YAML in configs/ loads and keeps the paper's protocol (arXiv 2510.00977)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cluster.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
MATH_TRAIN_PROBLEMS = 7500
EPOCHS = 10
PROTOCOL = {  # variant -> (group size, prompts per step, learning rate)
    "2grpo": (2, 256, 8e-6),
    "16grpo": (16, 32, 1e-6),
}
EXPECTED_FILES = {
    f"{variant}_{model}.yaml"
    for variant in PROTOCOL
    for model in ("qwen2.5-math-1.5b", "qwen2.5-math-7b", "r1-distill-qwen-1.5b")
}


def test_the_paper_configs_exist() -> None:
    missing = EXPECTED_FILES - {p.name for p in CONFIGS}
    assert not missing, f"missing configs: {sorted(missing)}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_keeps_the_protocol(path: Path) -> None:
    cfg = load_config(path)
    variant = path.name.split("_", 1)[0]
    assert variant in PROTOCOL, f"{path.name}: name must start with one of {sorted(PROTOCOL)}"
    group_size, prompts, lr = PROTOCOL[variant]

    assert cfg.rollout.group_size == group_size
    assert cfg.rollout.prompts_per_step == prompts
    assert cfg.rollout.group_size * cfg.rollout.prompts_per_step == 512
    assert cfg.learner.lr == pytest.approx(lr, rel=1e-12)
    assert cfg.train.steps == math.ceil(EPOCHS * MATH_TRAIN_PROBLEMS / prompts)

    assert cfg.algorithm.advantage == "grpo"
    assert cfg.algorithm.clip_low == pytest.approx(0.2)
    assert cfg.algorithm.clip_high == pytest.approx(0.28)
    assert cfg.rollout.temperature == 1.0

    distill = "r1-distill" in path.name
    assert cfg.rollout.max_tokens == (8192 if distill else 4096)
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.path is not None
    assert ("DeepSeek-R1-Distill" in cfg.model.path) == distill
    assert cfg.learner.zero_stage == (3 if "7b" in path.name else 2)

    assert cfg.data.path is not None
    rendered = cfg.data.prompt_template.format(problem="What is 1+1?")
    assert rendered == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )
