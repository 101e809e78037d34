"""The environment interface: what an episode is, between the model's turns.

An episode starts from a dataset row (`start`), then alternates: the model samples a turn; a turn that ends
on the tool-call token (`env.call_end_token`) goes to `step`, whose observation is appended to the episode
as tokens (tokenized once, never sampled, so the learner's loss mask leaves it out), and the model goes on;
a turn that ends on end-of-sequence (or a limit: `env.max_turns`, `env.max_total_tokens`) ends the episode.
At the end `score` gives the reward, or hands the last model turn to the run's verifier (rewards.verifier).

Every method runs in a ToolWorker actor (envs/worker.py), never in an engine's process; the episode's state
is a plain dict that travels with each call (so any worker serves any call, and a worker that dies loses
nothing). See docs/environments.md.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.records import Prompt

if TYPE_CHECKING:
    from cluster.config import EnvConfig

CALL_START = "<call>"
CALL_END = "</call>"
RESULT_START = "<result>"
RESULT_END = "</result>"
_CALL = re.compile(re.escape(CALL_START) + r"(.*?)(?:" + re.escape(CALL_END) + r"|$)", re.DOTALL)


@dataclass
class Step:
    """What the environment answers to a model turn that called it."""

    observation: str  # appended after the turn (cut to env.max_observation_tokens)
    done: bool = False  # end the episode now: its last model turn is scored
    error: bool = False  # the call failed (malformed, timed out, raised ...): counted in tools/errors


@dataclass
class ToolResult:
    """One `step` as the tool pool hands it back to the engine: the Step, the episode's state after it, and
    how long the worker spent on it."""

    observation: str
    done: bool
    error: bool
    state: dict
    elapsed_s: float


class Environment:
    """Subclass and override `step` (and `start`, `score` if needed). One instance per ToolWorker, built
    with the run's `env` config section; it serves every episode, so keep per-episode data in `state`."""

    def __init__(self, config: EnvConfig) -> None:
        self.config = config

    def start(self, prompt: Prompt) -> dict:
        """A new episode of `prompt` (a dataset row: index, text, answer, source): its initial state."""
        return {}

    def step(self, state: dict, turn: str) -> Step:
        """The model's turn (its text, ending on the call token) → the observation. `state` may be changed
        in place: the changes travel with the episode."""
        raise NotImplementedError

    def score(self, state: dict, answer: str, prompt: Prompt) -> float | None:
        """The episode's reward, given its last model turn `answer`; None: rewards.verifier scores it."""
        return None

    def close(self) -> None:
        """Release what the instance holds (a sandbox); called when its worker stops."""


def call_body(turn: str) -> str | None:
    """The text between the last `<call>` and `</call>` of a turn (the end marker may be missing: the turn
    stopped on it); None when the turn has no `<call>`."""
    found = _CALL.findall(turn)
    return found[-1].strip() if found else None


def result(text: str) -> str:
    """An observation in the tool-call format: `<result>text</result>`."""
    return f"{RESULT_START}{text}{RESULT_END}"


def load_environment(name: str, config: EnvConfig) -> Environment:
    """The Environment of `env.name`: a built-in (calculator, python) or 'package.module:Class'."""
    if name == "calculator":
        from envs.calculator import Calculator

        return Calculator(config)
    if name == "python":
        from envs.python_tool import PythonTool

        return PythonTool(config)
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"env.name: cannot import {module_name!r} ({e}); the module must be importable by the tool "
            "workers: installed, on PYTHONPATH, or in the folder `duet train` runs from"
        ) from e
    cls: Any = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise ImportError(f"env.name: {module_name!r} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise TypeError(f"env.name: {name!r} is not a subclass of envs.Environment")
    return cls(config)


def check_environment(cfg: Any) -> None:
    """What can be checked of `env` before any actor starts (cfg: the whole Config); raises ConfigError
    naming the field: a user's Environment module that cannot be found, a call_end_token that is not one
    token of the model's tokenizer (a local folder's tokenizer.json, or the embedded tool model's)."""
    import importlib.util
    from pathlib import Path

    from cluster.config import ConfigError

    env = cfg.env
    if not env.enabled:
        return
    if ":" in env.name:
        module = env.name.split(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ConfigError(
                f"env.name: no module {module!r} here; the module of an Environment class must be importable "
                "(installed, on PYTHONPATH, or in the folder `duet train` runs from)"
            )
    if cfg.model.path is None:
        from envs.task import TOOL_TOKENS

        if env.call_end_token not in TOOL_TOKENS:
            raise ConfigError(
                f"env.call_end_token: {env.call_end_token!r} is not a token of the embedded tool model (its "
                f"tool tokens: {', '.join(TOOL_TOKENS)}); use {CALL_END!r} or give model.path"
            )
        return
    file = Path(cfg.model.path).expanduser() / "tokenizer.json"
    if not file.is_file():  # a hub id or a slow tokenizer: the engine checks it when it starts episodes
        return
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(file)).encode(env.call_end_token, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ConfigError(
            f"env.call_end_token: {env.call_end_token!r} is {len(ids)} tokens of {cfg.model.path}'s tokenizer, "
            "not one: a model turn ends on a stop token id; name a single token of its vocabulary (e.g. "
            "Qwen's </tool_call>)"
        )
