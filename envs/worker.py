"""ToolWorker: one Ray actor that hosts one Environment instance and runs its calls, one at a time.

The environment's methods run here, in this worker's process, never in an engine's; the python tool's code
runs one level further down, in the sandbox's child (envs/python_sandbox.py). The ToolPool (envs/pool.py)
sends the calls, bounds their time and replaces this worker if it dies or hangs.
"""

from __future__ import annotations

import os
import time
import traceback

import ray

from cluster.records import Prompt
from envs.base import ToolResult, load_environment, result


@ray.remote(max_restarts=0, max_task_retries=0)
class ToolWorker:
    """Ray restarts are off on purpose: the pool replaces a dead worker itself and runs its calls again."""

    def __init__(self, env_cfg: dict, index: int = 0, start: int = 1) -> None:
        from cluster.config import EnvConfig
        from cluster.naming import node_address

        self.index, self.start_number, self.node = index, start, node_address()
        self.config = EnvConfig.model_validate(env_cfg)
        self.env = load_environment(self.config.name, self.config)  # a broken env fails the start-up here

    def __repr__(self) -> str:  # the Ray dashboard's Repr column (taken once, after __init__)
        again = f", start {self.start_number} of its slot" if self.start_number > 1 else ""
        return f"ToolWorker(tool worker {self.index}, env {self.config.name}{again}, node {self.node})"

    def ready(self) -> dict:
        sandbox = getattr(self.env, "sandbox", None)
        return {
            "index": self.index,
            "pid": os.getpid(),
            "sandbox_pid": getattr(sandbox, "pid", None),
            "isolation": getattr(sandbox, "isolation", None),
        }

    def start(self, prompts: list[Prompt]) -> list[dict]:
        return [self.env.start(p) for p in prompts]

    def step(self, items: list[tuple[dict, str]]) -> list[ToolResult]:
        """One result per (state, turn), in order. An environment that raises costs the episode a turn: the
        observation says what it raised (a malformed call must never stop a run)."""
        out = []
        for state, turn in items:
            t0 = time.perf_counter()
            try:
                s = self.env.step(state, turn)
                out.append(ToolResult(s.observation, s.done, s.error, state, time.perf_counter() - t0))
            except Exception as e:
                last = traceback.format_exception_only(type(e), e)[-1].strip()[:200]
                message = result(f"error: the environment raised {last}")
                out.append(ToolResult(message, False, True, state, time.perf_counter() - t0))
        return out

    def score(self, items: list[tuple[dict, str, Prompt]]) -> list[float | None]:
        return [self.env.score(state, answer, prompt) for state, answer, prompt in items]

    def close(self) -> None:
        self.env.close()
