"""Environments: multi-turn episodes with tools (docs/environments.md).

The interface (`Environment`, `Step`) and the call format's helpers are importable from here; the built-ins are
`envs.calculator.Calculator` and `envs.python_tool.PythonTool`; the tool pool's actors live in envs/pool.py and
envs/worker.py, the episode loop the engines run in envs/episodes.py.
"""

from envs.base import Environment, Step, call_body, result

__all__ = ["Environment", "Step", "call_body", "result"]
