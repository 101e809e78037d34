"""LoRA adapters through PEFT: which layers get one, the learner's model wrapped, the adapter's own names
and files, and the merged weights of an export.

The learner trains W' = W + (alpha / r) · B A on the target layers (A: r × in, B: out × r, B starts at 0, so
version 0 is the base model); only A and B get gradients and optimizer state. What moves to the engines
after a step is A and B under PEFT's saved names (`adapter_name`), which vLLM's LoRA loader reads; what an
export writes is that adapter in PEFT's format and, beside it, the merged W' under the base model's names.
Nothing here imports the cluster layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER = "default"  # PEFT's adapter name inside the learner's model
ENGINE_LORA_NAME = "duet"  # the adapter's name and id in the engines (one adapter, replaced in place)
ENGINE_LORA_ID = 1
# Layers neither the learner nor vLLM's LoRA can adapt: the output layer is the learner's CompletionHead
# (learner/logprobs.py) and vLLM's LoRA for embeddings is another code path with its own limits.
_NOT_TARGETS = ("lm_head", "embed_tokens", "wte", "wpe")


def linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per leaf name (q_proj, ...), the smallest (in_features, out_features) seen among the model's linear
    layers of that name, its output layer excepted."""
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not out_layer:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _NOT_TARGETS:
                continue
            prev = found.get(leaf, (module.in_features, module.out_features))
            found[leaf] = (min(prev[0], module.in_features), min(prev[1], module.out_features))
    return found


def resolve_targets(model: nn.Module, rank: int, targets: list[str] | None) -> list[str]:
    """The target layers for `model`: `targets` checked (each a linear layer of the model, `rank` at most the
    smaller side of every one), or by default every linear layer of its decoder blocks. Raises ValueError
    naming the field (learner.lora.target_modules or learner.lora.rank)."""
    layers = linear_layers(model)
    if targets is None:
        targets = sorted(layers)
        if not targets:
            raise ValueError(
                f"learner.lora.target_modules: {type(model).__name__} has no linear layers to adapt"
            )
    for t in targets:
        if t in _NOT_TARGETS:
            raise ValueError(
                f"learner.lora.target_modules: {t!r} is the model's embedding or output layer; duet-rl adapts "
                "linear layers inside the decoder blocks only (the learner's output layer is its completion "
                "head, and vLLM's LoRA serves those through another path)"
            )
        if t not in layers:
            raise ValueError(
                f"learner.lora.target_modules: {type(model).__name__} has no linear layer named {t!r}; "
                f"it has {', '.join(sorted(layers))}"
            )
        smallest = min(layers[t])
        if rank > smallest:
            raise ValueError(
                f"learner.lora.rank={rank} is larger than the {t} layers allow ({smallest}, the smaller of "
                f"their input and output sizes {layers[t]}): lower the rank or drop {t} from "
                "learner.lora.target_modules"
            )
    return list(targets)


def targets_of(model_path: str, rank: int, targets: list[str] | None) -> list[str]:
    """`resolve_targets` for the model at `model_path`, built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return resolve_targets(model, rank, targets)


def peft_config(rank: int, alpha: float, dropout: float, targets: list[str], base_model: str = "") -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",  # vLLM serves no adapter biases
        task_type="CAUSAL_LM",
        # Absolute: `duet eval` of the adapter folder finds its base model from there.
        base_model_name_or_path=str(Path(base_model).resolve())
        if base_model and Path(base_model).exists()
        else None,
    )


def wrap(model: nn.Module, config: Any) -> nn.Module:
    """`model` with PEFT adapters on the target layers; every other parameter frozen."""
    from peft import get_peft_model

    return get_peft_model(model, config, adapter_name=ADAPTER)


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_name(name: str) -> str:
    """A PEFT parameter's name as PEFT saves it (and vLLM loads it): the adapter's own name dropped,
    `base_model.model.….q_proj.lora_A.default.weight` → `base_model.model.….q_proj.lora_A.weight`."""
    return name.replace(f".{ADAPTER}.", ".")


def base_name(name: str) -> str:
    """A PEFT model's parameter under the base model's own name (what an HF export writes)."""
    prefix = "base_model.model."
    if name.startswith(prefix):
        name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def config_json(config: Any) -> str:
    """adapter_config.json as PEFT writes it."""
    d = config.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    return json.dumps(d, indent=2, sort_keys=True, default=str) + "\n"


def write_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], config_text: str) -> Path:
    """A PEFT adapter folder (adapter_model.safetensors and adapter_config.json), written to a temporary name
    and renamed, so a reader never sees half of it."""
    import os
    import shutil

    from safetensors.torch import save_file

    final = Path(directory)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(config_text)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> tuple[str, int]:
    """An adapter folder's base model folder and rank, from its adapter_config.json. Raises ValueError when
    the base model it names is not a folder here."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path") or ""
    if not (Path(base) / "config.json").is_file():
        raise ValueError(
            f"{path} is a LoRA adapter of base model {base!r}, which is not a model folder on this machine: "
            "evaluate the merged export beside it (hf/) instead, or copy the base model there"
        )
    return base, int(config["r"])


def export_plan(model: nn.Module) -> list[tuple[str, list[nn.Parameter], Any]]:
    """What a merged export writes, in the model's parameter order: per base-model tensor, its HF name, the
    parameters it is computed from, and a function of those (already whole) to the tensor itself. An adapted
    layer's weight is W + scaling · B A; the adapter's own parameters are not written; a tied weight once."""
    adapted: dict[int, Any] = {}  # id(base weight) -> its LoRA layer
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            adapted[id(module.base_layer.weight)] = module
    plan = []
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            continue
        layer = adapted.get(id(p))
        if layer is None:
            plan.append((base_name(name), [p], lambda w: w))
            continue
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        scale = layer.scaling[ADAPTER]

        def merged(w, a, b, scale=scale):
            delta = (b.float() @ a.float()) * scale
            return (w.float() + delta).to(w.dtype)

        plan.append((base_name(name), [p, a, b], merged))
    return plan


def adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The adapter's parameters under their saved names, in the model's order."""
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            yield adapter_name(name), p
