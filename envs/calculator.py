"""The built-in `calculator` environment: the model writes `<call>123*45</call>`, the observation is
`<result>5535</result>`; the episode ends when the model answers (end-of-sequence), and the verifier scores
that last turn.

The expression is evaluated from its syntax tree, never by `eval`: numbers, + - * / // % **, unary minus and
parentheses only, with bounds on its length, on the size of every intermediate number and on exponents, so a
call takes microseconds whatever the model writes and needs no child process. A call the calculator cannot
evaluate is an observation saying why (`<result>error: ...</result>`), never an exception.
"""

from __future__ import annotations

import ast
import math
import operator

from envs.base import Environment, Step, call_body, result

MAX_EXPRESSION_CHARS = 200
MAX_ABS = 10**40  # any intermediate number beyond this is refused (no big-integer blow-ups)
MAX_EXPONENT = 64

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class CalculatorError(ValueError):
    """The expression cannot be evaluated; the message is the observation's."""


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression (see the module docstring); CalculatorError if refused."""
    text = expression.strip()
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError):
        raise CalculatorError("not an arithmetic expression") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent beyond {MAX_EXPONENT}")
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except (OverflowError, ValueError):
            raise CalculatorError("number out of range") from None
    raise CalculatorError("only numbers, + - * / // % ** and parentheses")


def _bounded(v: int | float | complex) -> int | float:
    if isinstance(v, complex) or (isinstance(v, float) and not math.isfinite(v)) or abs(v) > MAX_ABS:
        raise CalculatorError("number out of range")
    return v


def show(v: int | float) -> str:
    """A value as the observation writes it: integers plainly, other numbers to 10 significant digits."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v) if isinstance(v, int) else f"{v:.10g}"


class Calculator(Environment):
    """Arithmetic as a tool (see the module docstring)."""

    def step(self, state: dict, turn: str) -> Step:
        expression = call_body(turn)
        if expression is None:
            return Step(result("error: no <call> in the turn"), error=True)
        try:
            return Step(result(show(evaluate(expression))))
        except CalculatorError as e:
            return Step(result(f"error: {e}"), error=True)
