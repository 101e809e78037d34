"""Ready for the first GPU cluster (issue 22): the parts of its GPU-path findings a CPU can prove.

Items 3 and 5-8, each in its own section (item 1 is tests/test_node_loss_at_start.py):
- 5: bf16/fp16 gradients are summed in float32 over a step's micro-batches (DeepSpeed's
  data_types.grad_accum_dtype), against the exact sum of each micro-batch's gradient;
- 6: `duet eval` plans from the cluster's resources, as `duet train` does, not from the driver's torch;
- 7: a ZeRO-3 learner loads the model partitioned (zero.Init, after the process group exists), and exports
  it shard by shard from rank 0 without a full state dict on every rank;
- 8: a colocated plan whose learner and engine cannot fit the GPU is refused, with the numbers.
- 3: a replacement engine waits, with a deadline, for its GPU's memory; pure, the readings injected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from actors.gpu_memory import (
    GIB,
    GpuMemory,
    GpuMemoryBusy,
    requested_bytes,
    short_of_memory,
    wait_for_gpu_memory,
)
from cluster.config import ConfigError, load_config
from tests.helpers import REPO


def _smoke_script():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_smoke_learner
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return gpu_smoke_learner


# ---------------------------------------------------------------- item 5: float32 gradient sums


def test_half_precision_learner_sums_gradients_in_float32_unless_told_otherwise():
    from learner.rank import LearnerRank

    def ds_config(*overrides: str) -> dict:
        cfg = load_config(overrides=list(overrides))
        return LearnerRank.deepspeed_config(SimpleNamespace(learner=cfg.learner, cfg=cfg))

    assert ds_config("model.dtype=bfloat16")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds_config("model.dtype=float16", "learner.zero_stage=3")["data_types"] == {
        "grad_accum_dtype": "fp32"
    }
    assert "data_types" not in ds_config("model.dtype=float32")
    assert "data_types" not in ds_config("model.dtype=bfloat16", "learner.grad_accum_dtype=model")
    # DeepSpeed 0.19.8 raises NotImplementedError for bf16 + fp32 accumulation without ZeRO: refused up front.
    with pytest.raises(ConfigError, match=r"learner\.grad_accum_dtype.*zero_stage >= 1"):
        load_config(overrides=["model.dtype=bfloat16", "learner.zero_stage=0"])
    load_config(overrides=["model.dtype=bfloat16", "learner.zero_stage=0", "learner.grad_accum_dtype=model"])


@pytest.mark.integration
def test_bf16_gradients_over_16_micro_batches_match_their_exact_sum_in_float32(tmp_path, capsys):
    """The GPU smoke's check of it (scripts/gpu_smoke_learner.py, check 5) on a Qwen2-shaped model scaled
    down to the CPU: LearnerRank at ZeRO-2 in bf16 takes one step of 16 micro-batches, once summing in bf16
    and once in float32, each in its own process; the summed gradient is read where DeepSpeed's step() starts
    and compared with the float64 sum of the same micro-batches' gradients on a plain copy of the model.
    Seen here: 4.7e-3 relative error summed in bf16, 2.8e-9 in float32 (ZeRO-3 measured the same)."""
    smoke = _smoke_script()
    failures: list[str] = []
    results = smoke.check_grad_accumulation(
        str(tmp_path), failures, device="cpu", shape=smoke.QWEN2_TINY, micro_batches=16, batch=2, seq=48,
        prompt=16,
    )  # fmt: skip
    out = capsys.readouterr().out
    assert failures == [], out
    bf16, fp32 = results["model"], results["float32"]
    assert bf16["micro_batches"] == fp32["micro_batches"] == 16
    assert fp32["rel_error_vs_exact_sum"] <= 1e-6 < 1e-3 <= bf16["rel_error_vs_exact_sum"], results
    assert fp32["broadcast_read_equals_synced"] and bf16["broadcast_read_equals_synced"]


# ---------------------------------------------------------------- item 8: a colocated GPU's memory

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "tie_word_embeddings": False,
}  # fmt: skip


def test_colocated_learner_memory_is_counted_from_the_config_and_refused_with_the_numbers(tmp_path):
    from cluster.memory_plan import colocated_shortfall, count_parameters, learner_bytes

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    params = count_parameters(str(tmp_path))  # on the meta device: no weights exist
    assert params == 7_615_616_512  # Qwen2.5-7B's published count
    colocate = ["run.device=cuda", "cluster.colocate=true", "rollout.gpu_memory_utilization=0.3"]
    cfg = load_config(overrides=[*colocate, "model.dtype=bfloat16"])
    need = learner_bytes(cfg, params)
    # One rank: nothing partitioned. bf16 weights 2 B, float32-summed gradients 4 B, AdamW moments 8 B and
    # float32 master weights 4 B per parameter.
    assert (need.weights, need.gradients, need.optimizer, need.reference) == (
        2 * params,
        4 * params,
        12 * params,
        0,
    )
    problem = colocated_shortfall(cfg, params, 80 * GIB)
    assert problem is not None and "7.62 B parameters in bfloat16 at ZeRO-2" in problem, problem
    assert "weights 14.2 GiB, gradients 28.4 GiB, AdamW state 85.1 GiB" in problem, problem
    assert "GPU of 80.0 GiB" in problem and "the learner alone does not fit" in problem, problem
    # ZeRO partitions nothing with one rank: the stage changes no number; a reference model adds its weights.
    kl = load_config(overrides=[*colocate, "model.dtype=bfloat16", "algorithm.kl_coef=0.01"])
    assert learner_bytes(kl, params).reference == 2 * params
    # A 135M model in fp32 (16 B a parameter, 2.0 GiB) fits beside vLLM's 30% of a 24 GiB GPU, not of a
    # 2.5 GiB one: the message says what gpu_memory_utilization would leave the learner room.
    small = load_config(overrides=colocate)
    assert learner_bytes(small, 134_515_008).total == 16 * 134_515_008
    assert colocated_shortfall(small, 134_515_008, 24 * GIB) is None
    tight = colocated_shortfall(small, 134_515_008, 5 * GIB // 2)
    assert tight is not None and "lower rollout.gpu_memory_utilization to at most 0.20" in tight, tight


# ---------------------------------------------------------------- items 6 and 8 on a Ray cluster


@pytest.mark.integration
def test_eval_plans_from_the_cluster_and_a_colocated_plan_that_cannot_fit_is_refused(tiny_model, capsys):
    """One local Ray whose only GPU is a logical one (the driver's torch sees none), like a GPU cluster seen
    from a head node without GPUs.
    6: `duet eval run.device=auto` plans from the cluster, so CUDA engines, and its preflight refuses at once
    a plan the cluster cannot hold, naming it; before, it planned CPU engines from the driver's own torch
    and waited for a placement that could never come (here the cluster has no CPU for them).
    8: a colocated plan is checked against the GPU's memory; a probe on the (logical) GPU finds no CUDA here,
    which is said, unless cluster.gpu_memory_gib gives it."""
    import ray

    from cluster.evaluation import eval_main
    from cluster.preflight import PreflightError, check_plan

    ray.init(address="local", num_cpus=0, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rc = eval_main([
            "--model", str(tiny_model), "run.device=auto", "rollout.num_engines=2",
            "cluster.placement_timeout_s=5", "eval.synthetic_problems=4",
        ])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "the plan (cuda) needs {CPU: 2, GPU: 2} in all" in err, err
        assert "RolloutEngine 1 needs {CPU: 1, GPU: 1} on one node" in err, err

        colocated = ["run.device=auto", "cluster.colocate=true", "rollout.gpu_memory_utilization=0.3"]
        ray.shutdown()
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        plan, warnings = check_plan(load_config(overrides=colocated))
        assert plan.colocated and warnings == [
            "cluster.colocate: no GPU answered with its memory, so whether the learner and vLLM fit it was not "
            "checked; set cluster.gpu_memory_gib to check it"
        ]
        plan, warnings = check_plan(load_config(overrides=[*colocated, "cluster.gpu_memory_gib=16"]))
        assert plan.colocated and warnings == []
        with pytest.raises(PreflightError, match=r"do not fit one GPU of 4\.1 MiB") as e:
            check_plan(load_config(overrides=[*colocated, "cluster.gpu_memory_gib=0.004"]))
        assert "0.3 M parameters in float32 at ZeRO-2" in str(e.value)
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- item 7: ZeRO-3 load and export


def _zero3_rank(rank: int, world: int, port: int, model: str, out: str, result: str) -> None:
    """One ZeRO-3 LearnerRank in a process of its own (spawned): what it holds when, and its export."""
    import os

    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    from cluster.config import Config
    from learner.rank import LearnerRank

    cfg = Config.model_validate(
        {"learner": {"zero_stage": 3, "num_ranks": world, "zero3_persistence_threshold": 0, "lr": 1e-3}}
    )
    r = LearnerRank(rank, world, cfg, model, "cpu", 1)
    loaded_before_group = r.model is not None
    if rank == 0:
        r.store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False)
    r.join("127.0.0.1", port, timeout_s=120)
    params = list(r.engine.module.parameters())
    held = sum(p.ds_tensor.numel() for p in params)
    whole = sum(p.ds_numel for p in params)
    rows = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10, 11], "behaviour_logprobs": [-1.0] * 4,
             "advantage": a, "keep": True} for a in (1.0, -1.0)]  # fmt: skip
    r.train_step(rows, 4.0, 1)
    import deepspeed

    full = {}  # gathered by every rank: the reference for the export
    for name, p in r.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full[name] = p.data.detach().clone()
    r.export_hf(out, model, shard_bytes=256 << 10)
    if rank == 0:
        torch.save(full, os.path.join(out, "..", "gathered.pt"))
    Path(result).write_text(
        json.dumps({"loaded_before_group": loaded_before_group, "held": held, "whole": whole})
    )
    torch.distributed.destroy_process_group()


@pytest.mark.integration
def test_zero3_learner_loads_partitioned_and_exports_shard_by_shard_from_rank_0(tmp_path, tiny_model):
    """2 ZeRO-3 ranks (gloo, every parameter partitioned): neither loads the model before the process group
    exists; each then holds half of every parameter; after a step rank 0 alone writes the export in shards
    of 256 KiB with their index, which transformers loads to exactly the weights every rank gathers."""
    import multiprocessing

    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers import free_port

    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), tmp_path / "export" / "hf"
    procs = [
        ctx.Process(
            target=_zero3_rank, args=(r, 2, port, str(tiny_model), str(out), str(tmp_path / f"r{r}.json"))
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert not any(s["loaded_before_group"] for s in seen), seen  # loaded in join, through zero.Init
    whole = seen[0]["whole"]
    assert all(s["whole"] == whole and s["held"] <= whole // 2 + 64 for s in seen), seen
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (out / "model.safetensors").exists()
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    gathered = torch.load(tmp_path / "export" / "gathered.pt")
    assert set(gathered) <= set(exported)
    for name, tensor in gathered.items():
        assert torch.equal(exported[name], tensor), name


# ---------------------------------------------------------------- a replacement engine waits for its GPU's memory
# (issue 22, finding 3: vLLM refuses to start while the GPU lacks the memory gpu_memory_utilization asks, and
# a killed engine's memory is given back some time after the kill.)

H100 = 79 * GIB + 123_456_789  # a total that is no whole number of GiB, as cudaMemGetInfo's are not


class FakeTime:
    """A clock that only the wait's own sleeps move: the test sees every reading, with no real time passing."""

    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


def readings(*frees: list[int], holders: tuple = ()) -> tuple[list, object]:
    """A reader that returns one reading per call (then repeats the last), each GPU of total H100."""
    calls: list[int] = []

    def read() -> list[GpuMemory]:
        frees_now = frees[min(len(calls), len(frees) - 1)]
        calls.append(len(calls))
        return [GpuMemory(f"GPU {i}", free, H100, holders) for i, free in enumerate(frees_now)]

    return calls, read


@pytest.mark.integration  # importing vLLM runs `file` (platform.architecture): not for the fast tier
def test_gpu_memory_wait_asks_what_vllm_asks():
    """The wait's test is vLLM 0.32's own start-up check (vllm/v1/worker/utils.py: request_memory): for
    every reading, the wait lets vLLM start exactly when vLLM's check would pass, at the byte."""
    from vllm.config import CacheConfig
    from vllm.utils.mem_utils import MemorySnapshot
    from vllm.v1.worker.utils import request_memory

    cases = 0
    for utilization in (0.3, 0.5, 0.85, 0.9, 0.95, 0.999):
        need = requested_bytes(H100, utilization)
        for free in (0, need - 1, need, need + 1, H100):
            snapshot = MemorySnapshot(free_memory=free, total_memory=H100, device="cpu", auto_measure=False)
            try:
                assert request_memory(snapshot, CacheConfig(gpu_memory_utilization=utilization)) == need
                vllm_starts = True
            except ValueError as e:
                assert "Free memory on device" in str(e)
                vllm_starts = False
            waits = bool(short_of_memory([GpuMemory("GPU 0", free, H100)], utilization))
            assert waits == (not vllm_starts), (utilization, free, need)
            cases += 1
    assert cases == 30


def test_gpu_memory_wait_starts_once_a_killed_predecessors_memory_is_free():
    """The GPU is held (by the killed engine's process, pid 4242) for three readings, then given back: the
    wait says what it waits for, then returns, without its deadline."""
    time_ = FakeTime()
    held = ((4242, 70 * GIB),)
    calls, read = readings([8 * GIB], [8 * GIB], [9 * GIB], [78 * GIB], holders=held)
    notes: list[str] = []
    start = time_.now
    gpus = wait_for_gpu_memory(
        read, 0.9, 120.0, label="RolloutEngine 3", note=notes.append, clock=time_.clock, sleep=time_.sleep
    )
    assert [g.free_bytes for g in gpus] == [78 * GIB]
    assert len(calls) == 4 and time_.now - start < 120.0
    assert len(notes) == 2, notes
    waiting = notes[0]
    need = requested_bytes(H100, 0.9) / GIB
    for part in (
        "RolloutEngine 3",
        "GPU 0",
        "8.00 GiB free",
        f"vLLM asks {need:.2f} GiB",
        "pid 4242 70.0 GiB",
    ):
        assert part in waiting, (part, waiting)
    assert "gpu_memory_utilization=0.9" in waiting
    assert "starting vLLM" in notes[1]


def test_gpu_memory_wait_goes_at_once_when_the_memory_is_free():
    time_ = FakeTime()
    calls, read = readings([70 * GIB])
    notes: list[str] = []
    wait_for_gpu_memory(read, 0.85, 120.0, note=notes.append, clock=time_.clock, sleep=time_.sleep)
    assert len(calls) == 1 and notes == [] and time_.now == 1000.0


def test_gpu_memory_wait_of_a_tensor_parallel_engine_waits_for_every_gpu():
    """Two GPUs: the first is free at once, the second only at the third reading."""
    time_ = FakeTime()
    calls, read = readings([78 * GIB, 1 * GIB], [78 * GIB, 1 * GIB], [78 * GIB, 78 * GIB])
    notes: list[str] = []
    wait_for_gpu_memory(read, 0.9, 60.0, note=notes.append, clock=time_.clock, sleep=time_.sleep)
    assert len(calls) == 3
    assert "GPU 1" in notes[0] and "GPU 0" not in notes[0], notes[0]


def test_gpu_memory_wait_fails_at_its_deadline_naming_the_gpu_and_what_holds_it():
    time_ = FakeTime()
    _, read = readings([5 * GIB], holders=((4242, 73 * GIB), (77, 1 * GIB)))
    notes: list[str] = []
    start = time_.now
    with pytest.raises(GpuMemoryBusy) as raised:
        wait_for_gpu_memory(
            read, 0.9, 45.0, label="RolloutEngine 7", note=notes.append, clock=time_.clock, sleep=time_.sleep
        )
    message = str(raised.value)
    assert time_.now - start == pytest.approx(45.0)
    for part in (
        "RolloutEngine 7",
        "rollout.gpu_memory_wait_s=45",
        "GPU 0: 5.00 GiB free of 79.11 GiB",
        "pid 4242 73.0 GiB, pid 77 1.0 GiB",
    ):
        assert part in message, (part, message)
    # It said what it waited for at the start and again every NOTE_EVERY_S (30 s): twice in 45 s.
    assert len(notes) == 2 and all("waiting up to" in n for n in notes), notes


def test_gpu_memory_wait_is_asked_for_engines_on_gpus_only():
    """The fleet gives each engine the wait on CUDA (rollout.gpu_memory_wait_s), none on CPU, none with 0."""
    from cluster.config import load_config
    from cluster.fleet import RolloutFleet
    from cluster.placement import make_plan

    cfg = load_config(overrides=["run.device=cuda", "rollout.gpu_memory_wait_s=90"])
    fleet = RolloutFleet(cfg, make_plan(cfg, cluster_gpus=8), "model")
    assert fleet.engine_kwargs(0, 0)["gpu_memory_wait_s"] == 90.0
    off = load_config(overrides=["run.device=cuda", "rollout.gpu_memory_wait_s=0"])
    assert (
        RolloutFleet(off, make_plan(off, cluster_gpus=8), "model").engine_kwargs(0, 0)["gpu_memory_wait_s"]
        is None
    )
    cpu = load_config(overrides=["run.device=cpu"])
    assert RolloutFleet(cpu, make_plan(cpu), "model").engine_kwargs(0, 0)["gpu_memory_wait_s"] is None
