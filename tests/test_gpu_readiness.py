"""Ready for the first GPU cluster (issue 22): the parts of its GPU-path findings a CPU can prove, the pure
parts with the hardware readings injected and the real stack where a CPU runs it. Each finding's tests stand
in their own section, numbered as in the issue; each fails on the code before its fix.

Items 2-8 and 10-11 (item 1 is tests/test_node_loss_at_start.py):
- 2: the weight byte check compares bytes on every transport (NCCL included);
- 3: a replacement engine waits, with a deadline, for its GPU's memory; pure, the readings injected;
- 4 and 11: a timed-out or broken transfer ends every learner rank's pass (two ZeRO-3 ranks, real engines);
- 5: bf16/fp16 gradients are summed in float32 over a step's micro-batches (DeepSpeed's
  data_types.grad_accum_dtype), against the exact sum of each micro-batch's gradient;
- 6: `duet eval` plans from the cluster's resources, as `duet train` does, not from the driver's torch;
- 7: a ZeRO-3 learner loads the model partitioned (zero.Init, after the process group exists), and exports
  it shard by shard from rank 0 without a full state dict on every rank;
- 8: a colocated plan whose learner and engine cannot fit the GPU is refused, with the numbers;
- 10: the `broadcast.mid` crash point fires inside the transfer.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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
        assert "0.3 M parameters in float32 at ZeRO-0" in str(e.value)
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

    from tests.helpers import free_port, run_ranks

    ctx = multiprocessing.get_context("spawn")
    port, out = free_port(), tmp_path / "export" / "hf"
    procs = [
        ctx.Process(
            target=_zero3_rank, args=(r, 2, port, str(tiny_model), str(out), str(tmp_path / f"r{r}.json"))
        )
        for r in range(2)
    ]
    assert run_ranks(procs, timeout_s=300) == [0, 0], (
        "rank exit codes (-9: still running after 300 s, killed); their stderr is above"
    )
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


# ---------------------------------------------------------------- 2. the byte check on every transport
# vLLM's NCCL engine cannot run here (no GPU). What runs below is vLLM's own NCCL code at both ends
# (the trainer's packed producer, the worker's packed and one-by-one consumers, under duet's subclasses
# and `learner.weight_sender.send`), with only what needs a GPU stood in for: the communicator by an
# in-memory wire, CUDA streams by no-ops, and vLLM's layerwise reload (which needs a vLLM model) by a
# toy model's plain `load_weights`. Integration-marked only because importing vLLM's model loader
# starts a subprocess (py-cpuinfo runs `file`).


class _Wire:
    """A communicator stand-in: what rank 0 broadcasts, the receiver's next broadcast call gets.
    `corrupt`: flip a byte of the n-th payload (a transport that damages data)."""

    def __init__(self, corrupt: int | None = None) -> None:
        self.payloads: queue.Queue = queue.Queue()
        self.corrupt = corrupt
        self.sent = 0

    def sender(self):
        wire = self

        class End:
            def broadcast(self, tensor, src, stream=None):
                data = tensor.detach().clone().reshape(-1).view(torch.uint8)
                if wire.sent == wire.corrupt:
                    data[0] ^= 1
                wire.sent += 1
                wire.payloads.put(data)

            def destroy(self):
                pass

        return End()

    def receiver(self):
        wire = self

        class End:
            def broadcast(self, tensor, src, stream=None):
                tensor.reshape(-1).view(torch.uint8).copy_(wire.payloads.get(timeout=10))

            def destroy(self):
                pass

        return End()


class _NoStream:
    def synchronize(self) -> None:
        pass


class _ToyModel(torch.nn.Module):
    """Receives weights the way a vLLM model does: `load_weights((name, tensor), ...)`."""

    def __init__(self, source: torch.nn.Module) -> None:
        super().__init__()
        self.params = {n: torch.zeros_like(p) for n, p in source.named_parameters()}
        self.calls: list[list[str]] = []

    def load_weights(self, weights):
        weights = list(weights)
        self.calls.append([n for n, _ in weights])
        for name, t in weights:
            self.params[name].copy_(t)
        return {n for n, _ in weights}


class _LocalHandle:
    """A RolloutEngine handle without Ray: `.method.remote(...)` runs the call here, now."""

    def __init__(self, receiver) -> None:
        self.receiver = receiver
        self.versions: list[str | None] = []

    def __getattr__(self, method):
        receiver = self.receiver

        def call(*args):
            if method == "finish_weight_update":
                self.versions.append(args[0])
                return receiver.finish_weight_update()
            return getattr(receiver, method)(*args)

        return SimpleNamespace(remote=call)


def _stub_gpu(monkeypatch) -> None:
    from vllm.distributed.weight_transfer import packed_tensor
    from vllm.model_executor.model_loader import reload

    monkeypatch.setattr(packed_tensor, "_get_streams", lambda idx, n: tuple(_NoStream() for _ in range(n)))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda *a: None)
    monkeypatch.setattr(reload, "initialize_layerwise_reload", lambda model: None)
    monkeypatch.setattr(reload, "finalize_layerwise_reload", lambda model, cfg: None)


def _nccl_pair(source_module, wire: _Wire, packed: bool, bucket_bytes: int):
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.distributed.weight_transfer.base import ModuleSource

    from actors.weight_receiver import DuetNCCLWeightTransferEngine
    from learner.weight_sender import DuetNCCLTrainerWeightTransferEngine, EngineFleetClient

    target = _ToyModel(source_module)
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(rank=0), model_config=None)
    receiver = DuetNCCLWeightTransferEngine(
        WeightTransferConfig(backend="duet_nccl"), vllm_config, torch.device("cpu"), target
    )
    receiver.packed, receiver.packed_buffer_size_bytes = packed, bucket_bytes
    receiver.model_update_group = wire.receiver()
    handle = _LocalHandle(receiver)
    client = EngineFleetClient([handle], timeout_s=10.0)
    client.wait = lambda refs, what, deadline=None: refs  # the calls ran already
    sender = DuetNCCLTrainerWeightTransferEngine(
        client=client,
        source=ModuleSource(source_module),
        packed=packed,
        packed_buffer_size_bytes=bucket_bytes,
    )
    sender.model_update_group = wire.sender()
    return sender, receiver, target, handle


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:Tensor '0.weight' has size")  # one parameter larger than a buffer
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one_by_one"])
def test_nccl_receive_path_hashes_what_it_loads_with_the_code_every_transport_uses(monkeypatch, packed):
    """Through duet's NCCL engines (vLLM's, subclassed), a checked update's digest at the engine equals
    learner rank 0's, computed by the same `TensorDigest` over each tensor as vLLM hands it to
    `load_weights`; an unchecked one hashes nothing; a damaged byte on the wire shows. Before: the NCCL
    path returned no digest at all and the driver compared nothing."""
    from learner.weight_sender import send

    _stub_gpu(monkeypatch)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    bucket = 200  # bytes: several packed buffers, one parameter larger than a buffer

    sender, receiver, target, handle = _nccl_pair(module, _Wire(), packed, bucket)
    sent = send(sender, 3, checksum=True, timeout_s=10.0)
    assert sent["digest"] is not None and receiver.last_digest == sent["digest"]
    assert handle.versions == ["3"]  # the version stamped by the fleet client
    assert all(torch.equal(target.params[n], p) for n, p in module.named_parameters())
    assert [n for call in target.calls for n in call] == [n for n, _ in module.named_parameters()]
    if packed:
        assert len(target.calls) > 1  # several packed buffers, each hashed as it was unpacked

    sent = send(sender, 4, checksum=False, timeout_s=10.0)
    assert sent["digest"] is None and receiver.last_digest is None and handle.versions[-1] == "4"

    sender, receiver, _, _ = _nccl_pair(module, _Wire(corrupt=1), packed, bucket)
    sent = send(sender, 5, checksum=True, timeout_s=10.0)
    assert receiver.last_digest is not None and receiver.last_digest != sent["digest"]


def test_the_digest_covers_names_dtypes_shapes_and_bytes():
    from actors.weight_transport import TensorDigest, hashed

    def digest(pairs):
        d = TensorDigest()
        for _ in hashed(pairs, d):
            pass
        return d.hexdigest()

    a = torch.arange(6, dtype=torch.float32)
    base = digest([("w", a)])
    assert digest([("w", a.clone())]) == base
    assert digest([("v", a)]) != base  # the name
    assert digest([("w", a.view(2, 3))]) != base  # the shape
    assert digest([("w", a.view(torch.int32))]) != base  # the dtype, same bytes
    b = a.clone()
    b[5] = 5.000001
    assert digest([("w", b)]) != base  # one value
    assert digest([("w", a[:3]), ("x", a[3:])]) != digest([("x", a[3:]), ("w", a[:3])])  # the order


def test_a_step_that_trains_nothing_carries_the_last_check():
    """A step whose groups all tied sends nothing; its sync/checksum_match is the last checked
    broadcast's verdict (None before any), not True. Before: always True."""
    from cluster.config import load_config
    from cluster.driver import Trainer

    trainer = Trainer.__new__(Trainer)  # the loop's bookkeeping only: no actors
    trainer.cfg, trainer.version, trainer.step = load_config(), 0, 1
    trainer.last_sync_check, trainer.producer = None, None  # synchronous mode

    def learn_nothing() -> dict:
        return trainer.learn([], [], {"time/generate_s": 0.0}, time.perf_counter())

    assert learn_nothing()["sync/checksum_match"] is None
    trainer.healer = SimpleNamespace(retry=lambda fn, *a: {"sync/checksum_match": False})
    assert trainer.check_sync("digest", checked=True)["sync/checksum_match"] is False
    skipped = learn_nothing()
    assert skipped["train/skipped"] is True and skipped["sync/checksum_match"] is False
    assert trainer.check_sync(None, checked=False) == {"sync/checksum_match": None}
    assert learn_nothing()["sync/checksum_match"] is False


# ---------------------------------------------------------------- 3. a replacement engine waits for its GPU's memory
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


# ---------------------------------------------------------------- 4. a timed-out transfer ends every rank's part
# Under ZeRO-3 each parameter is gathered by a collective of all learner ranks, in the same order on each.
# A transfer that times out on rank 0 must still finish rank 0's pass over the weights, and nothing may go
# on gathering behind it, or the next collectives meet the wrong partners and the learner hangs. The
# duet_host path on the real stack (2 ZeRO-3 ranks, an engine that hangs): test_zero3_two_ranks_... below.


class _GatherLog:
    """A weight source that records which thread ran each of its 'gathers' (one per parameter)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.threads: list[int] = []

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(n, p.dtype, tuple(p.shape)) for n, p in self.module.named_parameters()]

    def __iter__(self):
        for name, p in self.module.named_parameters():
            self.threads.append(threading.get_ident())
            yield name, p.data.clone()


def test_nccl_transfer_that_times_out_leaves_no_gather_behind():
    """vLLM's NCCL trainer engine sends on a side thread, whose stream synchronise has no deadline. Its
    broadcast hangs (an engine died) after the first tensor: `send` gives up at the deadline, and by then
    every parameter was gathered, all of them on the caller's thread (the one every rank runs its
    collectives on); the sending thread, released later, takes nothing more. Before: the side thread
    iterated the source itself and was left inside the pass, gathering beside the next update's."""
    from learner.weight_sender import (
        DuetNCCLTrainerWeightTransferEngine,
        EngineFleetClient,
        WeightTransferError,
        send,
    )

    class Recorder:
        def start_weight_update(self):
            pass

        def update_weights(self, info):
            pass

        def finish_weight_update(self):
            pass

    module = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])  # 8 parameters
    source = _GatherLog(module)
    client = EngineFleetClient([_LocalHandle(Recorder())], timeout_s=10.0)
    client.wait = lambda refs, what, deadline=None: refs
    sender = DuetNCCLTrainerWeightTransferEngine(client=client, source=source)
    release, taken = threading.Event(), []

    def hung_broadcast(src, meta):  # takes one tensor, then waits on a peer that never comes
        it = iter(src)
        taken.append(next(it))
        release.wait()
        taken.extend(it)

    sender._broadcast = hung_broadcast
    caller = threading.get_ident()
    t0 = time.monotonic()
    with pytest.raises(WeightTransferError, match="did not complete within 1s"):
        send(sender, 1, checksum=False, timeout_s=1.0)
    assert time.monotonic() - t0 < 5.0
    assert source.threads == [caller] * 8  # the whole pass, on the caller's thread, before send returned
    release.set()
    time.sleep(0.2)
    assert len(source.threads) == 8 and [name for name, _ in taken] == ["0.weight"]  # it took nothing more


class _HostWireThatStalls:
    """A gloo group stand-in for duet_host's sender: bucket `stall_at`'s send never completes."""

    def __init__(self, stall_at: int) -> None:
        self.stall_at, self.sent = stall_at, 0

    def broadcast(self, payload, root):
        k, self.sent = self.sent, self.sent + 1

        class Work:
            def wait(self, timeout):
                if k == self.stall_at:
                    time.sleep(timeout.total_seconds())
                    raise RuntimeError(f"Timed out waiting {timeout} for send operation to complete")

        work = Work()
        work.stall_at = self.stall_at
        return work

    def size(self):
        return 2


def test_host_transfer_that_times_out_mid_pass_finishes_the_pass_before_it_fails():
    """duet_host's sender: the send of bucket 1 of 4 never completes (the engine hangs). The update fails
    at its deadline, and by then rank 0 had gathered every parameter, on its own thread: the other ranks'
    passes end with it. Before: rank 0 raised mid-pass, the other ranks waited in a gather forever."""
    from learner.weight_sender import (
        DuetHostTrainerInitInfo,
        DuetHostTrainerWeightTransferEngine,
        EngineFleetClient,
        WeightTransferError,
    )

    class Engine:
        def apply_weight_update(self, info, version):
            return None

    module = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])  # 8 parameters, 4 buckets
    source = _GatherLog(module)
    client = EngineFleetClient([_LocalHandle(Engine())], timeout_s=10.0)
    client.wait = lambda refs, what, deadline=None: refs  # the calls ran already, without Ray
    client.raise_engine_failure = lambda refs: None
    info = DuetHostTrainerInitInfo(
        master_address="", master_port=0, world_size=2, rank=0, bucket_bytes=1 << 10, timeout_s=1.0
    )
    sender = DuetHostTrainerWeightTransferEngine(client=client, source=source, is_sender=True, init_info=info)
    sender.group = _HostWireThatStalls(stall_at=1)
    t0 = time.monotonic()
    with pytest.raises(WeightTransferError, match="broke off"):
        sender.send_weights("1")
    assert time.monotonic() - t0 < 5.0
    assert source.threads == [threading.get_ident()] * 8
    with pytest.raises(WeightTransferError, match="reconnect first"):  # and the next update still
        sender.send_weights("2")  # takes part in the gathers before it refuses
    assert len(source.threads) == 16


# ---------------------------------------------------------------- 10. broadcast.mid lands inside the transfer
def test_broadcast_mid_fires_once_the_update_is_held_inside_itself(monkeypatch):
    """`broadcast.mid` no longer fires from a 50 ms timer (after the tiny model's 20-45 ms transfers): the
    work is made to stop at a known place inside itself, and the crash comes once it is held there, naming
    the place. The real run: tests/test_crash_consistency.py's chain starts with it and asserts the place."""
    from cluster import faults

    crashed, held = [], threading.Event()

    def hold():
        def wait():
            held.wait(5)
            return "engine 0 inside its weight update"

        return wait

    monkeypatch.setattr(faults, "crash", lambda name, step, where=None: crashed.append((name, step, where)))
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point_within("broadcast.mid", 2, lambda: pytest.fail("armed without the variable"))
    monkeypatch.setenv(faults.ENV, "broadcast.mid:3")
    faults.point_within("broadcast.mid", 2, lambda: pytest.fail("armed at another step"))
    faults.point_within("broadcast.mid", 3, hold)
    time.sleep(0.1)
    assert crashed == []  # not before the work is held, however long that takes
    held.set()
    for _ in range(50):
        if crashed:
            break
        time.sleep(0.05)
    assert crashed == [("broadcast.mid", 3, "engine 0 inside its weight update")]


# ---------------------------------------------------------------- 11. two ZeRO-3 ranks broadcast to engines
@pytest.mark.timeout(600)
def test_zero3_two_ranks_broadcast_checked_then_an_engine_dies_mid_pass_and_every_rank_finishes(
    local_ray, tiny_model
):
    """Two ZeRO-3 learner ranks (every parameter partitioned: each is gathered by both ranks as it is sent)
    → two real vLLM engines, through vLLM's weight-transfer API, checked byte for byte: each engine's
    digest of what it loaded equals learner rank 0's, both report the version, agree with each other, and
    sample from exactly the learner's (gathered) weights. An unchecked update hashes nothing and lands.

    Then one engine's vLLM dies (a CUDA error, an OOM kill) and the next broadcast breaks off mid-pass on
    rank 0. Both ranks must end their part of it (issue 22, finding 4): their calls return, and the
    ranks' next collectives (a full gather) line up. The survivor, reconnected, gets checked weights.
    Before: rank 1 waited in a gather rank 0 never joined, the learner hung."""
    import os
    import signal

    from ray.util.placement_group import placement_group, remove_placement_group
    from transformers import AutoModelForCausalLM

    from actors.rollout_engine import RolloutEngine
    from cluster.config import load_config
    from cluster.placement import cpu_engine_env
    from learner.group import LearnerGroup
    from tests.helpers import assert_samples_from, vllm_process

    ray = local_ray
    path = str(tiny_model)
    cfg = load_config(
        overrides=[
            "learner.num_ranks=2",
            "learner.zero_stage=3",
            "learner.zero3_persistence_threshold=0",
            "rollout.num_engines=2",
            "learner.broadcast_bucket_mib=0.05",
            # The gloo path, where rank 0 meets a dead engine mid-pass: through shared memory rank 0 packs
            # every bucket before any engine takes part (tests/test_weight_sync.py covers that path).
            "cluster.weight_transport=network",
        ]
    )
    engines = [
        RolloutEngine.options(runtime_env={"env_vars": cpu_engine_env(str(i))}, max_concurrency=8).remote(
            i, path
        )
        for i in range(2)
    ]
    pg = placement_group([{"CPU": 1}] * 2)
    ray.get(pg.ready())
    learner = LearnerGroup(cfg, path, pg, "cpu", 1)
    try:
        ray.get([e.ready.remote() for e in engines])
        learner.init_broadcast(engines, 1, "duet_host", timeout_s=60.0)

        before = ray.get(engines[0].weight_checksums.remote())
        learner.perturb(0.05, seed=1)  # every weight moves
        sent = learner.broadcast(7)
        # exact: each engine loaded the bytes rank 0 sent (several buckets), both at the learner's version
        received = [d for e in engines for d in ray.get(e.received_digest.remote())]
        assert sent["digest"] is not None and received == [sent["digest"]] * 2
        assert [ray.get(e.weight_version.remote()) for e in engines] == [7, 7]
        after = [ray.get(e.weight_checksums.remote()) for e in engines]
        assert after[0] == after[1] and after[0] != before

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(learner.full_state_dict())  # gathered by both ranks
        model.eval()
        for engine in engines:
            assert_samples_from(ray, engine, model, version=7, prompts=3)

        # a step the driver does not check: nothing is hashed at either end, and the weights still land
        learner.perturb(0.05, seed=2)
        sent = learner.broadcast(8, checksum=False)
        assert sent["digest"] is None and sent["hash_s"] == 0.0
        assert [d for e in engines for d in ray.get(e.received_digest.remote())] == [None, None]
        stats = [s for e in engines for s in ray.get(e.transfer_stats.remote())]
        assert all(s["hash_s"] == 0.0 and s["buckets"] > 1 for s in stats)
        model.load_state_dict(learner.full_state_dict())
        assert_samples_from(ray, engines[1], model, version=8, prompts=2)
        # idle engines took both updates without pausing their scheduler
        assert [ray.get(e.ready.remote())["update_pauses"] for e in engines] == [0, 0]

        # engine 1's vLLM dies under its live actor; the next broadcast breaks off on rank 0 mid-pass
        os.kill(vllm_process(ray.get(engines[1].ready.remote())["pid"], "VLLM::EngineCore"), signal.SIGKILL)
        learner.perturb(0.05, seed=3)
        calls = [w.broadcast.remote(9, True) for w in learner.workers]
        done, _ = ray.wait(calls, num_returns=2, timeout=90)
        assert len(done) == 2, "a learner rank is still inside the broken broadcast"
        with pytest.raises(ray.exceptions.RayTaskError, match=r"EngineDeadError|broke off"):
            ray.get(calls[0])
        assert ray.get(calls[1])["digest"] is None  # rank 1 took part in every gather, sent nothing
        gathered = ray.get([w.full_state_dict.remote() for w in learner.workers], timeout=60)[0]

        learner.shutdown_broadcast()
        learner.init_broadcast(engines[:1], 1, "duet_host", timeout_s=60.0)
        sent = learner.broadcast(10)
        assert ray.get(engines[0].received_digest.remote()) == [sent["digest"]]
        assert ray.get(engines[0].weight_version.remote()) == 10
        stats = ray.get(engines[0].transfer_stats.remote())[0]
        assert stats["opened"] == 2 and stats["closed"] == 1  # the old group released, a new one open
        model.load_state_dict(gathered)
        assert_samples_from(ray, engines[0], model, version=10, prompts=2)
    finally:
        learner.shutdown()
        remove_placement_group(pg)
        for e in engines:
            with contextlib.suppress(Exception):
                ray.get(e.shutdown.remote(), timeout=30)
            ray.kill(e)
