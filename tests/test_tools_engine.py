"""Episodes on the real stack: one vLLM engine on the embedded tool model, the ToolPool and its workers as Ray
actors. One engine for the module; each test proves several claims on it.

- token in, token out: every turn's tokens as sampled (a call turn ends on the call token's id), each
  observation exactly the tokenization of what the tool answered, the loss mask 1 on the model's tokens only,
  and the learner's log-probs (learner/logprobs.py on the same weights) equal the engine's at those tokens;
- lock-step episodes are reproducible with a seed, and stay so when a tool worker is killed mid-chunk (the
  pool replaces it and runs its calls again); independent episodes (asynchronous mode, evaluation) run too;
- the python tool and docs/environments.md's own environment run through the same path;
- an engine killed while an episode waits for its tool: the chunk's episodes are generated again on its
  replacement (RolloutFleet.generate, the one generate-and-wait path);
- `duet eval env.name=calculator` evaluates with tools.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
import torch

from cluster.config import EnvConfig, SamplingConfig, load_config
from cluster.records import Prompt
from envs.calculator import Calculator, evaluate
from envs.pool import shutdown_tool_pool, start_tool_pool, wait_tool_pool
from envs.task import ensure_tool_model, multiplication_rows
from tests.helpers import docs_environment_example, integration_fixture, vllm_process, wait_for

SAMPLING = SamplingConfig(temperature=1.0, max_tokens=16)


@pytest.fixture(scope="module")
def tool_model(model_cache):
    return ensure_tool_model(model_cache)  # the embedded default's: built once for every test that needs it


@integration_fixture(scope="module")
def fleet(local_ray, tool_model):
    """A one-engine RolloutFleet, as the driver builds it (its own placement group, vLLM's CPU settings)."""
    from cluster.fleet import RolloutFleet
    from cluster.placement import make_plan

    cfg = load_config(overrides=["env.name=calculator", f"model.path={tool_model}"])
    fleet = RolloutFleet(cfg, make_plan(cfg), str(tool_model))
    fleet.start(1)
    yield fleet
    fleet.shutdown()


@pytest.fixture
def engine(fleet):
    return fleet.engines[0]


def prompts(n: int, seed: int = 3) -> list[Prompt]:
    return [
        Prompt(i, r["problem"], r["answer"], r["source"]) for i, r in enumerate(multiplication_rows(n, seed))
    ]


def pool_of(ray, name: str, **env) -> tuple[object, EnvConfig]:
    cfg = load_config(overrides=[f"env.name={name}", *(f"env.{k}={v}" for k, v in env.items())])
    pool = start_tool_pool(cfg)
    wait_tool_pool(pool)
    return pool, cfg.env


def test_episodes_token_in_token_out_and_the_learners_logprobs(local_ray, engine, tool_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from learner.logprobs import completion_logprobs, install_completion_head

    ray = local_ray
    pool, env = pool_of(ray, "calculator")
    tok = AutoTokenizer.from_pretrained(tool_model)
    call_end, eos = tok.convert_tokens_to_ids("</call>"), tok.eos_token_id
    calc = Calculator(env)
    batch = prompts(8)
    groups = ray.get(engine.generate.remote(batch, 2, SAMPLING, True, 5, env, pool))
    episodes = [c for g in groups for c in g]
    assert len(episodes) == 16 and all(c.tool_calls >= 1 for c in episodes)  # the base policy calls
    for p, g in zip(batch, groups):
        for c in g:
            assert c.prompt_token_ids == tok(p.text)["input_ids"]
            mask, ids = c.loss_mask, c.token_ids
            assert len(mask) == len(ids) == len(c.logprobs)
            # walk the episode: model turn (mask 1) up to the call token, then the observation (mask 0)
            i, turns = 0, 0
            while i < len(ids):
                start = i
                while i < len(ids) and mask[i] == 1:
                    i += 1
                turns += 1
                turn = ids[start:i]
                if i == len(ids):
                    assert turn[-1] == eos or c.finish_reason == "length"
                    break
                assert turn[-1] == call_end  # a call turn ends on the stop token id itself
                j = i
                while j < len(ids) and mask[j] == 0:
                    j += 1
                expected = calc.step({}, tok.decode(turn)).observation
                assert ids[i:j] == tok(expected)["input_ids"][: env.max_observation_tokens]
                assert c.logprobs[i:j] == [0.0] * (j - i)
                i = j
            assert turns == c.turns and c.turn_versions == [0] * c.turns
    # The learner's log-probs (its own function, the same weights) at the model's tokens equal the engine's.
    model = AutoModelForCausalLM.from_pretrained(tool_model, torch_dtype=torch.float32).eval()
    head = install_completion_head(model, 512)
    with torch.no_grad():
        logp, _ = completion_logprobs(
            model, head, [c.prompt_token_ids for c in episodes], [c.token_ids for c in episodes], 1.0, "cpu"
        )
    for k, c in enumerate(episodes):
        m = torch.tensor(c.loss_mask, dtype=torch.bool)
        learner = logp[k, : len(c.token_ids)][m]
        engine_lp = torch.tensor(c.logprobs)[m]
        assert torch.allclose(learner, engine_lp, atol=1e-3), (learner - engine_lp).abs().max()

    # Reproducible: the same seed gives the same episodes, even with a tool worker killed mid-chunk.
    pids = ray.get(pool.worker_pids.remote())
    ref = engine.generate.remote(batch, 2, SAMPLING, True, 5, env, pool)
    os.kill(pids[0], signal.SIGKILL)
    again = ray.get(ref)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]
    assert sum(c.tool_errors for g in again for c in g) == sum(c.tool_errors for c in episodes)
    events = ray.get(pool.new_events.remote(0))
    assert [e["slot"] for e in events] == [0] and events[0]["event"] == "tool_worker_replaced"
    assert None not in ray.get(pool.worker_pids.remote())
    # Named as the other actors are (issue 22, item 16): the replacement counts up in its slot.
    names = {a["name"].rsplit("/", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert {"tool-pool-0", "tool-worker-0.2", "tool-worker-1"} <= names, names

    # Independent episodes (asynchronous mode, evaluation): no seed, each goes on by itself.
    free = ray.get(engine.generate.remote(batch, 2, SAMPLING, False, None, env, pool))
    assert all(c.tool_calls >= 1 and c.loss_mask.count(0) > 0 for g in free for c in g)
    shutdown_tool_pool(pool)


def test_the_python_tool_and_the_docs_environment(local_ray, engine, tool_model, tmp_path, monkeypatch):
    ray = local_ray
    pool, env = pool_of(ray, "python", timeout_s=2)
    info = ray.get(pool.ready.remote())
    assert all(w["isolation"]["network"] and w["isolation"]["filesystem"] for w in info), info
    groups = ray.get(engine.generate.remote(prompts(4), 2, SAMPLING, True, 9, env, pool))
    for c in (c for g in groups for c in g):
        call = c.text.split("</call>")[0].split("<call>")[-1]
        if c.tool_errors == 0:  # the code ran: its value is the observation
            assert f"<result>{evaluate(call)}</result>" in c.text, c.text
    shutdown_tool_pool(pool)

    _, _ = docs_environment_example(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the workers get it, as a user's folder
    pool, env = pool_of(ray, "my_envs:LimitedMultiplier")
    groups = ray.get(engine.generate.remote(prompts(4), 2, SAMPLING, False, None, env, pool))
    episodes = [c for g in groups for c in g]
    assert all(c.env_reward in (0.0, 1.0) and c.tool_calls >= 1 for c in episodes)
    shutdown_tool_pool(pool)


def test_an_engine_killed_mid_episode_has_its_episodes_generated_again(local_ray, fleet, tmp_path):
    """The kill lands while the chunk's first episode is inside its tool call (tests.helpers.GatedCalculator
    holds it there); the fleet's generate path replaces the engine and generates the chunk again."""
    from cluster.pipeline import failure_name

    ray = local_ray
    pool, _ = pool_of(ray, "tests.helpers:GatedCalculator")
    fleet.tools = pool
    gate = str(tmp_path / "gate")
    batch = [Prompt(p.index, p.text, p.answer, gate) for p in prompts(8)]
    core = vllm_process(ray.get(fleet.engines[0].ready.remote())["pid"], "VLLM::EngineCore")
    failures = []

    def on_failure(engine_id: int, error: BaseException) -> bool:
        failures.append((engine_id, failure_name(error)))
        fleet.replace({0: ("killed mid-episode", True)}, 0)
        return True

    chunks = fleet.generate(batch, 2, seed=5, on_failure=on_failure, label="test")

    def kill_then_open() -> None:
        wait_for(lambda: os.path.exists(gate + ".arrived"), 120, "an episode inside its tool call")
        os.kill(core, signal.SIGKILL)
        open(gate + ".open", "w").close()

    killer = threading.Thread(target=kill_then_open, daemon=True)
    killer.start()
    ((engine_id, chunk, groups),) = list(chunks)
    killer.join(timeout=5)
    assert failures == [(0, "EngineDeadError")] and engine_id == 1 and fleet.ids == [1]
    assert [p.index for p in chunk] == list(range(8))
    assert all(c.tool_calls >= 1 and c.engine_id == 1 for g in groups for c in g)
    assert fleet.events[-1]["event"] == "engine_replaced"
    fleet.tools = None
    shutdown_tool_pool(pool)


def test_duet_eval_with_the_calculator(local_ray, tool_model, tmp_path, model_cache):
    from cluster.evaluation import eval_main

    out = tmp_path / "eval.json"
    rc = eval_main(
        [
            "env.name=calculator",
            f"model.cache_dir={model_cache}",
            "eval.synthetic_problems=16",
            "eval.samples_per_prompt=2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["env"] == "calculator" and result["model"] == str(tool_model)
    assert result["overall"]["problems"] == 16 and 0.0 <= result["overall"]["avg@n"] <= 1.0
    assert result["overall"]["mean_length"] > 15  # call, observation and answer: an episode, not one turn
