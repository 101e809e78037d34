"""SmolLM2-135M-Instruct built offline from PyPI's GGUF wheel, then one real `duet train` step on it."""

from __future__ import annotations

import json
import subprocess

import pytest

from learner.smollm2 import first_number_is_answer
from tests.helpers import REPO, duet_cmd


def test_first_number_is_answer():
    assert first_number_is_answer("", " 25", "25") == 1.0
    assert first_number_is_answer("", "The sum is 25, not 26.", "25") == 1.0
    assert first_number_is_answer("", "12+13 = 25", "25") == 0.0  # the first number is 12
    assert first_number_is_answer("", "twenty-five", "25") == 0.0
    assert first_number_is_answer("", "-3", "-3") == 1.0


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_builds_and_trains_one_step(model_cache, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from learner.smollm2 import build_smollm2, sums_rows

    folder = build_smollm2(model_cache / "smollm2", cache_dir=model_cache)
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert not hasattr(config, "quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = sums_rows(8, tokenizer, seed=0)
    assert rows[0]["problem"].endswith("<|im_start|>assistant\n")  # the chat template was applied
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    proc = subprocess.run(
        duet_cmd(
            "train",
            "--run-dir",
            str(run),
            f"model.path={folder}",
            f"data.path={data}",
            "rewards.verifier=custom",
            "rewards.custom_function=learner.smollm2:first_number_is_answer",
            "rollout.prompts_per_step=4",
            "rollout.max_tokens=8",
            "learner.lr=1e-5",
            "algorithm.filter_tied=false",
            "train.steps=1",
            "checkpoint.final=false",
            "run.progress=false",
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [step] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert step["groups/trained"] == 4 and step["policy_version"] == 1
    assert step["sync/checksum_match"] is True
    assert step["train/logprob_gap"] < 1e-3  # engine and learner agree on the real model
    assert all(r.startswith(("correct", "wrong")) for r in _reasons(step))


def _reasons(step: dict) -> list[str]:
    return [k.removeprefix("reward/reason/") for k in step if k.startswith("reward/reason/")]
