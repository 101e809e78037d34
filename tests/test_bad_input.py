"""Bad input fails before any actor starts, with a message that names the field or the row."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from cluster.config import ConfigError, load_config
from tests.helpers import REPO, run_duet


def _fails(capsys, *argv: str) -> str:
    import ray

    assert main(["train", "--dry-run", *argv]) == 2
    assert not ray.is_initialized(), "no Ray (and so no actor) may start for a bad config"
    return capsys.readouterr().err


def test_unknown_field_is_named(capsys):
    err = _fails(capsys, "rollout.group_sise=4")
    assert "rollout.group_sise" in err and "unknown field" in err


def test_unknown_section_is_named(capsys):
    assert "rollouts" in _fails(capsys, "rollouts.group_size=4")


@pytest.mark.parametrize("g", ["0", "-2", "1"])
def test_group_size_below_two(capsys, g):
    err = _fails(capsys, f"rollout.group_size={g}")
    assert "rollout.group_size" in err and ">= 2" in err


def test_wrong_type_is_named(capsys):
    err = _fails(capsys, "learner.lr=fast")
    assert "learner.lr" in err


def test_missing_model_path(capsys, tmp_path):
    err = _fails(capsys, f"model.path={tmp_path / 'no-such-model'}")
    assert "model.path" in err and "no-such-model" in err


def test_row_without_answer_is_named(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [{"problem": "1+1=", "answer": "2"}, {"problem": "2+2=", "answer": "4"}, {"problem": "3+3="}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    err = _fails(capsys, f"data.path={data}")
    assert "line 3 of" in err and "answer" in err  # the third line, as an editor counts it


def test_a_bad_row_is_named_by_its_line_as_an_editor_counts_it(tmp_path):
    """JSONL: the line number an editor shows (from 1, blank lines counted), whatever the check that fails;
    Parquet has no lines: its row index, said to count from 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.data import DatasetError, load_prompts

    good = json.dumps({"problem": "1+1=", "answer": "2"})
    cases = {
        "answer": (good + "\n\n" + json.dumps({"problem": "3+3="}) + "\n", "line 3 of"),
        "JSON": (good + "\n{oops\n", "line 2 of"),
        "UTF-8": (None, "line 2 of"),
    }
    for what, (text, expected) in cases.items():
        data = tmp_path / f"{what}.jsonl"
        if text is None:
            data.write_bytes(good.encode() + b'\n{"problem": "caf\xe9", "answer": "3"}\n')
        else:
            data.write_text(text)
        with pytest.raises(DatasetError, match=f"{expected} .*{data.name}") as e:
            load_prompts(load_config(overrides=[f"data.path={data}"]).data, 0)
        assert what in str(e.value)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"problem": ["1+1=", "2+2="], "answer": ["2", None]}), parquet)
    with pytest.raises(DatasetError, match=r"row index 1 \(from 0\) of .*rows\.parquet has no 'answer'"):
        load_prompts(load_config(overrides=[f"data.path={parquet}"]).data, 0)


def test_malformed_json_row_is_named(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": oops}\n')
    assert "line 2 of" in _fails(capsys, f"data.path={data}")


def test_yaml_and_overrides_compose(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preset: 16-grpo\nrollout:\n  prompts_per_step: 8\nlearner:\n  lr: 2.0e-5\n")
    cfg = load_config(cfg_file, ["learner.lr=3e-5"])
    assert cfg.rollout.group_size == 16 and cfg.rollout.prompts_per_step == 8 and cfg.learner.lr == 3e-5


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="3-grpo")


@pytest.mark.integration  # a `duet` subprocess
def test_dry_run_prints_plan():
    proc = run_duet("train", "--dry-run", "rollout.num_engines=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "RolloutEngine 1" in out and "LearnerWorker rank 0" in out


def test_config_reference_is_current():
    from cluster.config import config_reference

    assert config_reference() in (REPO / "docs" / "CONFIG.md").read_text()


def test_greedy_sampling_with_several_samples_is_refused(capsys):
    err = _fails(capsys, "eval.temperature=0")
    assert "eval.temperature=0" in err and "eval.samples_per_prompt is 4" in err
    err = _fails(capsys, "rollout.temperature=0")
    assert "rollout.temperature=0" in err and "rollout.group_size is 2" in err


def test_lora_target_the_model_lacks_is_named(capsys, tmp_path):
    """Issue 26: checked against the model's own layers (its config, no weights read) before anything starts."""
    from learner.tiny_model import tiny_config

    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    err = _fails(
        capsys, f"model.path={tmp_path}", "learner.lora.rank=8", "learner.lora.target_modules=[qkv_proj]"
    )
    assert "learner.lora.target_modules" in err and "no linear layer named 'qkv_proj'" in err
    err = _fails(
        capsys, f"model.path={tmp_path}", "learner.lora.rank=512", "learner.lora.target_modules=[q_proj]"
    )
    assert "learner.lora.rank=512 is larger than the q_proj layers allow" in err


@pytest.mark.integration  # vLLM's model classes probe the platform with a subprocess (`file`) on import
def test_lora_on_a_model_vllm_serves_without_adapters_is_refused(capsys, tmp_path):
    """Issue 26: vLLM's Mamba takes no LoRA (its engine would refuse at start); refused before any actor."""
    from transformers import MambaConfig

    config = MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4)
    config.architectures = ["MambaForCausalLM"]
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    err = _fails(
        capsys, f"model.path={tmp_path}", "learner.lora.rank=8", "learner.lora.target_modules=[out_proj]"
    )
    assert "learner.lora.rank=8" in err and "MambaForCausalLM does not serve LoRA" in err, err
