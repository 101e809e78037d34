"""Live metrics through Ray's metrics system (`ray.util.metrics`): Prometheus on every node's metrics
export port, Grafana through the Ray dashboard. metrics.jsonl stays the record of a run; this is the
view of a running one.

Every metric is named `duet_*` (Prometheus shows Ray's `ray_` prefix in front) and tagged with
`run=<run name>`, so runs sharing a cluster stay apart.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]


class Telemetry:
    """Create once in the driver after `ray.init`; call `record_step` once per optimizer step.

    With `enabled=False` (config `run.ray_metrics: false`) every call is a no-op. A failure to record
    is logged once and never reaches the training loop: metrics must not stop a run.
    """

    def __init__(self, run_name: str, enabled: bool = True) -> None:
        self.tags = {"run": run_name}
        self.enabled = enabled
        self._warned = False
        self._last_queue: dict[str, int] = {}
        if not enabled:
            return
        try:
            self._make()
        except Exception as e:  # e.g. Ray not initialised: run without live metrics
            self._fail(e)

    def _make(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        run = ("run",)

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            g = Gauge(f"duet_{name}", doc, tag_keys=run + extra)
            g.set_default_tags(self.tags)
            return g

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            c = Counter(f"duet_{name}", doc, tag_keys=run + extra)
            c.set_default_tags(self.tags)
            return c

        def seconds(name: str, doc: str) -> Histogram:
            h = Histogram(f"duet_{name}", doc, boundaries=_SECONDS, tag_keys=run)
            h.set_default_tags(self.tags)
            return h

        self.step = gauge("step", "Optimizer steps done.")
        self.reward_mean = gauge("reward_mean", "Mean reward of the step's rollouts.")
        self.rollouts_per_s = gauge("rollouts_per_second", "Completions per second of step time.")
        self.tokens_per_s = gauge("tokens_per_second", "Generated tokens per second of step time.")
        self.rollouts = counter("rollouts", "Completions generated.")
        self.tokens = counter("tokens_generated", "Tokens generated.")
        self.queue_depth = gauge("queue_depth", "Scored groups waiting in the ReplayQueue.")
        self.dropped = counter("groups_dropped", "Groups dropped before the learner, by reason.", ("reason",))
        self.staleness = gauge("staleness_versions", "Mean policy versions behind of the consumed data.")
        self.learner_version = gauge("learner_policy_version", "Policy version of the learner.")
        self.engine_version = gauge("policy_version", "Policy version loaded in each engine.", ("engine",))
        self.engines = gauge("engines", "Rollout engines serving.")
        self.tool_calls = counter("tool_calls", "Tool calls made by episodes (env.name != none).")
        self.tool_errors = counter("tool_errors", "Tool calls whose observation reports an error.")
        self.episode_turns = gauge("episode_turns", "Mean model turns per episode of the step.")
        # Times twice: histograms for distributions, gauges for the exact last value (Ray 2.60 rebuilds a
        # histogram's _sum from bucket midpoints, so rate(_sum)/rate(_count) is only approximate).
        self.times = {
            key: (seconds(f"{name}_seconds", doc), gauge(f"last_{name}_seconds", doc + " Last step."))
            for key, name, doc in (
                ("time/step_s", "step", "Wall time per optimizer step."),
                ("time/broadcast_s", "broadcast", "Weight broadcast time per step."),
                ("time/train_s", "learner_step", "Learner time per step (forward, backward, update)."),
            )
        }

    def _fail(self, e: Exception) -> None:
        if not self._warned:
            log.warning("Ray metrics off for this run: %s", e)
            self._warned = True
        self.enabled = False

    def record_step(self, metrics: dict, engine_versions: dict[int, int], queue_stats: dict) -> None:
        """`metrics`: the step's metrics.jsonl record; `engine_versions`: engine index -> version;
        `queue_stats`: the ReplayQueue's cumulative counts (put, taken, dropped_tied, dropped_stale)
        and its depth."""
        if not self.enabled:
            return
        try:
            self._record(metrics, engine_versions, queue_stats)
        except Exception as e:
            self._fail(e)

    def _record(self, m: dict, engine_versions: dict[int, int], queue_stats: dict) -> None:
        step_s = float(m.get("time/step_s") or 0.0)
        rollouts, tokens = m.get("rollouts", 0), m.get("tokens/generated", 0)
        if "step" in m:
            self.step.set(m["step"])
        if "reward/mean" in m:
            self.reward_mean.set(m["reward/mean"])
        if step_s > 0:
            self.rollouts_per_s.set(rollouts / step_s)
            self.tokens_per_s.set(tokens / step_s)
        _inc(self.rollouts, rollouts)
        _inc(self.tokens, tokens)
        if "episodes/turns_mean" in m:  # a run with an environment
            _inc(self.tool_calls, m["tools/calls"])
            _inc(self.tool_errors, m["tools/errors"])
            self.episode_turns.set(m["episodes/turns_mean"])
        for key, (histogram, last) in self.times.items():
            if m.get(key) is not None:
                histogram.observe(m[key])
                last.set(m[key])
        if m.get("staleness/mean") is not None:
            self.staleness.set(m["staleness/mean"])
        if "policy_version" in m:
            self.learner_version.set(m["policy_version"])
        for engine, version in engine_versions.items():
            if version is not None:  # None: the engine died since the step; the next step replaces it
                self.engine_version.set(version, tags={"engine": str(engine)})
        self.engines.set(len(engine_versions))
        if "depth" in queue_stats:
            self.queue_depth.set(queue_stats["depth"])
        # The queue's counts are cumulative; Prometheus counters want increments.
        for reason in ("tied", "stale"):
            key = f"dropped_{reason}"
            if key in queue_stats:
                now, before = queue_stats[key], self._last_queue.get(key, 0)
                _inc(self.dropped, now - before if now >= before else now, {"reason": reason})
                self._last_queue[key] = now


def _inc(counter, value: float, tags: dict[str, str] | None = None) -> None:
    if value > 0:  # Ray's Counter rejects 0
        counter.inc(value, tags=tags)
