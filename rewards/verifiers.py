"""The verifiers: pure functions from (completion, reference) to a reward, a reason and details.

Nothing here bounds time or memory: the functions that parse untrusted text (math-verify, sympy, a
user's custom function) can hang or explode, so they are only ever called inside the sandbox child
process (`rewards.sandbox`), which the parent kills at the time limit. What *is* guaranteed here is
that the code we own is linear in the input: the `\\boxed{...}` scanner never backtracks, and text is
sanitised before it reaches a regex or a parser.

Reasons (the contract of `cluster.records.VerifyResult.reason`): `correct`, `wrong`, `no_answer`;
the sandbox adds `timeout`, `too_long` and `error: ...`.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

#: Item verifier names the sandbox runs itself (`remote` is routed to the HTTP client by the pool).
LOCAL_VERIFIERS = ("math", "format", "custom")

# `\boxed{` or `\fbox{`, optionally with spaces before the brace (models write `\boxed {5}`).
_OPEN_BOX = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
# Inside a box: an escaped character (so `\{`, `\}` and `\\` never count as braces) or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)
# C0/C1 control characters except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_PERCENT = re.compile(r"\\?%")
_CUSTOM_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

# Sizes of the strings echoed back in details/reasons: enough to debug, never a megabyte.
_ECHO_CHARS = 200


class Verdict(NamedTuple):
    """What a verifier decided; the sandbox adds the elapsed time to make a VerifyResult."""

    reward: float
    reason: str
    details: dict


@dataclass(frozen=True)
class VerifierSettings:
    """The part of RewardsConfig the verifiers need; plain data so it can cross a pipe as JSON."""

    percent_as_fraction: bool = True
    math_weight: float = 1.0
    format_weight: float = 0.0
    custom_function: str | None = None
    answer_extraction: str = "last_boxed"

    @classmethod
    def from_config(cls, cfg: Any) -> VerifierSettings:
        """Take the fields from a RewardsConfig (or any object with the same attribute names)."""
        return cls(
            percent_as_fraction=cfg.percent_as_fraction,
            math_weight=cfg.math_weight,
            format_weight=cfg.format_weight,
            custom_function=cfg.custom_function,
            answer_extraction=getattr(cfg, "answer_extraction", "last_boxed"),
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- text handling (ours, linear)


def sanitize_text(text: str) -> str:
    """Make untrusted text safe for regexes, parsers and UTF-8 encoders.

    Lone surrogates (from invalid UTF-8 decoded with surrogateescape, or from JSON `\\ud800`) would
    make any later `.encode()` raise, so they become `?`; control characters become spaces rather
    than vanishing, so they cannot glue two tokens into a new valid one.
    """
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub(" ", text)


def safe_echo(text: str, limit: int = _ECHO_CHARS) -> str:
    """A short, encodable copy of untrusted text for reasons and details (logs, JSON responses)."""
    text = text[: limit * 2]
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(" ", text)[:limit]


@dataclass(frozen=True)
class BoxedScan:
    """All top-level `\\boxed{...}` of a text: how many closed, the last one, and whether one is unclosed."""

    count: int
    last: str | None
    unclosed: bool


def scan_boxed(text: str) -> BoxedScan:
    """Find the top-level `\\boxed{...}` (and `\\fbox{...}`) answers in one left-to-right pass.

    Linear time: each character is looked at once (a box's content is skipped as a whole once its
    closing brace is found, so nested boxes count as part of their parent). An unclosed box consumes
    the rest of the text and is reported as `unclosed`: the text was probably cut mid-answer.
    """
    count = 0
    last: str | None = None
    pos = 0
    while True:
        m = _OPEN_BOX.search(text, pos)
        if m is None:
            return BoxedScan(count, last, False)
        start = m.end()
        depth = 1
        for tok in _BRACE_TOKEN.finditer(text, start):
            c = tok.group()
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    count += 1
                    last = text[start : tok.start()]
                    pos = tok.end()
                    break
        else:
            return BoxedScan(count, last, True)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, or None when there is none or the last one is unclosed.

    An unclosed last box means the model was cut off (or retracted) while answering; scoring an
    earlier box instead would reward an answer the model moved away from, so that is `no_answer`.
    """
    scan = scan_boxed(text)
    if scan.unclosed or scan.last is None:
        return None
    return scan.last


# ---------------------------------------------------------------- math-verify


def _mv() -> Any:
    """Import math-verify lazily: the parent (driver, Ray actor, server) never needs sympy loaded."""
    import math_verify

    # math-verify logs the whole offending input at WARNING on its own timeouts; never flood logs.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    return math_verify


def _parse(text: str, *, latex_first: bool = True) -> list:
    mv = _mv()
    configs = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    if not latex_first:
        configs.reverse()
    # parsing_timeout=None: math-verify's own SIGALRM timer would cancel nothing that matters (it
    # cannot interrupt C code) and would fight over SIGALRM; the sandbox parent's kill is the limit.
    return mv.parse(text, extraction_config=configs, parsing_timeout=None)


def parse_reference(reference: str, *, percent_as_fraction: bool = True) -> list:
    """Parse a dataset reference, which is usually bare ("19", "\\frac{1}{2}", "[1,2]").

    math-verify extracts answers from LaTeX environments, so a bare reference is wrapped in
    `\\boxed{}` (one that already carries `$...$` or a box is parsed as it is). When nothing parses,
    the stripped string itself is the gold: math-verify then compares strings exactly.
    """
    ref = sanitize_text(reference).strip()
    if not percent_as_fraction:
        ref = _PERCENT.sub("", ref).strip()
    if not ref:
        return []
    wrapped = ref if ("\\boxed" in ref or _UNESCAPED_DOLLAR.search(ref)) else "\\boxed{" + ref + "}"
    gold = _parse(wrapped)
    if not gold:
        gold = _parse(ref)
    return gold or [ref]


def verify_math(
    completion: str,
    reference: str,
    *,
    percent_as_fraction: bool = True,
    extraction: str = "last_boxed",
) -> Verdict:
    """Score the completion's final answer against the reference with math-verify.

    `extraction="last_boxed"` takes the last `\\boxed{...}` (the training format); `"math_verify"`
    lets math-verify find the answer anywhere (for models that write "The final answer is 5").
    With `percent_as_fraction=False` percent signs are dropped on both sides, so `50\\%` equals `50`
    but not `0.5`; with True math-verify accepts both `50` and `0.5` for `50\\%`.
    """
    text = sanitize_text(completion)
    gold = parse_reference(reference, percent_as_fraction=percent_as_fraction)
    if not gold:
        return Verdict(0.0, "error: empty reference", {})
    mv = _mv()
    if extraction == "last_boxed":
        content = extract_boxed(text)
        if content is None or not content.strip():
            return Verdict(0.0, "no_answer", {})
        if not percent_as_fraction:
            content = _PERCENT.sub("", content)
        pred = _parse("\\boxed{" + content + "}")
        details = {"answer": safe_echo(content.strip())}
    elif extraction == "math_verify":
        if not percent_as_fraction:
            text = _PERCENT.sub("", text)
        pred = _parse(text)
        if not pred:
            return Verdict(0.0, "no_answer", {})
        details = {"answer": safe_echo(str(pred[-1]))}
    else:
        return Verdict(0.0, f"error: unknown answer_extraction {extraction!r}", {})
    if not pred:
        details["parsed"] = False
        return Verdict(0.0, "wrong", details)
    ok = mv.verify(gold, pred, timeout_seconds=None)
    return Verdict(1.0, "correct", details) if ok else Verdict(0.0, "wrong", details)


# ---------------------------------------------------------------- format and combination


def verify_format(completion: str) -> Verdict:
    """1 for exactly one closed, non-empty top-level `\\boxed{...}`; the answer format of training.

    `no_answer` when there is no box at all, `wrong` for several boxes, an unclosed or an empty one.
    """
    scan = scan_boxed(sanitize_text(completion))
    details = {"boxed_count": scan.count, "unclosed": scan.unclosed}
    if scan.count == 0 and not scan.unclosed:
        return Verdict(0.0, "no_answer", details)
    if scan.count == 1 and not scan.unclosed and scan.last is not None and scan.last.strip():
        return Verdict(1.0, "correct", details)
    return Verdict(0.0, "wrong", details)


def combine(math_v: Verdict, format_v: Verdict | None, math_weight: float, format_weight: float) -> Verdict:
    """Weighted sum of the math and format rewards; the reason stays the math one (it says why)."""
    if format_v is None or format_weight == 0.0:
        if math_weight == 1.0:
            return math_v
        return Verdict(math_weight * math_v.reward, math_v.reason, math_v.details)
    reward = math_weight * math_v.reward + format_weight * format_v.reward
    details = dict(math_v.details, math=math_v.reward, format=format_v.reward)
    return Verdict(reward, math_v.reason, details)


# ---------------------------------------------------------------- custom functions


def load_custom(path: str) -> Callable[..., Any]:
    """Import `package.module:function` (the attribute part may be dotted, e.g. `mod:Class.method`)."""
    if not _CUSTOM_PATH.match(path or ""):
        raise ValueError(f"custom_function must look like 'package.module:function', got {path!r}")
    module_name, attr = path.split(":", 1)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"custom_function {path!r} is not callable")
    return obj


def call_custom(fn: Callable[..., Any], prompt: str, completion: str, reference: str) -> Verdict:
    """Call a user function `fn(prompt, completion, reference)` and check what it returned.

    It may return a number, or `(number, details_dict)`. A `"reason"` string in the details becomes
    the reason; otherwise a positive reward is `correct` and anything else `wrong`. NaN, infinities
    and other types are `error: ...`: a bad reward must never reach the advantage computation.
    """
    out = fn(prompt, completion, reference)
    details: Any = {}
    if isinstance(out, tuple):
        if len(out) != 2:
            return Verdict(0.0, "error: custom function returned a tuple that is not (float, dict)", {})
        out, details = out
        if not isinstance(details, dict):
            return Verdict(0.0, "error: custom function details are not a dict", {})
    if not isinstance(out, (int, float)):  # bool is an int: True/False score 1/0, a natural reading
        return Verdict(0.0, f"error: custom function returned {type(out).__name__}, not a float", {})
    reward = float(out)
    if not math.isfinite(reward):
        return Verdict(0.0, f"error: custom function returned {reward}", {})
    reason = details.get("reason")
    if not isinstance(reason, str) or not reason:
        reason = "correct" if reward > 0 else "wrong"
    return Verdict(reward, safe_echo(reason), details)


# ---------------------------------------------------------------- dispatch


def score_one(
    verifier: str,
    prompt: str,
    completion: str,
    reference: str,
    settings: VerifierSettings,
    custom_fn: Callable[..., Any] | None = None,
) -> Verdict:
    """Run one item's verifier; raises only on bugs and hostile input (the sandbox catches it)."""
    if verifier == "math":
        m = verify_math(
            completion,
            reference,
            percent_as_fraction=settings.percent_as_fraction,
            extraction=settings.answer_extraction,
        )
        f = verify_format(completion) if settings.format_weight > 0 else None
        return combine(m, f, settings.math_weight, settings.format_weight)
    if verifier == "format":
        return verify_format(completion)
    if verifier == "custom":
        if custom_fn is None:
            return Verdict(0.0, "error: no custom_function configured", {})
        return call_custom(custom_fn, prompt, completion, reference)
    return Verdict(0.0, f"error: unknown verifier {safe_echo(str(verifier), 40)!r}", {})
