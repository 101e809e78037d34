"""The built-in `python` environment: the model writes code between `<call>` and `</call>` (`<call>123*45</call>`
or a short program); it runs in the sandbox of envs/python_sandbox.py, and the observation is what it printed,
plus the value of its last expression as a REPL shows it: `<result>5535</result>`.

Each failure costs the model one turn, never the run: code that raises (the observation is the exception's
last line), a hang (killed at env.timeout_s), a memory bomb (RLIMIT_AS: MemoryError), megabytes of output
(stopped at env.max_output_bytes), an attempt at the network or at a file outside the scratch folder (the
error the code gets), a turn with no `<call>`: each is an observation that says so, flagged as a tool error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from envs.base import Environment, Step, call_body, result
from envs.python_sandbox import PythonSandbox

if TYPE_CHECKING:
    from cluster.config import EnvConfig

MAX_CODE_CHARS = 4000


class PythonTool(Environment):
    """One sandbox per instance (one instance per ToolWorker); started here, so a host that cannot isolate
    the code fails the worker's start-up, not a call."""

    def __init__(self, config: EnvConfig) -> None:
        super().__init__(config)
        self.sandbox = PythonSandbox(
            timeout_s=config.timeout_s,
            memory_limit_mib=config.memory_limit_mib,
            max_output_bytes=config.max_output_bytes,
            allow_unisolated=config.python_allow_unisolated,
        ).start()

    def step(self, state: dict, turn: str) -> Step:
        code = call_body(turn)
        if code is None:
            return Step(result("error: no <call> in the turn"), error=True)
        if len(code) > MAX_CODE_CHARS:
            return Step(result(f"error: code longer than {MAX_CODE_CHARS} characters"), error=True)
        run = self.sandbox.run(code)
        text = run.output.strip()
        if run.status == "ok":
            return Step(result(text or "(no output)"))
        if run.status == "error":
            return Step(result(text.splitlines()[-1] if text else "error"), error=True)
        if run.status == "timeout":
            return Step(result(f"error: timed out after {run.detail} s"), error=True)
        if run.status == "output_limit":
            return Step(result(f"{text[:200]} ... [output cut at {run.detail} bytes]"), error=True)
        if run.status == "signal":
            return Step(result(f"error: killed by {run.detail}"), error=True)
        return Step(result(f"error: {run.detail}"), error=True)

    def close(self) -> None:
        self.sandbox.close()
