"""Verifiers and the sandbox: real math-verify, real child processes, no Ray.

Labelled answer pairs and hostile completions go through a real Sandbox (one warm child, killed and
replaced on timeout), so these tests check what training will actually score. The module-level
custom verifiers the sandbox child imports by path (`tests.helpers:custom_...`, exactly as a user's
function would be) live in tests/helpers.py. Every test with a sandbox starts child processes: integration.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest

from cluster.config import RewardsConfig
from cluster.records import VerifyItem
from rewards import verifiers as V
from rewards.sandbox import Sandbox, _ChildDied
from tests.helpers import CUSTOM_DISPATCH, integration_fixture

TIMEOUT_S = 1.0
REASONS = {"correct", "wrong", "no_answer", "timeout", "too_long"}
HERE = "tests.helpers"


def valid_reason(reason: str) -> bool:
    return reason in REASONS or reason.startswith("error: ")


# ---------------------------------------------------------------- pure code: no child, no Ray


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}", "5"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not structure
        ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # nested: the top-level box
        ("no box here", None),
        ("\\boxed{3} and then \\boxed{4", None),  # last one unclosed: cut off, no answer
        ("\\boxed", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert V.extract_boxed(text) == expected


def test_scan_boxed_counts_and_is_linear() -> None:
    assert V.scan_boxed("\\boxed{1} \\boxed{2}").count == 2
    assert V.scan_boxed("\\boxed{1} \\boxed{2").unclosed
    t0 = time.process_time()  # CPU time: other jobs loading the machine do not inflate it
    V.scan_boxed("\\boxed{" * 200_000)  # 1.4 MB of opened boxes: one pass, no backtracking
    V.scan_boxed("\\boxed{" + "{" * 1_000_000)
    V.scan_boxed("\\boxed{1}" * 100_000)
    assert time.process_time() - t0 < 2.0  # ~0.4 s here; a quadratic scan would take hours


def test_sanitize_text() -> None:
    assert V.sanitize_text("a\x00b\x1bc") == "a b c"
    assert V.sanitize_text("x\ud800y") == "x?y"
    assert V.sanitize_text("tab\tnl\n") == "tab\tnl\n"
    out = V.safe_echo("\udfff" + "z" * 1000)
    out.encode("utf-8")  # must not raise
    assert len(out) <= 200


@pytest.mark.parametrize(
    ("text", "reward", "reason"),
    [
        ("\\boxed{4}", 1.0, "correct"),
        ("4", 0.0, "no_answer"),
        ("\\boxed{4} \\boxed{4}", 0.0, "wrong"),
        ("\\boxed{}", 0.0, "wrong"),
        ("\\boxed{4", 0.0, "wrong"),
    ],
)
def test_verify_format(text: str, reward: float, reason: str) -> None:
    v = V.verify_format(text)
    assert (v.reward, v.reason) == (reward, reason)


def test_combine_weights() -> None:
    m, f = V.Verdict(1.0, "correct", {}), V.Verdict(1.0, "correct", {})
    assert V.combine(m, f, 1.0, 0.0) == m
    c = V.combine(V.Verdict(0.0, "wrong", {}), f, 0.9, 0.1)
    assert math.isclose(c.reward, 0.1) and c.reason == "wrong" and c.details["format"] == 1.0


def test_load_and_call_custom() -> None:
    fn = V.load_custom(f"{HERE}:custom_partial")
    assert V.call_custom(fn, "p", "c", "r") == V.Verdict(0.5, "partial", {"reason": "partial"})
    assert V.call_custom(lambda *a: True, "p", "c", "r").reward == 1.0
    assert V.call_custom(lambda *a: "1", "p", "c", "r").reason.startswith("error: ")
    assert V.call_custom(lambda *a: math.inf, "p", "c", "r").reason.startswith("error: ")
    with pytest.raises(ValueError):
        V.load_custom("not a path")
    with pytest.raises(ModuleNotFoundError):
        V.load_custom("no_such_module_xyz:f")


# ---------------------------------------------------------------- labelled pairs through the sandbox

# (reference, answer inside \boxed{}): math-verify must score these 1.
EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac12", "0.5"),
    ("\\frac12", "1/2"),
    ("\\frac{1}{2}", "\\tfrac{1}{2}"),
    ("\\frac{2}{4}", "\\frac12"),
    ("0.25", "\\frac{1}{4}"),
    ("1.5", "\\frac{3}{2}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{-1}{2}", "-\\frac12"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("7", "\\sqrt{49}"),
    ("\\sqrt[3]{8}", "2"),
    ("[1,2]", "[1, 2]"),
    ("(1,2]", "(1, 2]"),
    ("(-\\infty, 3)", "(-\\infty,3)"),
    ("[0, \\infty)", "[0,\\infty)"),
    ("(1,2)\\cup(3,4)", "(3,4)\\cup(1,2)"),
    ("\\{1,2,3\\}", "\\{3,2,1\\}"),
    ("1,2,3", "\\{1,2,3\\}"),
    ("50\\%", "0.5"),  # percent_as_fraction=True
    ("50%", "0.5"),
    ("25\\%", "\\frac14"),
    ("\\frac{1}{2}", "50\\%"),
    ("1000", "1,000"),
    ("10^{3}", "1000"),
    ("2^{10}", "1024"),
    ("6", "2 \\times 3"),
    ("\\log_2 8", "3"),
    ("2", "2.0"),
    ("3.0", "3"),
    ("12", "012"),
    ("\\frac{1}{3}", "0.333333"),  # floats compare at 6 decimals
    ("\\pi", "3.14159265358979"),
    ("\\frac{\\pi}{4}", "\\dfrac{\\pi}{4}"),
    ("4\\pi", "\\pi \\cdot 4"),
    ("x^2+2x+1", "(x+1)^2"),
    ("5", "x=5"),
    ("2", "x = 2"),
    ("3", "3\\text{ cm}"),  # units are dropped
    ("90^\\circ", "90"),
    ("\\$5", "5"),
    ("A", "\\text{A}"),
    ("\\infty", "\\infty"),
    ("2+3i", "3i+2"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]

# Near misses: wrong signs, off by one, extra/missing digits, wrong interval ends, subsets...
NEAR_MISSES = [
    ("-3", "3"),
    ("\\frac{1}{2}", "-\\frac{1}{2}"),
    ("x=5", "x=-5"),
    ("19", "20"),
    ("100", "99"),
    ("101", "100"),
    ("1234", "12345"),
    ("1000", "10000"),
    ("1.5", "15"),
    ("10", "1.0"),
    ("90", "9"),
    ("12", "21"),
    ("3.14", "3.141"),
    ("0.5", "0.50001"),
    ("5", "5.1"),
    ("\\pi", "3.14"),
    ("[1,2]", "(1,2)"),
    ("[1,2]", "[1,2)"),
    ("(-\\infty,3)", "(-\\infty,3]"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("50", "0.5"),
    ("2\\sqrt{2}", "\\sqrt{2}"),
    ("\\sqrt{2}", "2"),
    ("-7", "\\sqrt{49}"),
    ("x^2+1", "(x+1)^2"),
    ("\\frac{1}{3}", "\\frac{1}{4}"),
    ("\\frac{3}{2}", "\\frac{2}{3}"),
    ("2+3i", "2-3i"),
    ("4", "2^{3}"),
    ("0.3333", "\\frac13"),  # a rounded reference does not match the exact value at 6 decimals
]

# Pairs where math-verify 0.9.0's behaviour differs from a mathematician's; pinned so a change shows.
KNOWN_LIMITS = [
    # `i` is parsed as a plain symbol, not the imaginary unit: e^{iπ} and i² are not -1 (but 2+3i
    # still equals 3i+2 symbolically). References with complex numbers need care.
    ("-1", "e^{i\\pi}", 0.0),
    ("-1", "i^2", 0.0),
    # "(1,2)" is ambiguous (open interval or a pair); math-verify lets a set {1,2} match it.
    ("(1,2)", "\\{1,2\\}", 1.0),
]


@integration_fixture(scope="module")
def sandbox() -> Sandbox:
    """The sandbox of the hostile tests: a short time limit (TIMEOUT_S) and no length cap."""
    sb = Sandbox(RewardsConfig(timeout_s=TIMEOUT_S, max_completion_chars=2_000_000)).start()
    yield sb
    sb.close()


@integration_fixture(scope="module")
def pairs_sandbox() -> Sandbox:
    """The sandbox of the labelled pairs: a limit no normal answer reaches, even on a loaded machine."""
    sb = Sandbox(RewardsConfig(timeout_s=5.0), spare=False).start()
    yield sb
    sb.close()


def test_pair_counts() -> None:
    assert len(EQUIVALENT) + len(NEAR_MISSES) >= 40


@pytest.mark.parametrize(("reference", "answer"), EQUIVALENT)
def test_equivalent_scores_one(pairs_sandbox: Sandbox, reference: str, answer: str) -> None:
    r = pairs_sandbox.run(VerifyItem(f"Thinking... so the answer is \\boxed{{{answer}}}.", reference))
    assert (r.reward, r.reason) == (1.0, "correct"), r


@pytest.mark.parametrize(("reference", "answer"), NEAR_MISSES)
def test_near_miss_scores_zero(pairs_sandbox: Sandbox, reference: str, answer: str) -> None:
    r = pairs_sandbox.run(VerifyItem(f"\\boxed{{{answer}}}", reference))
    assert (r.reward, r.reason) == (0.0, "wrong"), r


@pytest.mark.parametrize(("reference", "answer", "reward"), KNOWN_LIMITS)
def test_known_math_verify_limits(pairs_sandbox: Sandbox, reference: str, answer: str, reward: float) -> None:
    assert pairs_sandbox.run(VerifyItem(f"\\boxed{{{answer}}}", reference)).reward == reward


def test_last_box_wins_and_missing_box(pairs_sandbox: Sandbox) -> None:
    assert pairs_sandbox.run(VerifyItem("\\boxed{3} no wait \\boxed{4}", "4")).reason == "correct"
    assert pairs_sandbox.run(VerifyItem("\\boxed{4} no wait \\boxed{3}", "4")).reason == "wrong"
    assert pairs_sandbox.run(VerifyItem("the answer is 4", "4")).reason == "no_answer"
    assert pairs_sandbox.run(VerifyItem("\\boxed{4} and \\boxed{", "4")).reason == "no_answer"


@pytest.mark.integration
def test_percent_as_fraction_off() -> None:
    cfg = RewardsConfig(timeout_s=TIMEOUT_S, percent_as_fraction=False)
    with Sandbox(cfg, spare=False) as sb:
        assert sb.run(VerifyItem("\\boxed{0.5}", "50\\%")).reward == 0.0
        assert sb.run(VerifyItem("\\boxed{50}", "50\\%")).reward == 1.0
        assert sb.run(VerifyItem("\\boxed{50\\%}", "50")).reward == 1.0


@pytest.mark.integration
def test_format_weight_and_math_verify_extraction() -> None:
    cfg = RewardsConfig(timeout_s=TIMEOUT_S, math_weight=1.0, format_weight=0.25)
    with Sandbox(cfg, spare=False) as sb:
        assert sb.run(VerifyItem("\\boxed{4}", "4")).reward == 1.25
        r = sb.run(VerifyItem("\\boxed{5}", "4"))
        assert (r.reward, r.reason) == (0.25, "wrong")
        assert sb.run(VerifyItem("\\boxed{4} \\boxed{4}", "4")).reward == 1.0
        assert sb.run(VerifyItem("\\boxed{4}", "4", verifier="format")).reward == 1.0
    cfg = RewardsConfig(timeout_s=TIMEOUT_S, answer_extraction="math_verify")
    with Sandbox(cfg, spare=False) as sb:
        assert sb.run(VerifyItem("So the final answer is $\\frac{3}{4}$.", "0.75")).reason == "correct"
        assert sb.run(VerifyItem("no numbers at all", "0.75")).reason == "no_answer"


def test_input_limits_and_bad_types(sandbox: Sandbox) -> None:
    with Sandbox(RewardsConfig(timeout_s=TIMEOUT_S, max_completion_chars=100), spare=False) as sb:
        r = sb.run(VerifyItem("\\boxed{1}" + "x" * 200, "1"))
        assert r.reason == "too_long" and r.elapsed_s < 0.5 and sb.stats["restarts"] == 0
        assert sb.run(VerifyItem("\\boxed{1}", "1" * 101)).reason.startswith("error: ")
    assert sandbox.run(VerifyItem(b"\\boxed{1}\xff\xfe", "1")).reason == "correct"  # type: ignore[arg-type]
    assert sandbox.run(VerifyItem(None, "1")).reason.startswith("error: ")  # type: ignore[arg-type]
    assert sandbox.run(VerifyItem("\\boxed{1}", "1", verifier="nope")).reason.startswith("error: unknown")
    assert sandbox.run(VerifyItem("\\boxed{1}", "")).reason.startswith("error: ")


# ---------------------------------------------------------------- hostile completions

HOSTILE = {
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "power_python_syntax": "\\boxed{9**9**9**9}",
    "big_power": "\\boxed{10^{10^{10}}}",
    "mod_power_tower": "\\boxed{7^{7^{7^{7^{7}}}} \\mod 10}",
    "exp_tower": "\\boxed{e^{e^{e^{e^{e^{10}}}}}}",
    "factorial": "\\boxed{100000!}",
    "factorial_of_factorial": "\\boxed{(10!)!}",
    "triple_factorial": "\\boxed{((100!)!)!}",
    "gamma_huge": "\\boxed{\\Gamma(10^{10})}",
    "binomial_huge": "\\boxed{\\binom{10^{9}}{10^{8}}}",
    "sum_huge": "\\boxed{\\sum_{k=1}^{10^{12}} k^{k}}",
    "product_huge": "\\boxed{\\prod_{k=1}^{10^{9}} k}",
    "integral": "\\boxed{\\int_0^\\infty e^{-x^{100}} \\sin(x^{50}) dx}",
    "nested_braces": "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "nested_parens": "\\boxed{" + "(" * 60 + "1" + ")" * 60 + "}",
    "nested_brackets": "\\boxed{" + "[" * 500 + "]" * 500 + "}",
    "nested_left_right": "\\boxed{" + "\\left(" * 400 + "x" + "\\right)" * 400 + "}",
    "nested_frac": "\\boxed{" + "\\frac{1}{" * 200 + "2" + "}" * 200 + "}",
    "nested_sqrt": "\\boxed{" + "\\sqrt{" * 300 + "2" + "}" * 300 + "}",
    "continued_fraction": "\\boxed{" + "1+\\frac{1}{" * 300 + "1" + "}" * 300 + "}",
    "huge_matrix": "\\boxed{\\begin{pmatrix}" + "\\\\".join(["&".join(["1"] * 60)] * 60) + "\\end{pmatrix}}",
    "long_sum": "\\boxed{" + "+".join(["x"] * 4000) + "}",
    "megabyte_of_digits_boxed": "\\boxed{" + "7" * 1_000_000 + "}",
    "megabyte_of_digits_plain": "1" * 1_000_000,
    "unclosed_box": "The answer is \\boxed{42",
    "many_unclosed_boxes": "\\boxed{" * 5000,
    "many_boxes": "\\boxed{1} " * 3000,
    "escaped_braces": "\\boxed{\\{" * 2000 + "}",
    "backslash_flood": "\\boxed{" + "\\" * 10000 + "}",
    "dollar_flood": "$" * 10000 + "\\boxed{1}",
    "regex_bait": "The final answer is " + "1 " * 8000 + "I hope",
    "control_chars": "\\boxed{\x00\x01\x02\x1b[31m1\x7f}",
    "nul_flood": "\x00" * 10000,
    "lone_surrogates": "\\boxed{\ud800 1 \udfff}",
    "surrogate_soup": "\ud83d\ude00\ud800" * 100 + "\\boxed{1}",
    "set_builder": "\\boxed{\\{x : x > 0\\}}",
}


def test_hostile_count() -> None:
    assert len(HOSTILE) >= 30


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_completion_is_bounded(sandbox: Sandbox, name: str) -> None:
    t0 = time.perf_counter()
    r = sandbox.run(VerifyItem(HOSTILE[name], "1"))
    wall = time.perf_counter() - t0
    assert wall <= TIMEOUT_S + 1.0, (name, wall, r)
    assert valid_reason(r.reason) and math.isfinite(r.reward), r
    json.dumps({"reason": r.reason, "details": r.details}, ensure_ascii=False).encode("utf-8")
    after = sandbox.run(VerifyItem("\\boxed{\\frac{1}{2}}", "0.5"))  # the sandbox still serves
    assert after.reason == "correct", (name, r, after)


def test_timeout_kills_and_replaces_child(sandbox: Sandbox) -> None:
    before = sandbox.child_pid
    r = sandbox.run(VerifyItem(HOSTILE["power_tower"], "1"))
    assert r.reason == "timeout" and TIMEOUT_S <= r.elapsed_s <= TIMEOUT_S + 1.0
    assert sandbox.run(VerifyItem("\\boxed{2}", "2")).reason == "correct"
    assert sandbox.child_pid != before
    with pytest.raises(ProcessLookupError):
        os.kill(before, 0)  # the old child is gone, not left running in the background


# The hostile items that reach the time limit: back to back, each kill must find a ready child at once.
TIMING_OUT = [
    "power_tower",
    "nested_parens",
    "big_power",
    "mod_power_tower",
    "triple_factorial",
    "gamma_huge",
]


def test_hostile_items_back_to_back_stay_bounded(sandbox: Sandbox) -> None:
    """Issue 11, finding 10: timeouts in a row, no harmless item in between. Each kill promotes the
    spare and needs a new one at once; a spare that had to warm up from cold (seconds of imports and
    sympy warm-up) made the items after the first wait for it, past the time limit + 1 s."""
    walls = []
    for name in TIMING_OUT * 2:
        t0 = time.perf_counter()
        r = sandbox.run(VerifyItem(HOSTILE[name], "1"))
        walls.append((name, round(time.perf_counter() - t0, 3), r.reason))
    assert all(wall <= TIMEOUT_S + 1.0 for _, wall, _ in walls), walls
    assert all(reason == "timeout" for *_, reason in walls), walls
    t0 = time.perf_counter()
    after = sandbox.run(VerifyItem("\\boxed{\\frac{1}{2}}", "0.5"))
    assert after.reason == "correct" and time.perf_counter() - t0 <= TIMEOUT_S + 1.0, (after, walls)


@pytest.mark.integration
def test_verifier_children_get_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11, "Secrets": the child parses untrusted text and runs user code, so it must not hold
    the driver's tokens. Planted tokens appear neither in any sandbox process's environment (read from
    /proc) nor in what a custom verifier sees; a name listed in rewards.sandbox_env is passed on."""
    planted = {
        "RAY_AUTH_TOKEN": "ray-planted-token",
        "DUET_REWARD_TOKEN": "reward-planted-token",
        "DUET_CONTROL_TOKEN": "control-planted-token",
        "AWS_SECRET_ACCESS_KEY": "aws-planted-secret",
    }
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    cfg = RewardsConfig(timeout_s=TIMEOUT_S, custom_function=f"{HERE}:custom_environment")
    with Sandbox(cfg) as sb:
        pids = {sb.child_pid}
        with open(f"/proc/{sb.child_pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        if parent != os.getpid():  # the fork server, where there is one (the test process has the tokens)
            pids.add(parent)
        for pid in pids:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            for name, value in planted.items():
                assert name.encode() + b"=" not in environ and value.encode() not in environ, (pid, name)
        r = sb.run(VerifyItem("", "", "custom", "anything"))
        assert r.reason == "correct", r
        assert not set(planted) & set(r.details["names"]), r.details
        assert "PYTHONPATH" in r.details["names"]


@pytest.mark.integration
def test_sandbox_env_passes_chosen_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_VERIFIER_SETTING", "on")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-planted-token")
    cfg = RewardsConfig(
        timeout_s=TIMEOUT_S, custom_function=f"{HERE}:custom_environment", sandbox_env=["MY_VERIFIER_SETTING"]
    )
    with Sandbox(cfg, spare=False) as sb:
        names = sb.run(VerifyItem("", "", "custom", "anything")).details["names"]
    assert "MY_VERIFIER_SETTING" in names and "RAY_AUTH_TOKEN" not in names


# ---------------------------------------------------------------- custom functions in the child


@integration_fixture(scope="module")
def custom_sandbox() -> Sandbox:
    cfg = RewardsConfig(timeout_s=TIMEOUT_S, custom_function=CUSTOM_DISPATCH, memory_limit_mib=256)
    sb = Sandbox(cfg).start()
    yield sb
    sb.close()


@pytest.mark.parametrize(
    ("behaviour", "completion", "reward", "reason"),
    [
        ("same_length", "abc", 1.0, "correct"),
        ("same_length", "ab", 0.0, "wrong"),
        ("partial", "", 0.5, "partial"),
        ("nan", "", 0.0, "error: custom function returned nan"),
        ("raises", "", 0.0, "error: ValueError: boom"),
        ("sleeps", "", 0.0, "timeout"),
        ("hogs_memory", "", 0.0, "error: out of memory"),
        ("exits", "", 0.0, "error: verifier crashed (exit code 3)"),
        ("prints", "", 1.0, "correct"),
    ],
)
def test_custom_functions_in_sandbox(
    custom_sandbox: Sandbox, behaviour: str, completion: str, reward: float, reason: str
) -> None:
    r = custom_sandbox.run(VerifyItem(completion, "xyz", "custom", behaviour))
    assert (r.reward, r.reason) == (reward, reason), r
    after = custom_sandbox.run(VerifyItem("\\boxed{1}", "1"))  # survives whatever the function did
    assert after.reason == "correct", (behaviour, after)


def test_custom_function_gets_prompt_and_details(custom_sandbox: Sandbox) -> None:
    r = custom_sandbox.run(VerifyItem("abc", "xyz", "custom", "same_length"))
    assert r.details == {"n": 3, "prompt": "same_length"}


@pytest.mark.integration
def test_custom_function_that_does_not_import() -> None:
    cfg = RewardsConfig(timeout_s=TIMEOUT_S, custom_function="no_such_module_xyz:f")
    with Sandbox(cfg, spare=False) as sb:
        r = sb.run(VerifyItem("a", "b", "custom"))
        assert r.reason.startswith("error: custom function") and "ModuleNotFoundError" in r.reason
        assert sb.run(VerifyItem("\\boxed{1}", "1")).reason == "correct"


@pytest.mark.integration
def test_cpu_limit_kills_an_orphaned_runaway_child() -> None:
    """Without its parent's kill (parent died), a child stuck in CPU work dies by RLIMIT_CPU."""
    cfg = RewardsConfig(timeout_s=0.25, custom_function=f"{HERE}:custom_spins")
    with Sandbox(cfg, spare=False) as sb:
        child = sb._child  # driven by hand: run() would kill it at its time limit
        assert child is not None
        req = {"id": 1, "verifier": "custom", "completion": "", "reference": "", "prompt": ""}
        child.send(json.dumps(req).encode() + b"\n", time.monotonic() + 5)
        with pytest.raises(_ChildDied):  # nobody kills it: the kernel does, after ~timeout + 1 s of CPU
            child.read_line(time.monotonic() + 30.0)
        assert child.exit_code() == -signal.SIGXCPU


@pytest.mark.integration
def test_sandbox_start_fails_loudly_when_the_child_cannot_boot() -> None:
    from rewards.sandbox import SandboxError

    sb = Sandbox(RewardsConfig(), spare=False, start_timeout_s=20)
    # 8 MiB of address space: below what the interpreter already maps (config's floor is 64 MiB).
    sb._boot_line = json.dumps({"memory_limit_mib": 8, "timeout_s": 1.0, "settings": {}}).encode() + b"\n"
    with pytest.raises(SandboxError, match="did not start"):
        sb.start()
    r = sb.run(VerifyItem("\\boxed{1}", "1"))  # and run() still answers, with the reason
    assert r.reward == 0.0 and r.reason.startswith("error: sandbox unavailable")
