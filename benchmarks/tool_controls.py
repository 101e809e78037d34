"""The tools benchmark's two control environments (benchmarks/tools.py evaluates with them by import path, as
a user's environment: env.name=benchmarks.tool_controls:NoTool). Importable on its own: the tool workers
import it, and nothing here starts or imports anything heavy."""

from __future__ import annotations

from envs.base import Step, result
from envs.calculator import Calculator


class NoTool(Calculator):
    """The model calls, the tool gives nothing back (`<result></result>`): it must answer on its own."""

    def step(self, state: dict, turn: str) -> Step:
        return Step(result(""))


class WrongProduct(Calculator):
    """A tool that answers wrongly: the right value plus one (so never the product asked)."""

    def step(self, state: dict, turn: str) -> Step:
        right = super().step(state, turn)
        if right.error:
            return right
        value = right.observation.removeprefix("<result>").removesuffix("</result>")
        try:
            return Step(result(str(int(value) + 1)))
        except ValueError:  # not an integer (7/2): shifted all the same
            return Step(result(f"{float(value) + 1:.10g}"))
