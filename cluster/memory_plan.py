"""What a colocated learner needs of its GPU (cluster.colocate), from the model's config alone.

A colocated run puts the engine and the one learner rank on one GPU: vLLM takes
`rollout.gpu_memory_utilization` of the GPU's memory, the learner what it holds at its ZeRO stage and
dtype. Preflight (cluster/preflight.py) compares the two with the GPU's memory before anything starts, so a
plan that cannot fit fails in seconds with the numbers, instead of as a CUDA out-of-memory error minutes in.

The parameter count comes from the model's config.json: the model is built on PyTorch's meta device
(shapes, no storage, no weights read), so it is exact for any architecture transformers knows, including
tied embeddings, and costs a second or two for a 7B config. The learner's bytes follow DeepSpeed's
mixed-precision layout (the ZeRO paper's accounting), per rank:
- weights: params × dtype bytes (partitioned over the ranks at ZeRO-3);
- gradients: params × (4 when half-precision gradients are summed in float32, learner.grad_accum_dtype,
  else dtype bytes) (partitioned at ZeRO-2/3);
- optimizer state: AdamW's two moments in float32 (8 bytes), plus a float32 master copy of the weights
  when the model is bf16/fp16 (4 bytes) (partitioned at ZeRO-1/2/3);
- the KL reference model (algorithm.kl_coef > 0): params × dtype bytes, whole on every rank.
Activations, the log-prob head's chunks and CUDA's own context come on top: the estimate is a floor.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.config import Config

GIB = 1 << 30


def count_parameters(model_path: str | None) -> int:
    """The model's parameter count from its config.json (a folder or a hub id; None: the embedded tiny
    model), without reading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_path is None:
        from learner.tiny_model import tiny_config

        config = tiny_config()
    else:
        config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # a tied parameter once


@dataclass
class LearnerBytes:
    """One learner rank's GPU memory before activations, in bytes."""

    weights: int
    gradients: int
    optimizer: int
    reference: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference


def learner_bytes(cfg: Config, params: int) -> LearnerBytes:
    """What one rank of `cfg`'s learner holds on its GPU for a model of `params` parameters (see the module's
    docstring for the layout)."""
    lr, dtype = cfg.learner, cfg.model.dtype
    width = 4 if dtype == "float32" else 2
    ranks, stage = lr.num_ranks, lr.zero_stage
    grad_width = 4 if width == 2 and lr.grad_accum_dtype == "float32" else width
    optimizer_width = 8 + (4 if width == 2 else 0)
    return LearnerBytes(
        weights=params * width // (ranks if stage >= 3 else 1),
        gradients=params * grad_width // (ranks if stage >= 2 else 1),
        optimizer=params * optimizer_width // (ranks if stage >= 1 else 1),
        reference=params * width if cfg.algorithm.kl_coef > 0 else 0,
    )


def colocated_shortfall(cfg: Config, params: int, gpu_bytes: int) -> str | None:
    """Why the colocated learner and engine cannot share a GPU of `gpu_bytes`, with the numbers; None when
    they fit."""
    need = learner_bytes(cfg, params)
    util = cfg.rollout.gpu_memory_utilization
    engine = int(util * gpu_bytes)
    if need.total + engine <= gpu_bytes:
        return None
    room = (gpu_bytes - need.total) / gpu_bytes

    def g(n: int) -> str:
        return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"

    count = f"{params / 1e9:.2f} B" if params >= 10**9 else f"{params / 1e6:.1f} M"

    hint = (
        f"lower rollout.gpu_memory_utilization to at most {room:.2f}"
        if room > 0.05
        else "the learner alone does not fit: a smaller model, or cluster.colocate=false"
    )
    return (
        f"cluster.colocate: the learner and vLLM do not fit one GPU of {g(gpu_bytes)}. The learner rank "
        f"holds {g(need.total)} before activations ({count} parameters in {cfg.model.dtype} at "
        f"ZeRO-{cfg.learner.zero_stage}: weights {g(need.weights)}, gradients {g(need.gradients)}, AdamW state "
        f"{g(need.optimizer)}" + (f", KL reference {g(need.reference)}" if need.reference else "") + "); "
        f"vLLM takes rollout.gpu_memory_utilization={util} of the GPU, {g(engine)}: {g(need.total + engine)} "
        f"in all. Fix: {hint}."
    )
