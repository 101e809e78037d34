"""Evaluation: pass@k and avg@n against hand-computed numbers, dataset layouts, and `duet eval` for real."""

from __future__ import annotations

import json

import pytest

from cluster.config import ConfigError, load_config
from cluster.data import DatasetError
from cluster.evaluation import (
    eval_main,
    eval_metrics,
    eval_prompts,
    ks_for,
    load_eval_file,
    pass_at_k,
    prompts_from_rows,
    summarize,
)
from tests.helpers import run_duet


def test_pass_at_k_hand_computed():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3)/C(5,3)
    assert pass_at_k(4, 1, 4) == 1.0  # k = n: solved at least once
    assert pass_at_k(32, 0, 32) == 0.0  # c = 0
    assert all(pass_at_k(8, 8, k) == 1.0 for k in range(1, 9))  # c = n
    assert pass_at_k(32, 1, 1) == pytest.approx(1 / 32)  # pass@1 = c/n
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert ks_for(4) == [1, 2, 4] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]


def _rec(source, correct, lengths, truncated=0):
    return {"source": source, "n": 4, "correct": correct, "lengths": lengths, "truncated": truncated}


def test_summarize_hand_computed_with_sources():
    records = [
        _rec("a", 0, [4, 4, 4, 4], truncated=4),
        _rec("a", 1, [2, 2, 2, 2]),
        _rec("b", 2, [1, 1, 1, 1]),
        _rec("b", 4, [3, 3, 3, 3]),
    ]
    s = summarize(records)
    o = s["overall"]
    assert o["avg@n"] == pytest.approx((0 + 0.25 + 0.5 + 1) / 4)
    assert o["pass@1"] == pytest.approx(o["avg@n"])
    # pass@2 > avg: 0, 1/2, 5/6, 1
    assert o["pass@2"] == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert o["pass@4"] == pytest.approx(0.75)
    assert set(o) >= {"avg@n", "pass@1", "pass@2", "pass@4", "mean_length", "truncated_fraction"}
    assert "pass@8" not in o
    assert (o["problems"], o["samples"], o["completions"]) == (4, 4, 16)
    assert o["mean_length"] == pytest.approx(2.5)
    assert o["truncated_fraction"] == pytest.approx(4 / 16)
    a, b = s["by_source"]["a"], s["by_source"]["b"]
    assert (a["avg@n"], a["pass@2"], a["pass@4"]) == pytest.approx((0.125, 0.25, 0.5))
    assert (b["avg@n"], b["pass@2"], b["pass@4"]) == pytest.approx((0.75, 11 / 12, 1.0))
    assert a["truncated_fraction"] == 0.5 and b["truncated_fraction"] == 0.0
    assert a["problems"] == b["problems"] == 2
    flat = eval_metrics(s)
    assert flat["eval/avg@n"] == o["avg@n"] and flat["eval/b/pass@4"] == 1.0
    with pytest.raises(ValueError):
        summarize([])


def test_summarize_accepts_boolean_lists():
    s = summarize([{"source": "", "n": 2, "correct": [True, False], "lengths": [3, 5], "truncated": [0, 1]}])
    assert s["overall"]["avg@n"] == 0.5 and s["overall"]["truncated_fraction"] == 0.5


def test_reads_jsonl_and_parquet_with_alternative_fields(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "1+1=", "answer": 2.0}, {"question": "2+5=", "answer": 7}]
    jsonl = tmp_path / "amc23.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "aime.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "3+4=", "solution": "x", "answer": "7", "source": "s"}]), parquet
    )
    cfg = load_config(overrides=['data.prompt_template="Q: {problem}"'])
    p = load_eval_file(jsonl, cfg)
    assert [(x.text, x.answer, x.source) for x in p] == [("Q: 1+1=", "2", "amc23"), ("Q: 2+5=", "7", "amc23")]
    assert "using 'question'" in capsys.readouterr().err
    (q,) = load_eval_file(parquet, cfg)
    assert (q.text, q.answer, q.source) == ("Q: 3+4=", "7", "s")
    cfg2 = load_config(overrides=["eval.problem_field=question", "eval.max_prompts=1"])
    assert len(load_eval_file(jsonl, cfg2)) == 1


def test_bad_rows_are_named():
    with pytest.raises(DatasetError, match=r"row index 1 \(from 0\) of .* has no 'answer'"):
        prompts_from_rows([{"problem": "1+1=", "answer": "2"}, {"problem": "2+2="}])
    with pytest.raises(DatasetError, match="no row has the problem field"):
        prompts_from_rows([{"text": "1+1=", "answer": "2"}])


def test_eval_prompts_synthetic_and_file_required():
    cfg = load_config(overrides=["eval.synthetic_problems=50"])
    prompts = eval_prompts(cfg)
    assert len(prompts) == 50 and prompts[0].source == "synthetic-add"
    assert eval_prompts(cfg) == prompts  # its own seed: the same set every time
    with pytest.raises(ConfigError, match=r"eval\.path"):
        eval_prompts(load_config(overrides=["data.path=x.jsonl"]))


def test_duet_eval_rejects_bad_dataset_before_starting_actors(tmp_path, capsys, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1=", "answer": "2"}\n{"problem": "", "answer": "3"}\n')
    assert eval_main(["--dataset", str(bad)]) == 2
    assert "line 2 of" in capsys.readouterr().err
    assert eval_main(["--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "1+1=", "answer": "2"}\n')
    assert eval_main(["--dataset", str(good), "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert eval_main(["--dataset", str(good), "--model", str(tiny_model), "rollout.max_model_len=16"]) == 2
    assert "rollout.max_model_len=20" in capsys.readouterr().err


@pytest.mark.integration
def test_duet_eval_on_tiny_model(tmp_path, tiny_model):
    data = tmp_path / "arith.jsonl"
    problems = [("3+4=", "7", "a"), ("1+2=", "3", "a"), ("5+5=", "10", "a"), ("0+8=", "8", "a")]
    problems += [("9+9=", "18", "b"), ("2+6=", "8", "b"), ("7+1=", "8", "b"), ("4+4=", "8", "b")]
    data.write_text(
        "".join(json.dumps({"problem": p, "answer": a, "source": s}) + "\n" for p, a, s in problems)
    )
    out = tmp_path / "eval.json"
    proc = run_duet(
        "eval",
        "--model",
        str(tiny_model),
        "--dataset",
        str(data),
        "--out",
        str(out),
        "eval.samples_per_prompt=4",
        "rewards.num_workers=1",
        timeout_s=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    o = result["overall"]
    assert (o["problems"], o["samples"], o["completions"]) == (8, 4, 32)
    assert set(result["by_source"]) == {"a", "b"}
    assert all(m["problems"] == 4 for m in result["by_source"].values())
    for m in [o, *result["by_source"].values()]:
        assert 0 <= m["avg@n"] <= 1 and 0 <= m["truncated_fraction"] <= 1
        assert m["pass@1"] == pytest.approx(m["avg@n"])
        ps = [m["pass@1"], m["pass@2"], m["pass@4"]]
        assert all(0 <= p <= 1 for p in ps) and ps == sorted(ps)
        assert m["mean_length"] > 0
    assert o["avg@n"] > 0  # the warm-started tiny model solves some additions
    assert "pass@4" in proc.stdout and "overall" in proc.stdout
