"""LoRA (issue 26): the adapter maths and names (pure), the config's refusals, and, on the real stack, a
LoRA run end to end: rewards, the adapter moved and byte-checked, the engine serving it (its log-probs are
the adapted policy's, not the base model's), a resume equal to a straight run, and `duet eval` of the
adapter folder and of the merged export."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cluster.config import ENGINE_LORA_RANKS, Config, ConfigError, LoraConfig, load_config


# ---------------------------------------------------------------- pure: the adapter's maths and names
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(2, 2, bias=False)
        self.out = nn.Linear(2, 3, bias=False)


class _Toy(nn.Module):
    """A model with one block (q_proj 2→2, out 2→3) and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block()])
        self.lm_head = nn.Linear(3, 5, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def test_merged_export_weight_is_w_plus_alpha_over_r_times_b_a():
    """W' = W + (alpha / r) B A, by hand: W = I, A = [[1, 2]], B = [[3], [4]], alpha = 2, r = 1:
    B A = [[3, 6], [4, 8]], W' = [[1 + 6, 12], [8, 1 + 16]] = [[7, 12], [8, 17]]."""
    from learner.lora import export_plan, peft_config, wrap

    toy = _Toy()
    with torch.no_grad():
        toy.layers[0].q_proj.weight.copy_(torch.eye(2))
    config = peft_config(rank=1, alpha=2.0, dropout=0.0, targets=["q_proj"])
    config.task_type = None  # a bare nn.Module, not a transformers causal LM
    model = wrap(toy, config)
    layer = model.base_model.model.layers[0].q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[3.0], [4.0]]))
    plan = {name: (params, value) for name, params, value in export_plan(model)}
    assert sorted(plan) == ["layers.0.out.weight", "layers.0.q_proj.weight", "lm_head.weight"]
    params, value = plan["layers.0.q_proj.weight"]
    assert torch.equal(value(*(p.data for p in params)), torch.tensor([[7.0, 12.0], [8.0, 17.0]]))
    params, value = plan["layers.0.out.weight"]  # not a target: written as it is
    assert torch.equal(value(*(p.data for p in params)), params[0].data)
    # Only the adapter is trained.
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "base_model.model.layers.0.q_proj.lora_A.default.weight",
        "base_model.model.layers.0.q_proj.lora_B.default.weight",
    ]


def test_adapter_and_base_names():
    from learner.lora import adapter_name, base_name, is_adapter_param

    peft = "base_model.model.model.layers.3.self_attn.q_proj.lora_B.default.weight"
    assert is_adapter_param(peft)
    assert (
        adapter_name(peft) == "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
    )  # PEFT's file
    assert base_name("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == (
        "model.layers.3.self_attn.q_proj.weight"
    )
    assert not is_adapter_param("base_model.model.model.norm.weight")


def test_target_modules_default_to_the_block_projections_and_bad_ones_are_refused():
    from learner.lora import resolve_targets

    toy = _Toy()
    assert resolve_targets(toy, 2, None) == ["out", "q_proj"]  # the output layer is not a target
    with pytest.raises(
        ValueError, match=r"learner.lora.target_modules: _Toy has no linear layer named 'k_proj'"
    ):
        resolve_targets(toy, 2, ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match=r"learner.lora.target_modules: 'lm_head' is the model's embedding"):
        resolve_targets(toy, 2, ["lm_head"])
    # q_proj is 2 x 2: a rank-3 adapter cannot be smaller than the layer it adapts.
    with pytest.raises(ValueError, match=r"learner.lora.rank=3 is larger than the q_proj layers allow \(2"):
        resolve_targets(toy, 3, ["q_proj"])


def test_lora_config_fields():
    cfg = load_config(overrides=["learner.lora.rank=16"])
    assert cfg.learner.lora.enabled and cfg.learner.lora.alpha == 32.0 and cfg.learner.lora.scaling == 2.0
    assert cfg.learner.lora.dropout == 0.0  # train-mode log-probs equal the engine's
    assert not Config().learner.lora.enabled  # off by default
    # The engine serves the smallest rank vLLM accepts at or above the adapter's.
    assert [LoraConfig(rank=r).engine_max_rank() for r in (1, 2, 16, 17, 512)] == [1, 8, 16, 32, 512]
    assert ENGINE_LORA_RANKS[-1] == 512
    with pytest.raises(ConfigError, match=r"learner.lora.rank"):
        load_config(overrides=["learner.lora.rank=513"])
    with pytest.raises(ConfigError, match=r"learner.lora.dropout"):
        load_config(overrides=["learner.lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules"):
        load_config(overrides=["learner.lora.target_modules=[]"])


def test_nccl_engines_accept_the_fleet_clients_init_info():
    """The fleet client adds `transport` and `adapter` to every engine's init info (duet_host and duet_nccl
    alike); vLLM's own NCCL init info has neither and refused them: on GPUs no engine could join."""
    from actors.weight_receiver import DuetNCCLWeightTransferEngine

    payload = {
        "master_address": "10.0.0.1",
        "master_port": 29500,
        "rank_offset": 1,
        "world_size": 2,
        "transport": "network",
        "adapter": '{"r": 8}',
    }
    info = DuetNCCLWeightTransferEngine.parse_init_info(DuetNCCLWeightTransferEngine, payload)
    assert (info.master_port, info.rank_offset, info.adapter) == (29500, 1, '{"r": 8}')


def test_a_lora_resume_of_a_full_weight_checkpoint_is_refused():
    from pathlib import Path

    from cluster.checkpoints import check_resumable

    cfg = load_config(overrides=["learner.lora.rank=8", "learner.lora.target_modules=[q_proj]"])
    folder = Path(__import__("tempfile").mkdtemp())
    (folder / "driver_state.json").write_text(json.dumps({"learner": {"zero_stage": 0, "num_ranks": 1}}))
    with pytest.raises(
        ConfigError, match=r"written with learner.lora.rank=0 .* asks for learner.lora.rank=8"
    ):
        check_resumable(folder, cfg)
    state = {"learner": {"zero_stage": 0, "num_ranks": 1, "lora_rank": 8, "lora_targets": ["q_proj"]}}
    (folder / "driver_state.json").write_text(json.dumps(state))
    check_resumable(folder, cfg)  # the same setting resumes


# ---------------------------------------------------------------- the real stack
LORA_RUN = [
    "train.steps=4",
    "rollout.prompts_per_step=8",
    "checkpoint.every_steps=1",
    "run.progress=false",
    "run.dashboard=false",
    "run.ray_metrics=false",
    "rewards.num_workers=1",
    "algorithm.extend_tied_to=8",  # check_equals_straight_run compares the extension decisions too
    "train.check_weights_every_steps=1",  # every adapter update byte-checked
    "learner.lora.rank=8",
    "learner.lr=0.005",  # the adapter moves well away from the base in four steps (KL ~0.07), still learning
    "algorithm.kl_coef=0.05",  # its reference: the base model, the adapter switched off
]


@pytest.mark.integration
@pytest.mark.slow
def test_lora_run_moves_checks_and_serves_the_adapter_and_resumes_exactly(tmp_path, model_cache, tiny_model):
    """Two runs side by side: one straight, one SIGKILLed (with its Ray) after step 2's checkpoint and
    resumed. Every step: rewards, an adapter update of the adapter's bytes only (under a tenth of the
    model's), the bytes each engine loaded hashed equal to the learner's, the engine at the new version.
    The engine serves the adapter: its log-probs of its own samples equal the learner's adapted policy
    within the full-weight tolerance (1e-3) after several updates, while the KL of that policy to the base
    model (adapter off: the reference) is far larger. The resumed run equals the straight one; the exports
    (PEFT adapter, merged model) load in PEFT and transformers to the same model, and `duet eval` takes
    either."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cluster.metrics import read_metrics
    from tests.helpers import kill_group, run_duet, start_train
    from tests.test_crash_consistency import (
        check_after_kill,
        check_equals_straight_run,
        check_finished,
        complete_checkpoints,
        launch,
    )

    run, straight = tmp_path / "run", tmp_path / "straight"
    ref = start_train(straight, *LORA_RUN, model_cache=model_cache)
    try:
        fault = "checkpoint.after_rename:2"
        rc, err = launch(run, "--run-dir", str(run), *LORA_RUN, fault=fault, model_cache=model_cache)
        check_after_kill(run, rc, err, fault)
        rc, err = launch(run, "--resume", str(run), fault=None, model_cache=model_cache)
        assert rc == 0, err[-3000:]
        assert "resuming from" in err and "(step 2)" in err, err[-3000:]
        _, ref_err = ref.communicate(timeout=300)
        assert ref.returncode == 0, ref_err[-3000:]
    finally:
        kill_group(ref)
    check_finished(run, LORA_RUN)
    check_equals_straight_run(run, straight)

    final = complete_checkpoints(straight)[-1]
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    model_bytes = sum(
        t.numel() * t.element_size() for t in load_file(final / "hf" / "model.safetensors").values()
    )
    metrics = read_metrics(straight)
    assert all(m["reward/mean"] is not None for m in metrics)
    trained = [m for m in metrics if "train/loss" in m]  # (a step whose pairs all tie sends nothing)
    for m in trained:
        assert m["sync/bytes"] == adapter_bytes < model_bytes / 10, (
            m["sync/bytes"],
            adapter_bytes,
            model_bytes,
        )
        assert m["sync/checksum_match"] is True and m["sync/engine_versions"] == [m["policy_version"]]
    late = [m for m in trained if m["policy_version"] >= 3]  # sampled after two adapter updates or more
    assert late, [m["policy_version"] for m in trained]
    for m in late:
        assert m["train/logprob_gap"] < 1e-3, m["train/logprob_gap"]
        assert m["train/kl"] > 20 * max(m["train/logprob_gap"], 1e-4), (m["train/kl"], m["train/logprob_gap"])
    config = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(tiny_model.resolve())
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    # The two exports are one model: PEFT's merge of the adapter onto the base equals the merged hf/.
    ids = torch.tensor([[1, 5, 9, 13, 4, 7]])
    merged = AutoModelForCausalLM.from_pretrained(final / "hf")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload()
    with torch.no_grad():
        assert (merged(ids).logits - peft(ids).logits).abs().max() < 1e-4
        assert (
            merged(ids).logits - AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        ).abs().max() > 1e-2

    data = tmp_path / "heldout.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in [(1, 2), (3, 4)]
        )
    )
    results = {}
    for what in ("adapter", "hf"):
        out = tmp_path / f"eval-{what}.json"
        args = ("--model", str(final / what), "--dataset", str(data), "--out", str(out))
        proc = run_duet("eval", *args, "eval.samples_per_prompt=1", "eval.temperature=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[what] = json.loads(out.read_text())
    assert results["adapter"]["adapter"] == str((final / "adapter").resolve())
    assert results["adapter"]["model"] == str(tiny_model.resolve())
    # Greedy answers of the base served with the adapter = those of the merged model.
    assert results["adapter"]["overall"]["avg@n"] == results["hf"]["overall"]["avg@n"]


@pytest.mark.integration
def test_nccl_engine_keeps_an_adapter_update_out_of_the_model_and_checks_its_bytes(monkeypatch):
    """vLLM's NCCL engines at both ends (duet's subclasses; the GPU parts stood in for as in
    test_gpu_readiness): in LoRA mode what arrives is kept as the adapter, byte-checked like full
    weights, and the served model receives nothing and opens no layerwise reload."""
    from learner.weight_sender import send
    from tests.test_gpu_readiness import _nccl_pair, _stub_gpu, _Wire

    _stub_gpu(monkeypatch)
    reloads: list[str] = []
    from vllm.model_executor.model_loader import reload

    monkeypatch.setattr(reload, "initialize_layerwise_reload", lambda model: reloads.append("start"))
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8))
    sender, receiver, target, handle = _nccl_pair(module, _Wire(), True, 256)
    receiver.adapter, receiver.adapter_tensors = '{"r": 4}', {}
    sent = send(sender, 5, checksum=True, timeout_s=10.0)
    assert sent["digest"] is not None and receiver.last_digest == sent["digest"]
    assert sent["bytes"] == sum(p.numel() * 4 for p in module.parameters())
    assert handle.versions == ["5"]
    assert sorted(receiver.adapter_tensors) == sorted(n for n, _ in module.named_parameters())
    assert all(torch.equal(receiver.adapter_tensors[n], p) for n, p in module.named_parameters())
    assert target.calls == [] and reloads == []


def _lora_rank(rank: int, world: int, stage: int, port: int, model: str, out: str) -> None:
    """One LoRA LearnerRank of `world` at ZeRO `stage`, in a process of its own (spawned)."""
    import os
    from pathlib import Path

    os.environ["DS_ACCELERATOR"] = "cpu"
    from cluster.config import Config
    from learner.lora import targets_of
    from learner.rank import LearnerRank

    cfg = Config.model_validate(
        {
            "learner": {
                "zero_stage": stage,
                "num_ranks": world,
                "lr": 1e-2,
                "zero3_persistence_threshold": 0,
            },
            "algorithm": {"kl_coef": 0.1},  # the reference: the same model, adapter off
        }
    )
    cfg.learner.lora = LoraConfig(rank=4, alpha=8.0, target_modules=targets_of(model, 4, None))
    r = LearnerRank(rank, world, cfg, model, "cpu", 1)
    if rank == 0:
        r.store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False)
    r.join("127.0.0.1", port, timeout_s=120)
    base_before = r.full_state_dict()
    rows = [{"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10, 11], "behaviour_logprobs": [-1.0] * 4,
             "advantage": a, "keep": True} for a in (1.0, -1.0)]  # fmt: skip
    stats = [r.train_step(rows, 8.0, 1) for _ in range(3)]
    r.save_checkpoint(f"{out}/ckpt", "state", {"step": 3})
    adapter = r.adapter_state_dict()
    r.export_adapter(f"{out}/adapter")
    r.export_hf(f"{out}/hf", model)
    merged = r.full_state_dict()
    r.perturb(0.5, seed=1)
    r.load_checkpoint(f"{out}/ckpt", "state")
    restored = r.adapter_state_dict()
    if rank == 0:
        result = {
            "kl": [s["train/kl"] for s in stats],
            "restored": all(torch.equal(adapter[k], restored[k]) for k in adapter),
            "changed": sorted(k for k in merged if not torch.equal(merged[k], base_before[k])),
            "optimizer_files": sorted(p.name for p in Path(f"{out}/ckpt").rglob("*optim_states.pt")),
            "optimizer_bytes": sum(p.stat().st_size for p in Path(f"{out}/ckpt").rglob("*optim_states.pt")),
            # fp32 master weights and Adam's two moments of every parameter: what full training would hold
            "full_optimizer_bytes": 12 * sum(v.numel() for v in base_before.values()),
        }
        Path(f"{out}/result.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_lora_learner_at_zero_stage_over_two_ranks(tmp_path, tiny_model, stage):
    """Two gloo ranks at ZeRO-2 and ZeRO-3 (every parameter partitioned): three steps change the adapted
    projections only (the merged weights of the other layers are the base's), the KL to the base (adapter
    off) grows from 0, the checkpoint restores the adapter exactly after it was perturbed (its optimizer
    state partitioned per rank), and the exports agree: PEFT's merge of the adapter folder onto the base
    is the merged hf/ export."""
    import multiprocessing

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers import free_port, run_ranks

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_lora_rank, args=(r, 2, stage, port, str(tiny_model), str(tmp_path)))
        for r in (0, 1)
    ]
    assert run_ranks(procs, timeout_s=300) == [0, 0], "rank exit codes (-9: killed after 300 s); stderr above"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["kl"][0] == 0.0 and result["kl"][-1] > 0.0, result["kl"]
    assert result["restored"]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert result["changed"] and all(k.split(".")[-2] in targets for k in result["changed"]), result[
        "changed"
    ]
    assert len(result["optimizer_files"]) == 2, result["optimizer_files"]  # one partition per rank
    assert all(f.startswith("zero_pp_rank_") for f in result["optimizer_files"]), result["optimizer_files"]
    # optimizer state for the adapter only: a small fraction of what full weights would need
    assert result["optimizer_bytes"] < 0.1 * result["full_optimizer_bytes"], result
    ids = torch.tensor([[1, 5, 9, 13, 4, 7]])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    with torch.no_grad():
        assert (merged(ids).logits - peft.merge_and_unload()(ids).logits).abs().max() < 1e-4
