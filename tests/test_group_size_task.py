"""The group-size benchmark's task, settings and report (pure: no Ray, no engines): the problem universe,
its disjoint splits, the project's verifier on the answers, the committed settings against issues 14 and
23, the per-arm keys that let finished runs be reused, the pilot's bracket, and the report's keys."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks.arithmetic_task import SPLITS, problem_universe, split_problems, write_splits
from benchmarks.common import RESULTS
from benchmarks.group_size import (
    CONFIG,
    PLAIN,
    REFERENCE,
    arm_overrides,
    arm_slug,
    best_pair,
    bracket_next,
    chosen_lrs,
    eval_steps,
    interp,
    load_settings,
    mean_ci,
    moving_mean,
    pilot_grid,
    report,
    run_name,
    settings_key,
    stale_runs,
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
    assert all(len(arm["lr"]) >= 3 for arm in s["arms"].values())
    assert len(s["seeds"]) >= 5 and s["pilot"]["seed"] not in s["seeds"]
    assert s["pilot"]["epochs"] == 2
    # issue 23's five arms; 2-GRPO's grid reaches below issue 14's lowest rate (its choice, 1e-4)
    assert [arm_overrides(a) for a in s["arms"].values()] == [
        [],
        [],
        ["algorithm.refill=true", "algorithm.max_refill_rounds=4"],
        ["algorithm.extend_tied_to=4"],
        ["algorithm.extend_tied_to=8"],
    ]
    assert min(s["arms"][PLAIN]["lr"]) < 1e-4
    # issue 14's run files keep their names
    assert [arm_slug(a) for a in s["arms"].values()] == ["g16", "g2", "g2-refill", "g2-ext4", "g2-ext8"]
    assert run_name("seed", "g2", 1e-4, 0) == "seed-g2-lr0.0001-seed0"


def test_committed_runs_are_reused_under_the_current_settings() -> None:
    """Every committed run (issue 14's, 16-GRPO's ~100 minutes among them, issue 23's, and the same-day
    runs of 2026-12-06 in their own folder) carries its arm's current key: adding arms and rates did not
    invalidate them, and an edit of a shared section would (this test says so)."""
    s = load_settings(CONFIG)
    folders = [RESULTS / "group_size_runs", RESULTS / "group_size_runs" / "same-session-2026-12-06"]
    runs = [json.loads(p.read_text()) for d in folders for p in d.glob("*-seed*.json")]
    assert {r["arm"] for r in runs} == set(s["arms"]) and len(runs) >= 16
    assert stale_runs(s, runs) == []
    gate = json.loads((RESULTS / "group_size_runs" / "gate.json").read_text())
    assert gate["settings_key"] == settings_key(s)


def test_settings_keys_are_per_arm(tmp_path) -> None:
    s = load_settings(CONFIG)
    keys = {name: settings_key(s, arm) for name, arm in s["arms"].items()}
    assert len(set(keys.values())) == 5 and settings_key(s) not in keys.values()
    # a rate added to one arm's grid, or an arm changed, leaves the other arms' keys alone
    grid = dict(s, arms=dict(s["arms"], **{PLAIN: dict(s["arms"][PLAIN], lr=[1e-5, 1e-4, 1e-3])}))
    assert {n: settings_key(grid, a) for n, a in grid["arms"].items()} == keys
    ext = dict(
        s, arms=dict(s["arms"], **{"2-GRPO+extend8": dict(s["arms"]["2-GRPO+extend8"], extend_tied_to=16)})
    )
    changed = {n for n, a in ext["arms"].items() if settings_key(ext, a) != keys[n]}
    assert changed == {"2-GRPO+extend8"}
    # a shared section changes every key
    shared = dict(s, protocol=dict(s["protocol"], max_tokens=32))
    assert all(settings_key(shared, a) != keys[n] for n, a in s["arms"].items())
    run = {"phase": "seed", "arm": REFERENCE, "lr": 1e-5, "seed": 0, "settings_key": keys[REFERENCE]}
    assert stale_runs(s, [run]) == [] and len(stale_runs(shared, [run])) == 1
    assert len(stale_runs(s, [dict(run, arm="3-GRPO")])) == 1


def test_an_arm_that_cannot_run_is_refused_by_name(tmp_path) -> None:
    bad = tmp_path / "group_size.yaml"
    bad.write_text(CONFIG.read_text().replace("extend_tied_to: 8", "extend_tied_to: 6"))
    with pytest.raises(ValueError, match=r"arms.2-GRPO\+extend8: .*algorithm.extend_tied_to=6"):
        load_settings(bad)


def test_the_pilot_brackets_every_arms_choice() -> None:
    assert bracket_next({1e-4: 0.57, 3e-4: 0.49, 1e-3: 0.0}, 3.0) == pytest.approx(3.33e-5)
    assert bracket_next({1e-4: 0.1, 3e-4: 0.2, 1e-3: 0.3}, 3.0) == 3e-3
    assert bracket_next({1e-4: 0.5, 3e-4: 0.6, 1e-3: 0.3}, 3.0) is None
    assert bracket_next({1e-4: 0.5, 3e-4: 0.5, 1e-3: 0.3}, 3.0) == pytest.approx(3.33e-5)  # tie: lower
    s = load_settings(CONFIG)
    arm = {"group_size": 2, "lr": [3e-5, 1e-4, 3e-4]}
    # not all run yet: incomplete
    assert pilot_grid(s, arm, {3e-5: 0.5}) == ([3e-5, 1e-4, 3e-4], False)
    # best inside: complete as declared
    assert pilot_grid(s, arm, {3e-5: 0.5, 1e-4: 0.6, 3e-4: 0.4}) == ([3e-5, 1e-4, 3e-4], True)
    # best at the low edge: 1e-5 runs next, then (still best) 3.33e-6, then the extensions are used up
    scores = {3e-5: 0.6, 1e-4: 0.5, 3e-4: 0.4}
    assert pilot_grid(s, arm, scores) == ([3e-5, 1e-4, 3e-4, 1e-5], False)
    assert pilot_grid(s, arm, scores | {1e-5: 0.55}) == ([3e-5, 1e-4, 3e-4, 1e-5], True)
    assert pilot_grid(s, arm, scores | {1e-5: 0.65}) == ([3e-5, 1e-4, 3e-4, 1e-5, 3.33e-6], False)
    assert pilot_grid(s, arm, scores | {1e-5: 0.65, 3.33e-6: 0.7})[1] is True  # 2 extensions: done


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
        {"arm": "a", "lr": 1e-4, "final": {"avg@n": 0.5}},
        {"arm": "a", "lr": 3e-4, "final": {"avg@n": 0.7}},
        {"arm": "b", "lr": 3e-5, "final": {"avg@n": 0.6}},
        {"arm": "b", "lr": 1e-5, "final": {"avg@n": 0.6}},  # a tie: the lower rate
    ]
    assert chosen_lrs(runs) == {"a": 3e-4, "b": 1e-5}
    assert moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_best_pair_arm_meets_the_goal_else_has_the_smallest_gap() -> None:
    goal = {"accuracy_gap_max_points": 2.0, "time_ratio_max": 0.3}
    arms = {
        "16": {"group_size": 16},
        "a": {"group_size": 2, "gap": 1.5, "time_ratio": 0.4},  # closest, too slow
        "b": {"group_size": 2, "gap": 1.9, "time_ratio": 0.25},  # meets both
        "c": {"group_size": 2, "gap": 5.0, "time_ratio": 0.1},
    }
    assert best_pair(arms, goal) == "b"
    assert best_pair({k: v for k, v in arms.items() if k != "b"}, goal) == "a"
    assert best_pair({"16": arms["16"]}, goal) is None


def _run(arm: str, g: int, phase: str, lr: float, seed: int, acc: float, wall: float, key: str) -> dict:
    """A run file as one_run writes it, with made-up numbers."""
    steps = 160 if g == 2 else 1280
    tied = [0.6 if g == 2 else 0.1] * steps
    curve = [
        {"step": 0, "rollouts": 0, "wall_s": 0.0, "n": 2, "avg@n": 0.4},
        {"step": steps, "rollouts": 128 * steps, "wall_s": wall, "n": 16, "avg@n": acc, "pass@16": acc + 0.1},
    ]
    return {
        "phase": phase,
        "arm": arm,
        "group_size": g,
        "seed": seed,
        "lr": lr,
        "settings_key": key,
        "prompts_per_step": 64 if g == 2 else 8,
        "steps": steps,
        "final": {k: v for k, v in curve[-1].items()},
        "final_histogram": [1] * 17,
        "base": curve[0],
        "train_wall_s": wall,
        "time_split_s": {"generate": 1.0, "reward_wait": 0.1, "train": 2.0, "broadcast": 0.5, "other": 0.1},
        "rollouts": 128 * steps,
        "startup_s": 40.0,
        "eval_s": 10.0,
        "load_avg": {"per_step_mean": 3.0},
        "curve": curve,
        "tied_fraction": tied,
        "extension": {"groups_extended": 10, "groups_tied_at_cap": 2, "rollouts_extension": 40},
        "signal_groups": [16] * steps,
    }


def test_the_report_has_every_arm_and_the_best_pair(tmp_path) -> None:
    from datetime import datetime, timezone

    s = load_settings(CONFIG)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    accuracy = {
        REFERENCE: 0.65,
        PLAIN: 0.58,
        "2-GRPO+refill": 0.60,
        "2-GRPO+extend4": 0.62,
        "2-GRPO+extend8": 0.64,
    }
    wall = {
        REFERENCE: 800.0,
        PLAIN: 110.0,
        "2-GRPO+refill": 150.0,
        "2-GRPO+extend4": 160.0,
        "2-GRPO+extend8": 200.0,
    }
    for name, arm in s["arms"].items():
        key, g = settings_key(s, arm), arm["group_size"]
        for lr in arm["lr"]:  # the middle rate is best: bracketed
            best = lr == sorted(arm["lr"])[len(arm["lr"]) // 2]
            r = _run(name, g, "pilot", lr, 100, 0.5 + 0.1 * best, 50.0, key)
            (runs_dir / f"{run_name('pilot', arm_slug(arm), lr, 100)}.json").write_text(json.dumps(r))
        lr = sorted(arm["lr"])[len(arm["lr"]) // 2]
        for seed in s["seeds"]:
            r = _run(name, g, "seed", lr, seed, accuracy[name] + 0.002 * seed, wall[name] + seed, key)
            (runs_dir / f"{run_name('seed', arm_slug(arm), lr, seed)}.json").write_text(json.dumps(r))
    (runs_dir / "gate.json").write_text(
        json.dumps({"settings_key": settings_key(s), "base_avg@n": 0.39, "in_range": True})
    )
    ctx = {"settings": s, "runs_dir": runs_dir, "arms": list(s["arms"])}
    res = report(ctx, tmp_path / "out", datetime.now(timezone.utc), [0.0, 0.0, 0.0], ["report"])
    assert set(res["arms"]) == set(s["arms"])
    for name, arm in res["arms"].items():
        assert (
            arm["lr_grid"] == sorted(s["arms"][name]["lr"])
            and arm["bracketed"]
            and arm["seeds"] == s["seeds"]
        )
        assert arm["lr"] == sorted(s["arms"][name]["lr"])[len(s["arms"][name]["lr"]) // 2]
        if name != REFERENCE:
            assert arm["gap"] == pytest.approx(100 * (0.65 - accuracy[name]))
            assert arm["gap_ci95"] == pytest.approx(0.0, abs=1e-9)  # the same gap on every seed
            assert arm["time_ratio"] == pytest.approx(
                statistics_mean([(wall[name] + k) / (800.0 + k) for k in range(5)])
            )
            assert arm["rollout_ratio"] == pytest.approx(160 / 1280)
            assert arm["rollouts_per_signal_group"]["mean"] == pytest.approx(128 / 16)
    # extend8: 1 point behind at 0.25 of the wall-clock meets the goal; extend4 (3 behind) does not
    assert res["best_pair_arm"] == "2-GRPO+extend8"
    assert res["best_pair_gap"] == pytest.approx(1.0) and res["best_pair_time_ratio"] < 0.3
    assert res["goal"]["met"] is True
    # issue 14's keys, for plain 2-GRPO
    assert res["accuracy_gap"] == pytest.approx(7.0) and res["chosen_lr"] == {"2": 3e-4, "16": 3.75e-5}
    assert set(res["groups"]) == {"2", "16"} and (tmp_path / "out" / "group_size.png").stat().st_size > 10_000
    # a run made under another arm's settings is refused
    (runs_dir / "seed-g2-lr0.0001-seed9.json").write_text(json.dumps(dict(r, arm=PLAIN, seed=9)))
    with pytest.raises(SystemExit, match="other settings"):
        report(ctx, tmp_path / "out", datetime.now(timezone.utc), [0.0, 0.0, 0.0], ["report"])


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_the_pilot_runs_each_arms_grid_then_its_bracket(tmp_path, monkeypatch) -> None:
    """The pilot's orchestration (which runs, in which order, when it is done), the runs themselves
    replaced by made-up results: 2-GRPO+extend8's best is its lowest rate, so 1e-5 runs after its grid."""
    import benchmarks.group_size as gs

    s = load_settings(CONFIG)
    ctx = {"settings": s, "runs_dir": tmp_path, "arms": [PLAIN, "2-GRPO+extend8"]}
    batches = []

    def fake_with_ray(ctx: dict, jobs: list) -> list[dict]:
        batches.append([name for name, _ in jobs if gs.finished(ctx, name) is None])
        for name, kw in jobs:
            arm = s["arms"][kw["arm"]]
            acc = {PLAIN: 0.6 - abs(kw["lr"] - 1e-4) * 100, "2-GRPO+extend8": 0.7 - kw["lr"] * 100}[kw["arm"]]
            run = _run(kw["arm"], 2, "pilot", kw["lr"], kw["seed"], acc, 1.0, settings_key(s, arm))
            gs.save(ctx, name, run)
        return [gs.finished(ctx, name) for name, _ in jobs]

    monkeypatch.setattr(gs, "with_ray", fake_with_ray)
    assert gs.pilot(ctx) is True
    # first every declared rate, interleaved by position; then the bracket's one extension
    assert batches[0][:4] == [
        "pilot-g2-lr3e-05-seed100",
        "pilot-g2-ext8-lr3e-05-seed100",
        "pilot-g2-lr0.0001-seed100",
        "pilot-g2-ext8-lr0.0001-seed100",
    ]
    assert len(batches[0]) == 7 and batches[1:] == [
        ["pilot-g2-ext8-lr1e-05-seed100"],
        ["pilot-g2-ext8-lr3.33e-06-seed100"],
    ]
    state = gs.pilot_state(ctx)
    assert state[PLAIN] == ([3e-5, 1e-4, 3e-4, 1e-3], True)
    assert state["2-GRPO+extend8"] == ([3e-5, 1e-4, 3e-4, 1e-5, 3.33e-6], True)  # extensions used up
    assert gs.pilot(ctx) is True and batches[-1] == []  # done: nothing runs again
    runs = [gs.finished(ctx, gs.pilot_job(s, arm, lr)[0]) for arm, (grid, _) in state.items() for lr in grid]
    lrs = chosen_lrs(runs)
    assert lrs == {PLAIN: 1e-4, "2-GRPO+extend8": 3.33e-6}
    assert [name for name, _ in gs.seed_jobs(ctx, lrs, [0, 1])] == [
        "seed-g2-lr0.0001-seed0",
        "seed-g2-ext8-lr3.33e-06-seed0",
        "seed-g2-lr0.0001-seed1",
        "seed-g2-ext8-lr3.33e-06-seed1",
    ]
