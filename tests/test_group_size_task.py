"""The group-size benchmark's task and settings (pure: no Ray, no engines): the problem universe, its
disjoint splits, the project's verifier on the answers, and the committed settings against issue 14."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.arithmetic_task import SPLITS, problem_universe, split_problems, write_splits
from benchmarks.group_size import (
    CONFIG,
    chosen_lrs,
    eval_steps,
    interp,
    load_settings,
    mean_ci,
    steps_of,
    tie_prediction,
)
from rewards.verifiers import verify_math

SIZES = {"held_out": 512, "validation": 512, "train": 2048, "warm_start": 4096}


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return split_problems(99, SIZES, seed=2026)


def test_universe_holds_every_problem_once_with_its_answer() -> None:
    rows = problem_universe(99)
    assert len(rows) == 100 * 100 + 100 * 101 // 2  # additions + subtractions with a >= b
    assert len({r["problem"] for r in rows}) == len(rows)
    for r in rows:
        a, op, b = (
            r["problem"][:-1].partition("+") if "+" in r["problem"] else r["problem"][:-1].partition("-")
        )
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert r["answer"] == str(expected) and int(r["answer"]) >= 0, r


def test_splits_have_their_sizes_and_are_disjoint(splits: dict[str, list[dict]]) -> None:
    assert {name: len(rows) for name, rows in splits.items()} == SIZES
    problems = {name: {r["problem"] for r in rows} for name, rows in splits.items()}
    keys = {name: {r["key"] for r in rows} for name, rows in splits.items()}
    for a in SPLITS:
        assert len(problems[a]) == SIZES[a], f"{a} repeats a problem"
        for b in SPLITS:
            if a < b:
                assert not problems[a] & problems[b], f"{a} and {b} share problems"
                assert not keys[a] & keys[b], f"{a} and {b} share a commuted pair"


def test_no_commuted_twin_crosses_splits(splits: dict[str, list[dict]]) -> None:
    where = {r["problem"]: name for name, rows in splits.items() for r in rows}
    for problem, name in where.items():
        if "+" in problem:
            a, b = problem[:-1].split("+")
            twin = f"{b}+{a}="
            assert where.get(twin, name) == name, f"{problem} in {name}, {twin} in {where[twin]}"


def test_splits_are_seeded(splits: dict[str, list[dict]]) -> None:
    again = split_problems(99, SIZES, seed=2026)
    assert again == splits
    other = split_problems(99, SIZES, seed=7)
    assert [r["problem"] for r in other["held_out"]] != [r["problem"] for r in splits["held_out"]]


def test_both_operations_reach_every_split(splits: dict[str, list[dict]]) -> None:
    for name, rows in splits.items():
        sources = {r["source"] for r in rows}
        assert sources == {"add", "sub"}, name


def test_too_large_or_bad_sizes_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="makes only"):
        split_problems(9, {"train": 2048}, seed=0)
    with pytest.raises(ValueError, match=r"task\.train"):
        split_problems(99, {"train": 0}, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        split_problems(99, {"test": 10}, seed=0)


def test_the_projects_verifier_accepts_the_answers_and_refuses_wrong_ones(
    splits: dict[str, list[dict]],
) -> None:
    rng = random.Random(0)
    for r in rng.sample(splits["held_out"], 25) + rng.sample(splits["train"], 25):
        assert verify_math(f"\\boxed{{{r['answer']}}}", r["answer"]).reason == "correct", r
        assert verify_math(f"\\boxed{{{int(r['answer']) + 1}}}", r["answer"]).reason == "wrong", r


def test_split_files_are_what_the_data_loader_reads(tmp_path, splits: dict[str, list[dict]]) -> None:
    from cluster.config import DataConfig
    from cluster.data import load_prompts

    paths = write_splits({"train": splits["train"]}, tmp_path)
    lines = paths["train"].read_text().splitlines()
    assert len(lines) == SIZES["train"] and set(json.loads(lines[0])) == {"problem", "answer", "source"}
    prompts = load_prompts(DataConfig(path=str(paths["train"])), seed=0)
    assert [p.text for p in prompts] == [r["problem"] for r in splits["train"]]


def test_committed_settings_meet_the_issue() -> None:
    s = load_settings(CONFIG)
    assert s["task"]["train"] >= 2000 and s["task"]["held_out"] >= 500
    assert steps_of(s, 2) >= 150
    assert steps_of(s, 16) == 8 * steps_of(s, 2)  # same epochs, 1/8 the prompts per step
    assert all(len(s["pilot"]["lr"][g]) >= 3 for g in ("2", "16"))
    assert len(s["seeds"]) >= 5 and s["pilot"]["seed"] not in s["seeds"]
    assert s["pilot"]["epochs"] == 2


def test_settings_that_cannot_test_the_claim_are_refused(tmp_path) -> None:
    text = CONFIG.read_text().replace("train: 2048", "train: 1024")
    bad = tmp_path / "group_size.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=r"task.train: 1024 < 2000"):
        load_settings(bad)


def test_both_configurations_are_evaluated_at_the_same_steps() -> None:
    s = load_settings(CONFIG)
    short, long = eval_steps(s, steps_of(s, 2)), eval_steps(s, steps_of(s, 16))
    assert short == [x for x in long if x <= steps_of(s, 2)]
    assert short[-1] == steps_of(s, 2) and long[-1] == steps_of(s, 16)


def test_statistics_helpers() -> None:
    ci = mean_ci([0.5, 0.6, 0.7])
    assert ci["mean"] == pytest.approx(0.6) and ci["ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert mean_ci([1.0])["ci95"] is None
    # all problems always right or always wrong tie for every G; a problem right 2 of 4 ties 1/3 at G=2
    assert tie_prediction([3, 0, 0, 0, 5], 2) == 1.0
    assert tie_prediction([0, 0, 1, 0, 0], 2) == pytest.approx(2 / 6)
    assert tie_prediction([0, 0, 1, 0, 0], 16) is None  # n < G: no unbiased estimate
    curve = [{"wall_s": 0.0, "avg@n": 0.2}, {"wall_s": 10.0, "avg@n": 0.6}]
    assert interp(curve, "wall_s", 5.0) == pytest.approx(0.4) and interp(curve, "wall_s", 99) == 0.6
    runs = [
        {"group_size": 2, "lr": 1e-4, "final": {"avg@n": 0.5}},
        {"group_size": 2, "lr": 3e-4, "final": {"avg@n": 0.7}},
        {"group_size": 16, "lr": 1e-5, "final": {"avg@n": 0.6}},
    ]
    assert chosen_lrs(runs) == {2: 3e-4, 16: 1e-5}
