"""The watchdog: stops a run that cannot learn instead of letting it burn its budget in silence.

Two signs, each counted over consecutive steps:
- most rewards are verifier errors (reason `error: ...`): a misconfigured verifier (a custom function that
  raises, a remote server that refuses the token or cannot be reached);
- every group tied: no gradient at all (the model never, or always, solves the problems; an answer
  format the verifier does not read; a reward that is constant).
A step without the sign resets its count. `watchdog.error_steps` (or `watchdog.tied_steps`) in a row stop
the run with the likely cause.
"""

from __future__ import annotations

from cluster.config import WatchdogConfig


def error_share(metrics: dict) -> float:
    """The share of the step's rewards whose reason is `error: ...` (metrics.jsonl's reward/reason/*)."""
    reasons = {k: v for k, v in metrics.items() if k.startswith("reward/reason/")}
    total = sum(reasons.values())
    return reasons.get("reward/reason/error", 0) / total if total else 0.0


class Watchdog:
    def __init__(self, cfg: WatchdogConfig) -> None:
        self.cfg = cfg
        self.error_steps = 0
        self.tied_steps = 0

    def observe(self, metrics: dict) -> str | None:
        """Count the step's signs; returns why the run should stop, or None."""
        if not self.cfg.enabled:
            return None
        errors = error_share(metrics)
        self.error_steps = self.error_steps + 1 if errors > self.cfg.error_fraction else 0
        total = metrics.get("groups/total", 0)
        all_tied = total > 0 and metrics.get("groups/with_signal", 0) == 0
        self.tied_steps = self.tied_steps + 1 if all_tied else 0
        if self.error_steps >= (n := self.cfg.error_steps):
            return (
                f"{errors:.0%} of the rewards were verifier errors for {n} steps in a row: the verifier is "
                "misconfigured (rewards.verifier; for custom: rewards.custom_function raises; for remote: "
                "rewards.remote_url unreachable or rewards.remote_token refused). Check the reasons "
                "(reward/reason/*) in metrics.jsonl"
            )
        if self.tied_steps >= (n := self.cfg.tied_steps):
            mean = metrics.get("reward/mean", 0.0)
            return (
                f"every group tied (all its completions got the same reward, mean reward {mean:.3f}) for {n} "
                "steps in a row: no gradient. Likely: the answers are never (or always) right, or the "
                "verifier cannot read them (answer format vs rewards.answer_extraction, "
                "data.prompt_template); try easier data, a format reward (rewards.format_weight), or "
                "raise watchdog.tied_steps"
            )
        return None

    def state(self) -> dict:
        return {"error_steps": self.error_steps, "tied_steps": self.tied_steps}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.error_steps = int(state.get("error_steps", 0))
            self.tied_steps = int(state.get("tied_steps", 0))
