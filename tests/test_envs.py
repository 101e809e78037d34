"""Multi-turn episodes, their pure parts: the episode loop on a scripted sampler with the real calculator, the
calculator's bounds, the config section, scoring and metrics of episodes, the learner's rows, the tokenizer and
the tool task. The real stack runs them in tests/test_tools_engine.py and tests/test_tools_train.py."""

from __future__ import annotations

import asyncio
import random

import pytest

from cluster.config import ConfigError, EnvConfig, SamplingConfig, load_config
from cluster.records import Completion, Prompt, ScoredGroup
from envs.base import Step, ToolResult, call_body, load_environment, result
from envs.calculator import Calculator, CalculatorError, evaluate
from envs.episodes import ROUND_SEED_STRIDE, EpisodeRunner, Tools, TurnOutput

CALL_END, EOS = 900, 2


class ScriptedSampler:
    """A stand-in for the engine: characters are tokens (ord), `</call>` is CALL_END and `</s>` EOS. The
    model's turn is `script(episode text so far)`; every request is recorded with its seed."""

    def __init__(self, script, version: int = 0) -> None:
        self.script, self.v = script, version
        self.calls: list[tuple[int, int | None]] = []  # (requests, seed) per sample call
        self.bump_after_call = False

    def encode(self, text: str, prompt: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join({CALL_END: "</call>", EOS: "</s>"}.get(i, chr(i)) for i in ids)

    def version(self) -> int:
        return self.v

    async def sample(self, requests, sampling, stop_token_ids, seed):
        assert stop_token_ids == [CALL_END]
        self.calls.append((len(requests), seed))
        outs = []
        for r in requests:
            text, end = self.script(self.decode(r.token_ids))
            ids = [ord(c) for c in text] + ([end] if end is not None else [])
            ids = ids[: r.max_tokens]
            finish = (
                "stop" if end is not None and len(ids) <= r.max_tokens and ids[-1:] == [end] else "length"
            )
            outs.append(TurnOutput(ids, [-0.5] * len(ids), self.decode(ids), finish))
        if self.bump_after_call:
            self.v += 1
        await asyncio.sleep(0)
        return outs


def in_process_tools(env) -> Tools:
    """The ToolPool's three calls, served in this process by `env` (the worker's logic, without Ray)."""

    async def start(prompts):
        return [env.start(p) for p in prompts]

    async def step(items):
        out = []
        for state, turn in items:
            s = env.step(state, turn)
            out.append(ToolResult(s.observation, s.done, s.error, state, 0.001))
        return out

    async def score(items):
        return [env.score(state, answer, prompt) for state, answer, prompt in items]

    return Tools(start, step, score)


def tool_user(text: str):
    """A model that calls once with its prompt's expression, then answers with the observation's number."""
    if "<result>" not in text:
        return "<call>" + text.split("=")[0], CALL_END
    value = text.split("<result>")[-1].split("</result>")[0]
    return f"\\boxed{{{value}}}", EOS


def run(runner, prompts, g=2, seed=None, max_tokens=16):
    return asyncio.run(runner.run(prompts, g, SamplingConfig(max_tokens=max_tokens), seed))


def env_cfg(**kw) -> EnvConfig:
    return EnvConfig(name="calculator", max_total_tokens=kw.pop("max_total_tokens", 256), **kw)


def test_lock_step_episode_tokens_mask_and_rounds():
    sampler = ScriptedSampler(tool_user)
    runner = EpisodeRunner(sampler, in_process_tools(Calculator(env_cfg())), env_cfg(), CALL_END, engine_id=3)
    groups = run(runner, [Prompt(0, "12*3=", "36"), Prompt(1, "7*8=", "56")], g=2, seed=11)
    # Lock-step: one sampler call per round with every live episode, seeded by (chunk seed, round).
    assert sampler.calls == [(4, 11), (4, 11 + ROUND_SEED_STRIDE)]
    c = groups[0][0]
    call, obs, answer = "<call>12*3", "<result>36</result>", "\\boxed{36}"
    # Token in, token out: the turns' ids as sampled, the observation's as tokenized once, in order.
    assert c.token_ids == [*map(ord, call), CALL_END, *map(ord, obs), *map(ord, answer), EOS]
    assert c.loss_mask == [1] * (len(call) + 1) + [0] * len(obs) + [1] * (len(answer) + 1)
    assert [lp for lp, m in zip(c.logprobs, c.loss_mask) if not m] == [0.0] * len(obs)
    assert c.model_token_count == len(call) + 1 + len(answer) + 1
    assert (c.turns, c.tool_calls, c.tool_errors, c.finish_reason) == (2, 1, 0, "stop")
    assert c.answer == "\\boxed{36}</s>" and c.scored_text == c.answer and c.env_reward is None
    assert c.engine_id == 3 and c.prompt_token_ids == list(map(ord, "12*3="))
    assert groups[1][1].answer.startswith("\\boxed{56}")


def test_malformed_call_is_an_observation_and_the_episode_goes_on():
    def no_call_marker(text):
        return ("12*3", CALL_END) if "<result>" not in text else ("\\boxed{0}", EOS)

    runner = EpisodeRunner(
        ScriptedSampler(no_call_marker), in_process_tools(Calculator(env_cfg())), env_cfg(), CALL_END
    )
    (c,) = run(runner, [Prompt(0, "12*3=", "36")], g=1)[0]
    assert c.tool_calls == 1 and c.tool_errors == 1 and c.turns == 2
    assert "<result>error: no <call> in the turn</result>" in c.text


def test_limits_turns_total_tokens_and_observation_length():
    def caller(text):
        return "<call>1+1", CALL_END  # calls forever

    calc = Calculator(env_cfg())
    # max_turns: the last turn calls, but no turn is left to read the answer: cut, no call made.
    runner = EpisodeRunner(ScriptedSampler(caller), in_process_tools(calc), env_cfg(max_turns=3), CALL_END)
    (c,) = run(runner, [Prompt(0, "x=", "2")], g=1)[0]
    assert (c.turns, c.tool_calls, c.finish_reason) == (3, 2, "length")
    # max_observation_tokens: the observation is cut to it.
    env = env_cfg(max_turns=2, max_observation_tokens=4)
    (c,) = run(
        EpisodeRunner(ScriptedSampler(caller), in_process_tools(calc), env, CALL_END),
        [Prompt(0, "x=", "2")],
        1,
    )[0]
    assert c.loss_mask.count(0) == 4
    # max_total_tokens: prompt (2) + turn (10) + observation cut to what is left, then the episode ends.
    env = env_cfg(max_turns=4, max_total_tokens=16)
    (c,) = run(
        EpisodeRunner(ScriptedSampler(caller), in_process_tools(calc), env, CALL_END),
        [Prompt(0, "x=", "2")],
        1,
    )[0]
    assert len(c.prompt_token_ids) + len(c.token_ids) == 16 and c.finish_reason == "length"
    assert c.loss_mask.count(0) == 16 - 2 - 10
    # a turn's own budget: the episode's room when it is below rollout.max_tokens
    env = env_cfg(max_total_tokens=8)
    (c,) = run(
        EpisodeRunner(ScriptedSampler(caller), in_process_tools(calc), env, CALL_END),
        [Prompt(0, "x=", "2")],
        1,
    )[0]
    assert len(c.token_ids) == 6 and c.finish_reason == "length" and c.tool_calls == 0


def test_independent_episodes_never_wait_for_each_others_tools():
    """Asynchronous mode: episode A's tool call answers only once episode B has given its final answer, which
    B can only do after its own call. Independent episodes finish; lock-step rounds (B's second turn waits for
    the first round's calls, A's among them) would wait forever."""

    def make():
        b_answered = asyncio.Event()

        def script(text):
            if "<result>" not in text:
                return "<call>1", CALL_END
            if text.startswith("B="):
                b_answered.set()
            return "\\boxed{1}", EOS

        async def start(prompts):
            return [{"who": p.text} for p in prompts]

        async def step(items):
            for state, _ in items:
                if state["who"] == "A=":
                    await asyncio.wait_for(b_answered.wait(), 2.0)
            return [ToolResult(result("1"), False, False, state, 0.0) for state, _ in items]

        async def score(items):
            return [None] * len(items)

        return EpisodeRunner(ScriptedSampler(script), Tools(start, step, score), env_cfg(), CALL_END)

    prompts = [Prompt(0, "A=", "1"), Prompt(1, "B=", "1")]
    groups = run(make(), prompts, g=1, seed=None)
    assert [g[0].turns for g in groups] == [2, 2] and all(g[0].finish_reason == "stop" for g in groups)
    with pytest.raises(TimeoutError):
        run(make(), prompts, g=1, seed=7)


def test_each_turn_records_its_policy_version():
    sampler = ScriptedSampler(tool_user, version=5)
    sampler.bump_after_call = True  # a weight update lands between the two turns
    runner = EpisodeRunner(sampler, in_process_tools(Calculator(env_cfg())), env_cfg(), CALL_END)
    (c,) = run(runner, [Prompt(0, "2*2=", "4")], g=1, seed=1)[0]
    assert c.turn_versions == [5, 6] and c.version_start == 5 and c.version_end == 7
    group = ScoredGroup(Prompt(0, "2*2=", "4"), [c], [1.0], ["correct"])
    assert group.version == 5  # the staleness bound counts from the oldest turn


def test_environment_score_and_state_travel_with_the_episode():
    class Counting(Calculator):
        def start(self, prompt):
            return {"calls": 0, "answer": prompt.answer}

        def step(self, state, turn):
            state["calls"] += 1
            return super().step(state, turn)

        def score(self, state, answer, prompt):
            return float(state["calls"] == 1 and state["answer"] in answer)

    env = Counting(env_cfg())
    runner = EpisodeRunner(ScriptedSampler(tool_user), in_process_tools(env), env_cfg(), CALL_END)
    (c,) = run(runner, [Prompt(0, "6*7=", "42")], g=1)[0]
    assert c.env_reward == 1.0


# ---------------------------------------------------------------- the calculator and the call format


def test_calculator_evaluates_arithmetic_and_refuses_everything_else():
    assert evaluate("123*45") == 5535 and evaluate("(2+3)^2") == 25 and evaluate("-7//2") == -4
    assert evaluate("7/2") == 3.5
    for bad, why in [
        ("__import__('os')", "only numbers"),
        ("10**10**10", "exponent"),
        ("9" * 50, "out of range"),
        ("1/0", "division by zero"),
        ("1+", "not an arithmetic"),
        ("", "empty"),
        ("1" * 300, "longer than"),
    ]:
        with pytest.raises(CalculatorError, match=why):
            evaluate(bad)
    calc = Calculator(env_cfg())
    assert calc.step({}, "<call>123*45</call>") == Step("<result>5535</result>")
    assert calc.step({}, "<call>2*x").error  # the end marker may be missing: the turn stopped on it
    assert call_body("a <call>1</call> b <call>2+2</call>") == "2+2" and call_body("no call") is None


def test_load_environment_by_name_and_by_import_path():
    assert isinstance(load_environment("calculator", env_cfg()), Calculator)
    assert isinstance(load_environment("envs.calculator:Calculator", env_cfg()), Calculator)
    with pytest.raises(ImportError, match=r"cannot import"):
        load_environment("no_such_module_xyz:Env", env_cfg())
    with pytest.raises(TypeError, match=r"not a subclass"):
        load_environment("envs.calculator:evaluate", env_cfg())


# ---------------------------------------------------------------- config


def test_env_config_section():
    cfg = load_config(overrides=["env.name=calculator"])
    assert cfg.env.enabled and cfg.env.max_total_tokens == cfg.rollout.max_model_len
    assert cfg.data.synthetic_task == "multiply" and load_config().data.synthetic_task == "add"
    assert load_config(overrides=["env.name=my_pkg.envs:Dice"]).env.name == "my_pkg.envs:Dice"
    with pytest.raises(ConfigError, match=r"env.name: must be one of none, calculator, python"):
        load_config(overrides=["env.name=shell"])
    with pytest.raises(ConfigError, match=r"env.max_total_tokens .* above rollout.max_model_len"):
        load_config(overrides=["env.name=python", "env.max_total_tokens=999"])
    with pytest.raises(ConfigError, match=r"env.max_turns"):
        load_config(overrides=["env.max_turns=0"])


def test_environment_checks_before_any_actor(tmp_path):
    from envs.base import check_environment
    from learner.tiny_model import build_tokenizer

    check_environment(load_config(overrides=["env.name=calculator"]))
    with pytest.raises(ConfigError, match=r"env.call_end_token: '<end>' is not a token of the embedded"):
        check_environment(load_config(overrides=["env.name=calculator", "env.call_end_token=<end>"]))
    with pytest.raises(ConfigError, match=r"env.name: no module 'no_such_module_xyz'"):
        check_environment(load_config(overrides=["env.name=no_such_module_xyz:Env"]))
    build_tokenizer(tmp_path)  # a model without the tool tokens: </call> is 7 characters
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"'</call>' is 7 tokens of"):
        check_environment(load_config(overrides=["env.name=calculator", f"model.path={tmp_path}"]))


# ---------------------------------------------------------------- scoring, metrics and the learner's rows


def episode(reward=None, mask=(1, 1, 0, 0, 1), turns=2, calls=1, errors=0) -> Completion:
    n = len(mask)
    return Completion(
        0, [5], list(range(10, 10 + n)), [-0.1] * n, "<call>..</call><result>x</result>\\boxed{1}", "stop",
        0, 0, loss_mask=list(mask), answer="\\boxed{1}", env_reward=reward, turns=turns,
        tool_calls=calls, tool_errors=errors, tool_time_s=0.25, model_wait_s=3.0, tool_wait_s=1.0,
    )  # fmt: skip


def test_scoring_reads_the_last_turn_or_the_environments_reward():
    from cluster.scoring import Scoring

    class Pool:
        def score_async(self, items):
            self.items = items
            return items

        def wait(self, items):
            from cluster.records import VerifyResult

            return [VerifyResult(1.0, "correct", 0.0) for _ in items]

    pool = Pool()
    (group,) = Scoring(pool, [Prompt(0, "p", "1")], [[episode(), episode(reward=0.0)]], "math").result()
    assert [i.completion for i in pool.items] == ["\\boxed{1}"]  # only the one the env did not score
    assert group.rewards == [1.0, 0.0] and group.reasons == ["correct", "wrong"]


def test_episode_metrics_and_the_split_of_generation_time():
    from cluster.scoring import episode_metrics, group_metrics

    groups = [
        ScoredGroup(Prompt(0, "p", "1"), [episode(), episode(turns=3, calls=2, errors=1)], [1, 0], ["a", "b"])
    ]
    m = episode_metrics(groups, generate_s=8.0)
    assert m["episodes/turns_mean"] == 2.5 and m["tools/calls"] == 3 and m["tools/errors"] == 1
    assert m["tools/time_s"] == 0.5 and m["tokens/observation"] == 4
    assert m["time/generate_model_s"] == 6.0 and m["time/generate_tool_s"] == 2.0  # 3 s : 1 s per episode
    assert group_metrics(groups, groups, 0, True)["tokens/generated"] == 6  # the model's tokens only
    single = ScoredGroup(
        Prompt(0, "p", "1"), [Completion(0, [1], [2, 3], [0.0, 0.0], "", "stop", 0, 0)], [1], ["a"]
    )
    assert episode_metrics([single], 1.0) == {}  # a single-turn run reports none of these


def test_learner_rows_carry_the_loss_mask():
    from learner.group import _model_tokens, build_rows
    from learner.rank import _loss_mask

    cfg = load_config(overrides=["env.name=calculator"])
    group = ScoredGroup(Prompt(0, "p", "1"), [episode(), episode(mask=(0, 0, 0))], [1.0, 0.0], ["a", "b"])
    rows, _ = build_rows([group], cfg)
    assert rows[0]["loss_mask"] == [1, 1, 0, 0, 1] and _model_tokens(rows[0]) == 3
    assert rows[1]["keep"] is False  # no token of the model's: nothing to train on
    single = Completion(0, [1], [2, 3], [0.0, 0.0], "", "stop", 0, 0)
    (row, _), _ = build_rows([ScoredGroup(Prompt(0, "p", "1"), [single, single], [1, 0], ["a", "b"])], cfg)
    assert row["loss_mask"] == [1, 1] and _loss_mask({"completion_ids": [4, 5]}) == [1, 1]
    with pytest.raises(ValueError, match=r"loss_mask has 1 entries for 2 tokens"):
        _loss_mask({"completion_ids": [4, 5], "loss_mask": [1]})


# ---------------------------------------------------------------- the tool model's tokenizer and task


def test_tool_tokens_are_single_tokens_and_the_default_tokenizer_is_unchanged(tmp_path):
    from envs.task import TOOL_TOKENS
    from learner.tiny_model import VOCAB, build_tokenizer

    plain = build_tokenizer(tmp_path / "plain")
    tool = build_tokenizer(tmp_path / "tool", TOOL_TOKENS)
    text = "12*3=<call>12*3</call><result>36</result>\\boxed{36}"
    ids = tool(text)["input_ids"]
    assert [tool.convert_ids_to_tokens(i) for i in ids[5:7]] == ["<call>", "1"]
    assert [tool.convert_tokens_to_ids(t) for t in TOOL_TOKENS] == list(range(len(VOCAB), len(VOCAB) + 4))
    assert tool.decode(ids) == text
    assert plain("12*3=\\boxed{36}")["input_ids"] == tool("12*3=\\boxed{36}")["input_ids"]
    assert len(plain("</call>")["input_ids"]) == 7


def test_tool_task_noise_and_episodes():
    from envs.task import episode_segments, multiplication_rows, noisy

    rows = multiplication_rows(200, 0)
    for r in rows:
        a, b = map(int, r["problem"][:-1].split("*"))
        assert 100 <= a <= 999 and 10 <= b <= 99 and int(r["answer"]) == a * b
    rng = random.Random(0)
    draws = [noisy(123, 0.25, rng) for _ in range(4000)]
    assert all(100 <= d <= 999 for d in draws)
    assert 0.38 < sum(d == 123 for d in draws) / len(draws) < 0.46  # 0.75^3 = 0.42
    assert episode_segments(123, 45, 0.0, rng) == [
        ("<call>123*45</call>", True),
        ("<result>5535</result>", False),
        ("\\boxed{5535}", True),
    ]


def test_the_docs_example_environment_runs(tmp_path, monkeypatch):
    """docs/environments.md's complete environment, under 40 lines, imported by its path as env.name says."""
    from tests.helpers import docs_environment_example

    _, code = docs_environment_example(tmp_path)
    assert len(code.strip().splitlines()) < 40
    monkeypatch.syspath_prepend(str(tmp_path))
    env = load_environment("my_envs:LimitedMultiplier", env_cfg())
    runner = EpisodeRunner(ScriptedSampler(tool_user), in_process_tools(env), env_cfg(), CALL_END)
    (right,) = run(runner, [Prompt(0, "12*3=", "36")], g=1)[0]
    assert (right.env_reward, right.tool_calls, right.tool_errors) == (1.0, 1, 0)

    def keeps_calling(text):
        return "<call>2*" + str(text.count("<result>")), CALL_END

    runner = EpisodeRunner(
        ScriptedSampler(keeps_calling), in_process_tools(env), env_cfg(max_turns=5), CALL_END
    )
    (greedy,) = run(runner, [Prompt(0, "2*2=", "4")], g=1)[0]
    assert greedy.tool_calls == 3 and greedy.finish_reason == "stop" and greedy.env_reward == 0.0
    assert greedy.text.endswith("<result>error: no calls left</result>")
