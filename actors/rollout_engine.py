"""RolloutEngine: one Ray actor hosting one vLLM `AsyncLLM`, with vLLM's weight-transfer API exposed.

It generates G completions per prompt (the whole group on this engine, so it stays together),
with the engine's log-prob of every sampled token and the policy version(s) that produced them, or, with an
environment (env.name != none), G episodes per prompt: model turns and tool observations, token in, token out
(envs/episodes.py runs them here, calling the ToolPool actor for the tools), and receives new weights through `init_weight_transfer_engine` / `start_weight_update` /
`update_weights` / `finish_weight_update`, driven by the learner's sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import ray

from cluster.config import EnvConfig, SamplingConfig
from cluster.records import Completion, Prompt

T = TypeVar("T")
# How often a call waiting on vLLM asks whether vLLM died meanwhile (see `_until_vllm_dies`).
DEATH_POLL_S = 0.5


def vllm_call(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An actor method that waits on vLLM's engine core: raced against vLLM's death (`_until_vllm_dies`)."""

    @functools.wraps(method)
    async def call(self: RolloutEngine, *args: Any, **kwargs: Any) -> T:
        return await self._until_vllm_dies(method(self, *args, **kwargs))

    return call


@ray.remote
class RolloutEngine:
    """A vLLM engine on its own placement-group bundle (its own GPU(s), or its own cores on CPU)."""

    def __init__(
        self,
        engine_id: int,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 256,
        tensor_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = True,
        seed: int = 0,
        weight_transfer_backend: str = "duet_host",
        initial_version: int = 0,
        gpu_memory_wait_s: float | None = None,
        lora_max_rank: int | None = None,
        adapter_path: str | None = None,
    ) -> None:
        """`gpu_memory_wait_s` (on GPUs): wait at most this long for the GPUs to have the memory vLLM asks
        before starting it (actors/gpu_memory.py); None starts vLLM at once. `lora_max_rank` (LoRA runs):
        serve the base model with vLLM's LoRA support, adapters up to this rank; the weight updates then
        carry the adapter, which every request uses once one arrived (before, the base model is version 0:
        a new adapter's B is zero). `adapter_path` (evaluation of an adapter): requests use that folder's."""
        # vLLM reads the CPU settings (threads, KV cache) from the environment, set per actor by the driver.
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from actors.weight_receiver import register

        register()
        # vLLM's layerwise reload allocates every layer afresh on each weight update (and on CPU its GEMM
        # re-packs the weights): with 4 KiB pages the first touch of that memory costs more than the
        # transfer itself (1.2 vs 5 GB/s measured). PyTorch's CPU allocator then asks for huge pages.
        # vLLM's processes are spawned from here and inherit it.
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        self.engine_id = engine_id
        self.version = initial_version
        self.node = ray.util.get_node_ip_address()
        self.in_flight = 0
        self.update_active = False  # between start_weight_update and finish_weight_update
        # One transfer-control call at a time, in the order they came: a reconnect's shutdown, queued in
        # vLLM behind a broken-off update, must not run after the init that follows it.
        self.transfer_lock = asyncio.Lock()
        self.paused_for_update = False  # the scheduler was paused for it (requests were in flight)
        self.update_pauses = 0  # updates that had to pause the scheduler (reported by ready())
        self.update_timing: dict[str, float] = {}  # the last apply_weight_update, by phase
        self.hold_inside_update: asyncio.Event | None = None  # fault injection (hold_next_update)
        self.update_done = asyncio.Event()  # set while no update is open: new requests may start
        self.update_done.set()
        self.vllm_error: str | None = None  # set when vLLM's own processes died under this actor
        self.active_requests = 0  # vLLM requests added and not finished
        self.busy_s = 0.0  # wall time with at least one request in vLLM (the benchmarks' busy fraction)
        self._busy_since = 0.0
        self.lora = lora_max_rank is not None
        self.lora_request = None  # the adapter every request uses (LoRA runs, once one was received)
        if adapter_path is not None:
            from vllm.lora.request import LoRARequest

            from learner.lora import ENGINE_LORA_ID, ENGINE_LORA_NAME

            self.lora_request = LoRARequest(ENGINE_LORA_NAME, ENGINE_LORA_ID, adapter_path)
        lora_args = {}
        if self.lora:
            # One adapter, replaced in place after every step: one GPU slot and one CPU cache entry.
            lora_args = {
                "enable_lora": True,
                "max_lora_rank": lora_max_rank,
                "max_loras": 1,
                "max_cpu_loras": 1,
            }
        args = AsyncEngineArgs(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            # "mp" for tensor parallel (cluster/placement.py says why not vLLM's Ray executor).
            distributed_executor_backend=distributed_executor_backend,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            # The learner recomputes log-probs of the tempered distribution, so compare like with like.
            logprobs_mode="processed_logprobs",
            weight_transfer_config={"backend": weight_transfer_backend},
            worker_extension_cls="actors.weight_receiver.DigestWorkerExtension",
            disable_log_stats=True,
            # A prefix cached under old weights must not serve a request after a weight update.
            enable_prefix_caching=False,
            **lora_args,
        )
        if gpu_memory_wait_s is not None:
            # An engine killed on these GPUs may still hold their memory (it is given back some time after the
            # kill), and vLLM refuses to start short of it: wait for what vLLM's own start-up check asks.
            from actors.gpu_memory import nvml_reader, wait_for_gpu_memory

            wait_for_gpu_memory(
                nvml_reader(tensor_parallel_size),
                gpu_memory_utilization,
                gpu_memory_wait_s,
                label=f"RolloutEngine {engine_id}",
            )
        self.engine = AsyncLLM.from_engine_args(args)

    def __repr__(self) -> str:  # the Ray dashboard's Repr column: Ray takes it once, after __init__
        return f"RolloutEngine(engine {self.engine_id}, started at version {self.version}, node {self.node})"

    def ready(self) -> dict:
        return {
            "engine_id": self.engine_id,
            "pid": os.getpid(),
            "version": self.version,
            "update_pauses": self.update_pauses,
            "update_timing": self.update_timing,
            "node": ray.get_runtime_context().get_node_id(),
        }

    def alive(self) -> bool:
        """Whether this engine can still generate: the actor answers, and so do vLLM's processes under it.
        A SIGKILLed `VLLM::Worker` or `VLLM::EngineCore` (a CUDA error, an out-of-memory kill) leaves the
        actor alive but every call failing with EngineDeadError: the driver replaces such an engine."""
        return self.vllm_error is None and not self.engine.errored

    async def health(self, probe_s: float = 0.0) -> str | None:
        """None when this engine can generate, else what is wrong with it. `probe_s` > 0: also ask vLLM's
        engine core for an answer within `probe_s` (a round trip it makes between scheduler steps), to find
        a core that lives but hangs (stopped, stuck in a collective) under a live actor. Only for when no
        weight update is in flight: a core receiving weights answers after the transfer."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.alive():
            return "vLLM died"
        if probe_s > 0:
            try:
                # Raced against death too: a core killed while the probe waits is dead, not hung.
                await asyncio.wait_for(self._until_vllm_dies(self.engine.is_paused()), probe_s)
            except EngineDeadError:
                return "vLLM died"
            except TimeoutError:
                return (
                    "vLLM died"
                    if not self.alive()
                    else f"vLLM hung: its engine core gave no answer in {probe_s:g} s"
                )
        return None

    async def _until_vllm_dies(self, call: Awaitable[T]) -> T:
        """Await `call`; if vLLM dies meanwhile, raise EngineDeadError within DEATH_POLL_S, and remember it
        (`alive()` answers False from then on).

        Written by hand because vLLM 0.32 fails a dead engine core's request queues but not its utility calls
        (`pause_generation`, `resume_generation`, `collective_rpc`, the weight-transfer calls): their futures
        (`core_client.py: utility_results`) wait for a reply that never comes. A core killed while one was
        pending left this actor, and the driver's wait on it, hanging with no error.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        task = asyncio.ensure_future(call)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DEATH_POLL_S)
                if not task.done() and self.engine.errored:
                    raise EngineDeadError("vLLM died while this call waited on it", suppress_context=True)
            return task.result()
        except BaseException as e:
            if isinstance(e, EngineDeadError) or self.engine.errored:
                self.vllm_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            if not task.done():
                task.cancel()

    @vllm_call
    async def generate(
        self,
        prompts: list[Prompt],
        group_size: int,
        sampling: SamplingConfig,
        deterministic: bool = False,
        seed: int | None = None,
        env: EnvConfig | None = None,
        tools: Any = None,
    ) -> list[list[Completion]]:
        """G completions for each prompt; returns one list (a group) per prompt, in order.

        `deterministic`: hold the scheduler while the whole batch is added and the sampler is reseeded with
        `seed`, so the engine schedules it as one batch whatever the arrival timing and samples it from a
        known generator state: the same weights and prompts then give the same tokens (what makes a
        resumed run retrace its original).

        `env` and `tools` (the ToolPool actor): G episodes per prompt instead (envs/episodes.py), in
        lock-step rounds when `deterministic` (each round reseeded from `seed` and the round), else each
        episode on its own.
        """
        if env is not None:
            return await self._episodes(prompts, group_size, sampling, deterministic, seed, env, tools)
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # FINAL_ONLY: a streamed output with n > 1 carries only the children that changed.
        # No per-request seed: it kills the CPU engine (ENVIRONMENT.md).
        params = SamplingParams(
            n=group_size, logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY, **sampling.model_dump()
        )
        while self.update_active:  # an update skipped the pause (the engine was idle): wait it out
            await self.update_done.wait()
        self.in_flight += len(prompts)
        version_start = self.version
        try:
            finals = await self._generate(prompts, params, deterministic, seed)
        finally:
            self.in_flight -= len(prompts)
        groups = [self._group(p, out, version_start) for p, out in zip(prompts, finals)]
        if any(len(g) != group_size for g in groups):
            raise RuntimeError(f"a group came back with fewer than {group_size} completions")
        return groups

    async def _generate(self, prompts: list[Prompt], params, deterministic: bool, seed: int | None) -> list:
        if deterministic:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            queues = [
                await self.engine.add_request(
                    uuid.uuid4().hex, p.text, params, lora_request=self.lora_request
                )
                for p in prompts
            ]
            if deterministic and seed is not None:
                await self.engine.collective_rpc("duet_reseed", args=(seed,))
        finally:
            if deterministic:
                await self.engine.resume_generation()
        return await asyncio.gather(*(self._final(q) for q in queues))

    async def _final(self, queue):
        self._request_started()
        try:
            while True:
                out = queue.get_nowait() or await queue.get()
                if out.finished:
                    return out
        finally:
            self._request_ended()

    def _request_started(self) -> None:
        if self.active_requests == 0:
            self._busy_since = time.perf_counter()
        self.active_requests += 1

    def _request_ended(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0:
            self.busy_s += time.perf_counter() - self._busy_since

    def busy_seconds(self) -> float:
        """Wall time so far with at least one request in vLLM (model time, not tool waits)."""
        now = time.perf_counter() - self._busy_since if self.active_requests else 0.0
        return self.busy_s + now

    # ---- episodes (env.name != none) ----
    async def _episodes(
        self,
        prompts: list[Prompt],
        group_size: int,
        sampling: SamplingConfig,
        deterministic: bool,
        seed: int | None,
        env: EnvConfig,
        tools: Any,
    ) -> list[list[Completion]]:
        from envs.episodes import EpisodeRunner, Tools

        call_end = self._single_token(env.call_end_token)
        pool = Tools(
            start=lambda ps: tools.start.remote(ps),
            step=lambda items: tools.step.remote(items),
            score=lambda items: tools.score.remote(items),
        )
        runner = EpisodeRunner(_EngineSampler(self), pool, env, call_end, self.engine_id)
        self.in_flight += len(prompts)
        try:
            return await runner.run(prompts, group_size, sampling, seed if deterministic else None)
        finally:
            self.in_flight -= len(prompts)

    def _single_token(self, token: str) -> int:
        ids = self.engine.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"env.call_end_token {token!r} is {len(ids)} tokens of this model's tokenizer, not one: a "
                "turn ends on a stop token id; name a token of its vocabulary (e.g. Qwen's </tool_call>)"
            )
        return ids[0]

    async def _sample_turns(self, requests: list, sampling: SamplingConfig, stop_token_ids: list[int], seed):
        """One turn per request (envs.episodes.TurnRequest: the episode's token ids so far, its token
        budget), as TokensPrompts: the episode is never decoded and re-encoded. `seed`: added as one batch
        to the held scheduler, then reseeded, as `generate` does for a deterministic batch."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from envs.episodes import TurnOutput

        base = sampling.model_dump()
        while self.update_active:  # an update skipped the pause (the engine was idle): wait it out
            await self.update_done.wait()
        if seed is not None:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
        try:
            queues = []
            for r in requests:
                params = SamplingParams(
                    **{**base, "max_tokens": r.max_tokens},
                    n=1,
                    logprobs=0,
                    stop_token_ids=stop_token_ids,
                    include_stop_str_in_output=True,  # the turn's text as written, `</call>` included
                    output_kind=RequestOutputKind.FINAL_ONLY,
                )
                prompt = TokensPrompt(prompt_token_ids=r.token_ids)
                queues.append(
                    await self.engine.add_request(
                        uuid.uuid4().hex, prompt, params, lora_request=self.lora_request
                    )
                )
            if seed is not None:
                await self.engine.collective_rpc("duet_reseed", args=(seed,))
        finally:
            if seed is not None:
                await self.engine.resume_generation()
        finals = await asyncio.gather(*(self._final(q) for q in queues))
        outs = []
        for final in finals:
            c = final.outputs[0]
            lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs)]
            outs.append(TurnOutput(list(c.token_ids), lps, c.text, c.finish_reason or "abort"))
        return outs

    def _group(self, prompt: Prompt, final, version_start: int) -> list[Completion]:
        group = []
        for c in final.outputs:
            lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs)]
            group.append(
                Completion(
                    prompt_index=prompt.index,
                    prompt_token_ids=list(final.prompt_token_ids),
                    token_ids=list(c.token_ids),
                    logprobs=lps,
                    text=c.text,
                    finish_reason=c.finish_reason or "abort",
                    version_start=version_start,
                    version_end=self.version,
                    engine_id=self.engine_id,
                )
            )
        return group

    def load(self) -> int:
        """Prompts in flight: the driver sends new work to the least-loaded engine."""
        return self.in_flight

    # ---- vLLM's weight-transfer API, as the learner's sender drives it ----
    @vllm_call
    async def init_weight_transfer_engine(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        async with self.transfer_lock:
            await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    @vllm_call
    async def start_weight_update(self) -> None:
        async with self.transfer_lock:
            await self._start_weight_update()

    async def _start_weight_update(self) -> None:
        if self.update_active:
            # A broadcast broke off (another engine died) with this engine inside its update. vLLM
            # reloads layer by layer, and the layers whose weights all arrived are already processed:
            # loading into them again fails. So close that update (layers that got nothing keep their
            # old tensors) and open a fresh one; the driver's re-broadcast then sends every weight.
            with contextlib.suppress(Exception):  # the worker may have closed it on a failed receive
                await self.engine.finish_weight_update()
            await self.engine.start_weight_update()
            return
        # No await between the check of in_flight and closing the gate: generate() cannot slip in.
        self.update_active = True
        self.update_done.clear()
        self.paused_for_update = self.in_flight > 0
        if self.paused_for_update:
            self.update_pauses += 1
            # "keep": requests in flight stay where they are and continue under the new weights after
            # the transfer (their completions record both versions). An idle engine needs no pause
            # (it costs two engine RPCs and a 20 ms sleep in vLLM): the gate above holds new requests.
            await self.engine.pause_generation(mode="keep", clear_cache=False)
        await self.engine.start_weight_update()

    @vllm_call
    async def update_weights(self, update_info: dict) -> None:
        async with self.transfer_lock:
            await self._update_weights(update_info)

    async def _update_weights(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    @vllm_call
    async def finish_weight_update(self, weight_version: str | None = None) -> None:
        async with self.transfer_lock:
            await self._finish_weight_update(weight_version)

    async def _finish_weight_update(self, weight_version: str | None = None) -> None:
        # vLLM stamps the version before generation resumes: no completion ends under the new
        # weights with the old version number.
        await self.engine.finish_weight_update(weight_version=weight_version)
        if self.lora:
            await self._load_adapter(weight_version)
        if weight_version is not None:
            self.version = int(weight_version)
        self._end_update()
        if self.paused_for_update:
            self.paused_for_update = False
            await self.engine.resume_generation()

    async def _load_adapter(self, weight_version: str | None) -> None:
        """LoRA runs: every worker writes the adapter it received on its node and loads it in place of the
        last (actors.weight_receiver.duet_load_adapter); requests use it from here on. vLLM's
        finish_weight_update dropped the old one, and the update gate still holds new requests."""
        from vllm.lora.request import LoRARequest

        from learner.lora import ENGINE_LORA_ID, ENGINE_LORA_NAME

        loaded = await self.engine.collective_rpc(
            "duet_load_adapter", args=(weight_version or str(self.version),)
        )
        # Any worker's folder holds the same adapter: vLLM reads this path only if it must load it again.
        self.lora_request = LoRARequest(ENGINE_LORA_NAME, ENGINE_LORA_ID, loaded[0]["path"])

    def _end_update(self) -> None:
        self.update_active = False
        self.update_done.set()

    @vllm_call
    async def apply_weight_update(self, update_info: dict, weight_version: str | None) -> None:
        """A whole update in one actor call (start, receive while the learner broadcasts, finish), so an
        update costs one round trip per engine. If the receive fails the update stays open (the next
        start closes it) and the engine holds new requests until a broadcast completes."""
        async with self.transfer_lock:
            t0 = time.perf_counter()
            await self._start_weight_update()
            t1 = time.perf_counter()
            await self._update_weights(update_info)
            t2 = time.perf_counter()
            if self.hold_inside_update is not None:  # fault injection: stay here until the run is killed
                self.hold_inside_update.set()
                await asyncio.Event().wait()
            await self._finish_weight_update(weight_version)
        self.update_timing = {"start_s": t1 - t0, "update_s": t2 - t1, "finish_s": time.perf_counter() - t2}

    def hold_next_update(self) -> None:
        """Fault injection (cluster/faults.py, `broadcast.mid`): the next weight update stops inside itself,
        its bytes received and loaded by vLLM, before it is finished (version not stamped, reload not
        finalised), and stays there; `held_inside_update` answers once it does."""
        self.hold_inside_update = asyncio.Event()

    async def held_inside_update(self) -> str:
        await self.hold_inside_update.wait()
        return f"engine {self.engine_id} inside its weight update: bytes received and loaded, not finished"

    @vllm_call
    async def shutdown_weight_transfer_engine(self) -> None:
        """Release this engine's side of the transfer group (vLLM refuses inside an open update, so a
        broken-off one is closed first). The engine keeps holding requests if that update broke off:
        its weights are half new until the reconnected learner sends them whole."""
        async with self.transfer_lock:
            if self.update_active:
                with contextlib.suppress(Exception):
                    await self.engine.finish_weight_update()
            await self.engine.shutdown_weight_transfer_engine()

    @vllm_call
    async def transport_floor(self, nbytes: int, reps: int) -> None:
        """Receive side of the learner's floor measurement over the same transfer group."""
        await self.engine.collective_rpc("duet_transport_floor", args=(nbytes, reps))

    @vllm_call
    async def load_floor(self, update_info: dict, reps: int) -> list[list[float]]:
        """Per worker: seconds of vLLM's own reload of the last update's bytes from memory (benchmarks)."""
        async with self.transfer_lock:
            return await self.engine.collective_rpc("duet_load_floor", args=(update_info, reps))

    @vllm_call
    async def transfer_stats(self) -> list[dict]:
        """Per worker: timings of the last update, and the transfer groups it opened and closed."""
        return await self.engine.collective_rpc("duet_transfer_stats")

    @vllm_call
    async def weight_version(self) -> int:
        reported = await self.engine.get_weight_version()
        return int(reported) if str(reported).isdigit() else self.version

    @vllm_call
    async def received_digest(self) -> list[str | None]:
        """sha256 of the bytes each worker received in the last update (one per TP rank)."""
        return await self.engine.collective_rpc("duet_received_digest")

    @vllm_call
    async def weight_checksums(self) -> list[dict[str, str]]:
        """vLLM's own per-parameter sha256, in its fused layout: comparable between engines."""
        return await self.engine.compute_weight_checksums()

    @vllm_call
    async def pause(self, mode: str = "keep") -> None:
        await self.engine.pause_generation(mode=mode, clear_cache=False)

    @vllm_call
    async def resume(self) -> None:
        await self.engine.resume_generation()

    def shutdown(self) -> None:
        # vLLM's default grace is 5 s, and its CPU engine core does not exit on SIGTERM within it: every run's
        # end waited the 5 s and then killed it anyway. The run is over: 1 s, then vLLM kills the tree.
        self.engine.shutdown(timeout=1.0)


class _EngineSampler:
    """The engine as envs.episodes.Sampler: vLLM's turns, its tokenizer, its policy version."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer

    async def sample(self, requests, sampling, stop_token_ids, seed):
        return await self.engine._sample_turns(requests, sampling, stop_token_ids, seed)

    def encode(self, text: str, prompt: bool = False) -> list[int]:
        # A prompt as vLLM tokenizes a text prompt (special tokens added); an observation as it is.
        return list(self.tokenizer.encode(text, add_special_tokens=prompt))

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def version(self) -> int:
        return self.engine.version
