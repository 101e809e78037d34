"""Episodes as the engine runs them: model turn → tool call → observation → model turn ..., token in, token out.

    prompt ids ─► model turn (ids and log-probs exactly as sampled; ends on the call token, EOS or a limit)
                   │ a call: the turn's text ─► ToolPool.step ─► observation text
                   ▼
               observation ids (tokenized once, cut to env.max_observation_tokens) appended, loss mask 0
                   └─► next model turn, on the token ids so far (never decoded and re-encoded)

`EpisodeRunner` is the loop; the engine gives it a `Sampler` (vLLM) and the pool's calls (`Tools`), so its
logic is tested in the fast tier on stand-ins. Two schedules:
- lock-step (synchronous training: reproducible): the chunk's live episodes advance in rounds, each round one
  batched sampler call with the seed of (the chunk's seed, the round), then one batched tool call;
- independent (asynchronous training, evaluation): each episode goes on by itself, so one waiting for its tool
  never holds the others, and the engine batches whatever turns are ready.
An episode records the policy version at the start of each turn; its `version_start` is the oldest (the
staleness bound uses it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from cluster.config import EnvConfig, SamplingConfig
from cluster.records import Completion, Prompt
from envs.base import ToolResult

# The seed of round r of a lock-step chunk whose seed is s: s + r * ROUND_SEED_STRIDE.
ROUND_SEED_STRIDE = 1_000_033


@dataclass
class TurnRequest:
    token_ids: list[int]  # the episode so far: prompt, model turns, observations
    max_tokens: int


@dataclass
class TurnOutput:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # stop | length | abort


class Sampler(Protocol):
    """What the runner needs from the engine."""

    async def sample(
        self,
        requests: list[TurnRequest],
        sampling: SamplingConfig,
        stop_token_ids: list[int],
        seed: int | None,
    ) -> list[TurnOutput]:
        """One turn per request, with the sampled tokens' log-probs. `seed` (lock-step): schedule the requests
        as one batch from a sampler reseeded with it."""
        ...

    def encode(self, text: str, prompt: bool = False) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def version(self) -> int: ...


@dataclass
class Tools:
    """The tool pool's three calls, as awaitables (the engine wraps the actor's `.remote`)."""

    start: Callable[[list[Prompt]], Awaitable[list[dict]]]
    step: Callable[[list[tuple[dict, str]]], Awaitable[list[ToolResult]]]
    score: Callable[[list[tuple[dict, str, Prompt]]], Awaitable[list[float | None]]]


@dataclass
class _Episode:
    prompt: Prompt
    prompt_ids: list[int]
    state: dict
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)  # turn and observation texts, for Completion.text
    answer: str = ""
    turn_versions: list[int] = field(default_factory=list)
    version_end: int = 0
    finish: str | None = None
    calls: int = 0
    errors: int = 0
    tool_s: float = 0.0
    model_wait_s: float = 0.0
    tool_wait_s: float = 0.0
    pending_call: str | None = None  # the text of a turn that called the tool, until its observation

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.ids)


class EpisodeRunner:
    """Runs G episodes of each prompt (see the module docstring); `run` returns one group per prompt."""

    def __init__(self, sampler: Sampler, tools: Tools, env: EnvConfig, call_end_id: int, engine_id: int = 0):
        self.sampler, self.tools, self.env = sampler, tools, env
        self.call_end_id, self.engine_id = call_end_id, engine_id

    async def run(
        self, prompts: list[Prompt], group_size: int, sampling: SamplingConfig, seed: int | None = None
    ) -> list[list[Completion]]:
        """`seed` given: lock-step rounds (reproducible); None: episodes independent."""
        starts = [p for p in prompts for _ in range(group_size)]
        states = await self.tools.start(starts)
        episodes = [_Episode(p, self.sampler.encode(p.text, prompt=True), s) for p, s in zip(starts, states)]
        if seed is None:
            await asyncio.gather(*(self._alone(ep, sampling) for ep in episodes))
        else:
            await self._lock_step(episodes, sampling, seed)
        rewards = await self.tools.score([(ep.state, ep.answer, ep.prompt) for ep in episodes])
        done = [self._completion(ep, r) for ep, r in zip(episodes, rewards)]
        return [done[i : i + group_size] for i in range(0, len(done), group_size)]

    async def _lock_step(self, episodes: list[_Episode], sampling: SamplingConfig, seed: int) -> None:
        for round_ in range(self.env.max_turns):
            live = [ep for ep in episodes if ep.finish is None and self._room(ep, sampling) > 0]
            for ep in episodes:
                if ep.finish is None and ep not in live:
                    ep.finish = "length"
            if not live:
                return
            await self._turns(live, sampling, seed + round_ * ROUND_SEED_STRIDE)
            calling = [ep for ep in live if ep.pending_call is not None]
            if calling:
                await self._calls(calling)

    async def _alone(self, ep: _Episode, sampling: SamplingConfig) -> None:
        while ep.finish is None:
            if self._room(ep, sampling) <= 0:
                ep.finish = "length"
                return
            await self._turns([ep], sampling, None)
            if ep.pending_call is not None:
                await self._calls([ep])

    def _room(self, ep: _Episode, sampling: SamplingConfig) -> int:
        """Tokens the next turn may take: the turn limit, within the episode's total."""
        assert self.env.max_total_tokens is not None  # filled in when the config is loaded
        return min(sampling.max_tokens, self.env.max_total_tokens - ep.length)

    async def _turns(self, live: list[_Episode], sampling: SamplingConfig, seed: int | None) -> None:
        """One model turn for each of `live`, in one sampler call."""
        requests = []
        for ep in live:
            ep.turn_versions.append(self.sampler.version())
            requests.append(TurnRequest(ep.prompt_ids + ep.ids, self._room(ep, sampling)))
        t0 = time.perf_counter()
        outs = await self.sampler.sample(requests, sampling, [self.call_end_id], seed)
        waited = time.perf_counter() - t0
        version = self.sampler.version()
        for ep, out in zip(live, outs, strict=True):
            ep.model_wait_s += waited
            ep.version_end = version
            ep.ids += out.token_ids
            ep.logprobs += out.logprobs
            ep.mask += [1] * len(out.token_ids)
            ep.pieces.append(out.text)
            ep.answer = out.text
            called = out.finish_reason == "stop" and out.token_ids[-1:] == [self.call_end_id]
            if not called:
                ep.finish = out.finish_reason  # end-of-sequence (stop), a limit (length), or abort
            elif len(ep.turn_versions) >= self.env.max_turns:
                ep.finish = "length"  # it calls, but it has no turn left to read the answer
            else:
                ep.pending_call = out.text

    async def _calls(self, calling: list[_Episode]) -> None:
        """The tool calls of `calling`, in one pool call; their observations appended as tokens."""
        t0 = time.perf_counter()
        results = await self.tools.step([(ep.state, ep.pending_call or "") for ep in calling])
        waited = time.perf_counter() - t0
        for ep, res in zip(calling, results, strict=True):
            ep.pending_call = None
            ep.state = res.state
            ep.calls += 1
            ep.errors += int(res.error)
            ep.tool_s += res.elapsed_s
            ep.tool_wait_s += waited
            obs = self.sampler.encode(res.observation)[: self.env.max_observation_tokens]
            room = self.env.max_total_tokens - ep.length  # type: ignore[operator]
            cut = len(obs) >= room
            obs = obs[: max(room, 0)]
            ep.ids += obs
            ep.logprobs += [0.0] * len(obs)
            ep.mask += [0] * len(obs)
            ep.pieces.append(self.sampler.decode(obs))  # shown text only: the tokens above are what counts
            if cut:
                ep.finish = "length"
            elif res.done:
                ep.finish = "stop"

    def _completion(self, ep: _Episode, reward: float | None) -> Completion:
        return Completion(
            prompt_index=ep.prompt.index,
            prompt_token_ids=ep.prompt_ids,
            token_ids=ep.ids,
            logprobs=ep.logprobs,
            text="".join(ep.pieces),
            finish_reason=ep.finish or "length",
            version_start=ep.turn_versions[0] if ep.turn_versions else self.sampler.version(),
            version_end=ep.version_end,
            engine_id=self.engine_id,
            loss_mask=ep.mask,
            answer=ep.answer,
            env_reward=reward,
            turns=len(ep.turn_versions),
            turn_versions=ep.turn_versions,
            tool_calls=ep.calls,
            tool_errors=ep.errors,
            tool_time_s=ep.tool_s,
            model_wait_s=ep.model_wait_s,
            tool_wait_s=ep.tool_wait_s,
        )
