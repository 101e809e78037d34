"""The one config schema of duet-rl.

Every field is documented and validated here; a bad value fails before any actor starts, with the
dotted name of the field in the message. Load from YAML, apply a preset, then `a.b=value` overrides.
"""

from __future__ import annotations

import argparse
import copy
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Allowed values, named once: the pure functions that take them (learner/advantages.py, learner/losses.py)
# check their arguments against `typing.get_args` of these.
AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo"]
StdKind = Literal["population", "sample"]
StdScale = Literal["group", "batch", "none"]
KlEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
OverlongMode = Literal["none", "mask", "penalty"]

# The same shape rewards.verifiers.load_custom accepts (kept here: the schema imports no runtime code).
_CUSTOM_FUNCTION = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Section):
    """How an engine samples. Training rollouts (`rollout.*`) and evaluation (`eval.*`, its own defaults)
    hold these fields; `sampling()` hands just them to `RolloutEngine.generate`."""

    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling (-1: off).")
    max_tokens: int = Field(16, ge=1, description="Largest completion length, in tokens.")

    def sampling(self) -> SamplingConfig:
        """The sampling settings alone (what crosses to the engines), whichever section holds them."""
        return SamplingConfig(**{name: getattr(self, name) for name in SamplingConfig.model_fields})


class DatasetFields(_Section):
    """Where a dataset row keeps its problem, its reference answer and its source (training and eval)."""

    problem_field: str = Field("problem", description="Field holding the problem text.")
    answer_field: str = Field("answer", description="Field holding the reference answer.")
    source_field: str = Field(
        "source", description="Field naming the data source (optional in rows; per-source metrics)."
    )


class RunConfig(_Section):
    seed: int = Field(0, description="Seed for the dataset order, sampling and the learner.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA + NCCL when the Ray cluster has a GPU on any node, else CPU + gloo."
    )
    run_dir: str | None = Field(None, description="Output folder; default: a new folder under runs/.")
    progress: bool = Field(True, description="Show a progress line per step on stderr.")
    ray_metrics: bool = Field(True, description="Export metrics through ray.util.metrics (Ray dashboard).")
    cpu_cores: int | None = Field(
        None, ge=1, description="CPU cores to plan with on CPU runs; default: os.cpu_count()."
    )
    dashboard: bool = Field(
        True,
        description="Start Ray's dashboard (on 127.0.0.1, with Ray's token authentication) when the run "
        "starts its own local Ray; its URL is printed and written to RUN_DIR/dashboard.json. A cluster's "
        "dashboard (RAY_ADDRESS, `duet submit`) is the head's.",
    )
    dashboard_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the local dashboard; None: 8265, or the next free one when it is taken.",
    )
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers fed each step's metrics (metrics.jsonl is always written). "
        "wandb and mlflow are optional extras (`pip install duet-rl[wandb]`, `[mlflow]`) and read their "
        "usual environment (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, ...).",
    )
    tracker_project: str = Field(
        "duet-rl", min_length=1, description="W&B project and MLflow experiment the runs are logged under."
    )

    @model_validator(mode="after")
    def _no_repeated_logger(self) -> RunConfig:
        repeated = sorted({name for name in self.loggers if self.loggers.count(name) > 1})
        if repeated:
            raise ValueError(f"run.loggers: {', '.join(repeated)} named more than once")
        return self


class ModelConfig(_Section):
    path: str | None = Field(
        None,
        description="Hugging Face model folder or hub id. None: build (once, cached) the tiny offline "
        "Llama and warm-start it on the synthetic task (with an environment, env.name != none: on the "
        "tool-call format of the multiplication task, envs/task.py).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype in the engines and the learner."
    )
    cache_dir: str = Field(
        "~/.cache/duet-rl", description="Where the tiny model and its warm start are cached."
    )
    warm_start_steps: int = Field(
        120, ge=0, description="Supervised steps that warm-start the tiny model (0: none)."
    )


class DataConfig(DatasetFields):
    path: str | None = Field(
        None, description="JSONL or Parquet file of problems. None: the synthetic arithmetic task."
    )
    prompt_template: str = Field(
        "{problem}", description="Python format string that turns a problem into the engine's prompt."
    )
    synthetic_problems: int = Field(
        2000, ge=1, description="Number of synthetic problems (when path is None)."
    )
    synthetic_max_operand: int = Field(9, ge=1, description="Largest operand of the synthetic additions.")
    synthetic_task: Literal["add", "multiply"] | None = Field(
        None,
        description="The synthetic task (when path is None): add (a+b, operands up to synthetic_max_operand) "
        "or multiply (a three-digit by a two-digit number: the tool task, which the tiny model cannot do "
        "without its tool). Default (filled in when the config is loaded): multiply with an environment "
        "(env.name != none), else add.",
    )
    shuffle: bool = Field(True, description="Shuffle the prompt order each epoch (seeded).")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, template: str) -> str:
        check_prompt_template(template)
        return template


def check_prompt_template(template: str) -> None:
    """The template may name {problem} and nothing else; literal braces (LaTeX's \\boxed{}) are doubled."""
    hint = "write literal braces doubled, e.g. 'Put the answer in \\boxed{{}}: {problem}'"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # a lone '{' or '}'
        raise ValueError(f"{e}; {hint}") from None
    for name in fields:
        if name != "problem":
            what = "an empty {}" if name == "" else f"{{{name}}}"
            raise ValueError(f"has {what}, but the only placeholder is {{problem}}; {hint}")
    if "problem" not in fields:
        raise ValueError("has no {problem} placeholder: the prompt would not contain the problem")
    try:
        template.format(problem="1+1=")
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"cannot be applied ({e}); {hint}") from None


class RolloutConfig(SamplingConfig):
    """Training rollouts; the sampling fields (temperature, top_p, top_k, max_tokens) come from
    SamplingConfig with its defaults."""

    num_engines: int = Field(1, ge=1, description="Number of RolloutEngine actors (vLLM engines).")
    max_engines: int | None = Field(
        None,
        ge=1,
        description="Most engines the control API may scale to (`duet scale`); default: as many engine "
        "bundles as the cluster's resources hold when the run starts (at least num_engines).",
    )
    gpus_per_engine: int = Field(
        1,
        ge=1,
        description="GPUs per engine = its tensor parallel size (vLLM's mp executor, one worker per GPU); "
        "on CPU: that many vLLM worker processes, a core each.",
    )
    group_size: int = Field(2, description="Completions per prompt (G). 2 is 2-GRPO; must be >= 2.")
    prompts_per_step: int = Field(64, ge=1, description="Prompts whose groups make one optimizer step.")
    max_model_len: int = Field(256, ge=16, description="Prompt + completion length limit, in tokens.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="Share of each engine GPU's memory vLLM may take."
    )
    gpu_memory_wait_s: float = Field(
        120.0,
        ge=0.0,
        description="On GPUs: longest wait, in seconds, of a starting engine for its GPUs to have the free memory "
        "vLLM asks at start (gpu_memory_utilization of each GPU's total), e.g. while the memory of an engine "
        "killed on that GPU is given back; past it the engine fails naming the GPU, the numbers and the "
        "processes holding it. 0: no wait (vLLM's own check decides at once).",
    )
    cpu_kvcache_gib: int = Field(
        1, ge=1, description="KV cache per engine on CPU, in GiB (whole GiB: vLLM reads an int)."
    )
    cpu_threads_bind: str = Field(
        "auto",
        description="vLLM CPU thread binding: 'auto' gives each engine its own cores, "
        "else passed as VLLM_CPU_OMP_THREADS_BIND (e.g. '0-1', 'nobind').",
    )
    enforce_eager: bool = Field(True, description="Skip CUDA graphs / compilation (fast start).")

    @field_validator("cpu_threads_bind")
    @classmethod
    def _core_list(cls, value: str) -> str:
        """vLLM reads it at engine start, deep in a Ray actor: a typo must fail here, naming the field."""
        cores = r"\d+(-\d+)?(,\d+(-\d+)?)*"
        if value not in ("auto", "nobind") and not re.fullmatch(rf"{cores}(\|{cores})*", value):
            raise ValueError(
                f"{value!r} is not 'auto', 'nobind' or a core list such as '0-1', '0,2-3' or '0-1|2-3' "
                "(one list per tensor-parallel worker)"
            )
        return value

    cpu_executor: Literal["uni", "mp"] = Field(
        "uni",
        description="vLLM executor of a single-worker engine on CPU: 'uni' runs vLLM's worker inside its "
        "engine-core process, as vLLM does for such an engine on a GPU; 'mp' starts it as a process of its "
        "own (`VLLM::Worker`, vLLM's CPU default), one more vLLM start per engine (about 12 s on 2 cores). "
        "Tensor-parallel engines always run 'mp'.",
    )
    stall_check_s: float = Field(
        20.0,
        gt=0.0,
        description="Seconds without a new group (async mode) or a generated chunk (sync mode) after which "
        "every engine, and vLLM's engine core under it, is asked whether it still answers (10-s and 5-s "
        "deadlines); one that does not (hung, stopped, cut off) is replaced and its prompts generated again.",
    )

    @model_validator(mode="after")
    def _group(self) -> RolloutConfig:
        if self.group_size < 2:
            raise ValueError(
                f"rollout.group_size must be >= 2 (got {self.group_size}): a group of one has no "
                "baseline, so its advantage is always zero"
            )
        return self


class RewardsConfig(_Section):
    num_workers: int = Field(2, ge=1, description="RewardPool size (Ray actors), independent of engines.")
    timeout_s: float = Field(
        5.0, gt=0.0, le=5.0, description="Hard per-item time limit; the child process is killed past it."
    )
    memory_limit_mib: int = Field(
        1024, ge=64, description="Address-space cap of each verifier child process, in MiB."
    )
    max_completion_chars: int = Field(
        20000, ge=1, description="Longer completions score 0 as too_long without being parsed."
    )
    math_weight: float = Field(1.0, ge=0.0, description="Weight of the math-verify reward.")
    format_weight: float = Field(
        0.0, ge=0.0, description="Weight of the format reward (exactly one \\boxed{...})."
    )
    custom_function: str | None = Field(
        None, description="'package.module:function' used as the 'custom' verifier."
    )
    verifier: Literal["math", "custom", "remote"] = Field(
        "math", description="Verifier used for training rewards."
    )
    remote_url: str | None = Field(
        None, description="Base URL (http:// or https://) of a duet reward server; needed by verifier=remote."
    )
    remote_token: str | None = Field(
        None,
        description="Refused when set: a token written here shows in config files, `ps` and job entrypoints, "
        "and --resume loses it. Use remote_token_file or remote_token_env. (Kept so older configs load.)",
    )
    remote_token_file: str | None = Field(
        None,
        description="File whose first line is the remote server's bearer token (read by the driver at start, "
        "so a resumed run reads it again). Takes precedence over remote_token_env.",
    )
    remote_token_env: str = Field(
        "DUET_REWARD_TOKEN",
        description="Environment variable of the driver holding the remote server's bearer token. Unset "
        "variable: no token, unless the name was changed from the default (then it is an error).",
    )
    remote_concurrency: int = Field(4, ge=1, description="Concurrent requests to the remote server.")
    remote_retries: int = Field(2, ge=0, description="Retries per remote request.")
    percent_as_fraction: bool = Field(
        True, description="Score '50\\%' equal to '0.5' (math-verify's percentage handling)."
    )
    answer_extraction: Literal["last_boxed", "math_verify"] = Field(
        "last_boxed",
        description="How the math verifier finds the answer: the last \\boxed{...} (no box: no_answer), "
        "or math-verify's own extraction over the whole completion (LaTeX, 'final answer is', numbers).",
    )
    sandbox_env: tuple[str, ...] = Field(
        (),
        description="Names of environment variables passed on to the verifier child processes. They get a "
        "minimal environment (PATH, HOME, locale, PYTHONPATH...), never the driver's tokens.",
    )

    @model_validator(mode="after")
    def _verifier_needs(self) -> RewardsConfig:
        if self.verifier == "custom" and not self.custom_function:
            raise ValueError(
                "rewards.custom_function must be set when rewards.verifier=custom (every reward would be "
                "an error): give rewards.custom_function=package.module:function, or choose verifier=math"
            )
        if self.custom_function is not None and not _CUSTOM_FUNCTION.match(self.custom_function):
            raise ValueError(
                f"rewards.custom_function must look like 'package.module:function', got "
                f"{self.custom_function!r}"
            )
        if self.verifier == "remote" and not self.remote_url:
            raise ValueError(
                "rewards.remote_url must be set when rewards.verifier=remote (every reward would be an "
                "error): give the URL of a `duet serve-reward` server, e.g. rewards.remote_url=http://host:8765"
            )
        if self.remote_url is not None and not self.remote_url.startswith(("http://", "https://")):
            raise ValueError(
                f"rewards.remote_url must start with http:// or https://, got {self.remote_url[:80]!r}"
            )
        if self.remote_token is not None:
            raise ValueError(
                "rewards.remote_token is not accepted: a token in the config shows in config files, in `ps` "
                "and in the job's entrypoint, and --resume would lose it. Put it in a file and set "
                "rewards.remote_token_file=PATH, or in an environment variable of the driver and set "
                "rewards.remote_token_env=NAME (default DUET_REWARD_TOKEN)"
            )
        if not _ENV_NAME.match(self.remote_token_env):
            raise ValueError(
                f"rewards.remote_token_env must be an environment variable name, got {self.remote_token_env!r}"
            )
        for name in self.sandbox_env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"rewards.sandbox_env: {name!r} is not an environment variable name")
        return self


class AlgorithmConfig(_Section):
    advantage: AdvantageEstimator = Field("grpo", description="Advantage estimator (see README, Algorithm).")
    std: StdKind = Field(
        "population", description="grpo only: population std (paper) or Bessel's (veRL, TRL)."
    )
    scale: StdScale = Field("group", description="grpo only: which rewards the std is taken over.")
    eps: float = Field(1e-6, ge=0.0, description="Added to the std in grpo's denominator.")
    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="Ratio lower bound is 1 - clip_low.")
    clip_high: float = Field(0.28, ge=0.0, description="Ratio upper bound is 1 + clip_high.")
    dual_clip: float | None = Field(
        None, gt=1.0, description="Dual-clip bound c for negative advantages (None: off)."
    )
    kl_coef: float = Field(0.0, ge=0.0, description="β of the KL term; 0 loads no reference model.")
    kl_estimator: KlEstimator = Field("k3", description="KL estimator.")
    tis_cap: float | None = Field(
        None, gt=0.0, description="Truncated importance weight cap between engine and learner log-probs."
    )
    aggregation: Aggregation = Field(
        "seq_mean_token_mean", description="How per-token losses become one number."
    )
    length_norm: int | None = Field(
        None,
        ge=1,
        description="Constant of seq_mean_token_sum_norm; default (filled in when the config is loaded): "
        "rollout.max_tokens.",
    )
    filter_tied: bool = Field(True, description="Drop groups whose rewards all tie (no gradient).")
    refill: bool = Field(
        False, description="Replace dropped groups with fresh prompts so the batch keeps its size."
    )
    max_refill_rounds: int = Field(4, ge=1, description="Refill generation rounds per step, at most.")
    extend_tied_to: int = Field(
        0,
        ge=0,
        description="Pair-aware sampling (0: off). A group whose rewards all tie gets more rollouts of its "
        "prompt, doubling from rollout.group_size (2, 4, 8 ...) up to this many, until its rewards differ; "
        "the learner then trains on one disagreeing pair drawn from it (docs/algorithm.md), and a group still "
        "tied at this size is dropped. A power-of-two multiple of rollout.group_size, greater than it, at "
        "most 16; needs filter_tied.",
    )
    overlong: OverlongMode = Field(
        "none", description="Completions cut at max_tokens: kept, masked out, or penalised."
    )
    overlong_penalty: float = Field(1.0, ge=0.0, description="Reward subtracted when overlong=penalty.")


# vLLM 0.32 serves adapters up to these ranks (vllm.config.lora.MaxLoRARanks): an engine is started with the
# smallest one at or above learner.lora.rank.
ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraConfig(_Section):
    """LoRA adapters (PEFT) trained in place of the full weights; the engines serve the base model with vLLM's
    LoRA support and receive only the adapter after each step (docs/real-model.md, LoRA)."""

    rank: int = Field(
        0,
        ge=0,
        le=ENGINE_LORA_RANKS[-1],
        description="Adapter rank r (0: off, full fine-tuning). At most 512, the largest rank vLLM serves, and "
        "at most the smaller side of every target layer.",
    )
    alpha: float | None = Field(
        None, gt=0.0, description="LoRA alpha: the update is scaled by alpha / rank. Default: 2 x rank."
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter's input while training. 0 keeps the learner's log-probs equal to "
        "the engines' (with dropout they differ in train mode).",
    )
    target_modules: list[str] | None = Field(
        None,
        description="Names of the linear layers that get an adapter (the last part of the module name, e.g. "
        "q_proj). Default: every linear layer of the model's decoder blocks (for Llama and Qwen2: the "
        "attention and MLP projections), read from the model when the run starts and written into "
        "RUN_DIR/config.yaml.",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, names: list[str] | None) -> list[str] | None:
        if names is not None and (not names or any(not n or not n.replace("_", "").isalnum() for n in names)):
            raise ValueError(f"must be a non-empty list of module names such as q_proj, got {names!r}")
        return names

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return (self.alpha or 2.0 * self.rank) / max(self.rank, 1)

    def engine_max_rank(self) -> int:
        """vLLM's max_lora_rank for this adapter: the smallest rank vLLM accepts at or above `rank`."""
        return next(r for r in ENGINE_LORA_RANKS if r >= self.rank)


class LearnerConfig(_Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks (one Ray actor each).")
    gpus_per_rank: int = Field(1, ge=1, description="GPUs per learner rank; ignored on CPU.")
    zero_stage: Literal[0, 1, 2, 3] | None = Field(
        None,
        description="DeepSpeed ZeRO stage. Unset: what the rank count needs, 0 (no partitioning) for one rank "
        "and 2 for several; 2 also for one rank of a bfloat16/float16 model with grad_accum_dtype=float32, "
        "which DeepSpeed sums in float32 only under ZeRO. The stage chosen is written into RUN_DIR/config.yaml, "
        "and a checkpoint resumes only at the stage it was written at.",
    )
    lr: float = Field(
        3e-4,
        gt=0.0,
        description="Adam learning rate. The default suits the tiny model; the paper: 1e-6 (16-GRPO), 8e-6 (2-GRPO).",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    grad_clip: float = Field(1.0, gt=0.0, description="Gradient norm clip.")
    micro_batch_size: int = Field(
        64, ge=1, description="Sequences per forward/backward on one rank (gradient accumulation)."
    )
    updates_per_batch: int = Field(
        1,
        ge=1,
        description="Optimizer steps per batch: the batch is split into this many mini-batches (PPO-style); "
        "from the second on, the ratio to the policy that generated the batch moves and the clip binds. "
        "1 = the paper's setting (one update per batch, ratio 1).",
    )
    grad_accum_dtype: Literal["float32", "model"] = Field(
        "float32",
        description="dtype a step's gradients are summed in over its micro-batches when model.dtype is "
        "bfloat16 or float16 (DeepSpeed's data_types.grad_accum_dtype). float32: exact sums, 4 bytes per "
        "parameter (divided over the ranks at ZeRO-2/3); needs learner.zero_stage >= 1 (DeepSpeed 0.19.8 has "
        "no such path without ZeRO). model: in the model's dtype, 2 bytes, each addition rounded to it. "
        "float32 models always accumulate in float32.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    cpu_affinity: str | None = Field(
        None,
        description="CPU runs: cores the learner ranks are pinned to, e.g. '1' or '2-3' (the CPU analogue of "
        "dedicated GPUs; pair with rollout.cpu_threads_bind). None: no pinning.",
    )
    broadcast_bucket_mib: float = Field(
        64.0, gt=0.0, description="Packed bucket size of the weight broadcast, in MiB."
    )
    zero3_persistence_threshold: int = Field(
        100_000,
        ge=0,
        description="ZeRO-3 only: parameters with at most this many elements stay whole on every rank "
        "instead of being partitioned (DeepSpeed's stage3_param_persistence_threshold; its default 1e5). "
        "0 partitions every parameter.",
    )
    logprob_chunk_tokens: int = Field(
        512,
        ge=1,
        description="Completion tokens whose vocabulary-sized logits are materialised at once when the "
        "learner computes log-probs and entropy (memory: this × vocabulary × 4 bytes per chunk).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (rank 0: off).")


ENV_BUILTINS = ("none", "calculator", "python")


class EnvConfig(_Section):
    """Multi-turn episodes (docs/environments.md): the model's turns, the environment's observations between
    them, one episode per rollout. `none` keeps today's single completion per rollout."""

    name: str = Field(
        "none",
        description="The episode: none (one completion per rollout), calculator (arithmetic tool), python "
        "(runs the model's code in a sandbox), or a user's Environment class as 'package.module:Class'. "
        "With model.path unset, any env other than none uses the embedded tool model (warm-started on "
        "the tool-call format), and with data.path unset the synthetic multiplication task.",
    )
    max_turns: int = Field(4, ge=1, description="Model turns per episode, at most.")
    max_total_tokens: int | None = Field(
        None,
        ge=2,
        description="Prompt, model turns and observations together, in tokens; an episode that reaches it "
        "ends (finish reason `length`). Default (filled in when the config is loaded): rollout.max_model_len.",
    )
    call_end_token: str = Field(
        "</call>",
        min_length=1,
        description="The token that ends a model turn that calls the tool: one token id of the model's "
        "tokenizer (a stop token id, never a stop string). A turn that ends on end-of-sequence ends the "
        "episode.",
    )
    max_observation_tokens: int = Field(
        64,
        ge=1,
        description="An observation longer than this, in tokens, is cut to it before it is appended.",
    )
    timeout_s: float = Field(
        5.0,
        gt=0.0,
        le=300.0,
        description="Time limit of one tool call, in seconds: the python tool's child is killed past it, "
        "and a tool worker that does not answer within it (plus 5 s) is replaced; either way the call's "
        "observation says so.",
    )
    memory_limit_mib: int = Field(
        512, ge=64, description="Address-space cap of the python tool's child process, in MiB."
    )
    max_output_bytes: int = Field(
        65536,
        ge=256,
        description="Output (stdout and stderr) the python tool's child may write; past it the child is "
        "stopped and the output cut.",
    )
    num_workers: int = Field(
        2, ge=1, description="ToolWorker actors (the tool pool), independent of the engines."
    )
    python_allow_unisolated: bool = Field(
        False,
        description="Let the python tool run on a host that cannot isolate it (no network namespace, or no "
        "read-only mount namespace and unprivileged user: it needs root or CAP_SYS_ADMIN). Off: the tool "
        "refuses to start there. Time, memory and output limits hold either way.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if name not in ENV_BUILTINS and not _CUSTOM_FUNCTION.match(name):
            raise ValueError(
                f"must be one of {', '.join(ENV_BUILTINS)} or an Environment class as "
                f"'package.module:Class', got {name!r}"
            )
        return name

    @property
    def enabled(self) -> bool:
        return self.name != "none"


class TrainConfig(_Section):
    steps: int = Field(80, ge=1, description="Optimizer steps (policy versions) to run.")
    max_staleness_versions: int = Field(
        0, ge=0, description="0: synchronous on-policy loop. k>0: async, data at most k versions old."
    )
    queue_capacity_groups: int = Field(
        1024, ge=1, description="ReplayQueue capacity, in groups; engines wait when it is full."
    )
    check_weights_every_steps: int = Field(
        10,
        ge=0,
        description="Prove engine weights equal the learner's (sha256 of every tensor as learner rank 0 sends "
        "it and as each engine worker loads it, on every transport, NCCL included; versions; vLLM's "
        "per-parameter checksums across engines) on the first broadcast and every N-th after it (0: never). "
        "Other broadcasts skip the hashing and log sync/checksum_match null; a step that sends nothing "
        "(train/skipped) logs the last check's value. On GPUs a check also copies each tensor to the host "
        "at both ends. Default 10: "
        "a check costs about two sha256 passes over the weights (~1 s at 540 MB, ~4% of a 135M step), "
        "so checking every 10th keeps it under 0.5% while a broken transfer still shows within 10 steps.",
    )

    def weights_checked(self, version: int) -> bool:
        """Whether the broadcast of policy `version` is checked (the first one always is)."""
        every = self.check_weights_every_steps
        return every > 0 and (version == 1 or version % every == 0)


class WatchdogConfig(_Section):
    """Stops a run that cannot learn: rewards that are mostly verifier errors for `error_steps` steps in a
    row, or every group tied (no gradient at all) for `tied_steps` steps in a row. The defaults leave the
    project's tests (at most 30 steps, tests/test_scaling.py) and benchmarks (an untrained model ties
    every group for 20 steps in benchmarks/pipeline.py) alone."""

    enabled: bool = Field(True, description="Stop runs that cannot learn (see watchdog.*).")
    error_steps: int = Field(
        10, ge=1, description="Consecutive steps whose rewards are mostly verifier errors that stop the run."
    )
    error_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="A step is 'mostly errors' when more than this share of its rewards are verifier "
        "errors (reason `error: ...`).",
    )
    tied_steps: int = Field(
        50, ge=1, description="Consecutive steps in which every group tied (no gradient) that stop the run."
    )


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0, description="Save every N steps (0: only at the end).")
    keep: int = Field(2, ge=1, description="Checkpoints to keep.")
    final: bool = Field(True, description="Save a checkpoint and HF export at the end of the run.")


class EvalConfig(DatasetFields, SamplingConfig):
    """Evaluation on held-out problems: during training (every_steps) and by `duet eval`."""

    path: str | None = Field(
        None,
        description="Held-out JSONL/Parquet file. None with the synthetic task: a held-out synthetic set.",
    )
    every_steps: int = Field(
        0, ge=0, description="Evaluate every N training steps (0: never during training)."
    )
    samples_per_prompt: int = Field(4, ge=1, description="n of avg@n and pass@k (k <= n).")
    # Evaluation's own sampling defaults (the paper's: temperature 0.7, top-p 0.8, top-k 20).
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature for evaluation.")
    top_p: float = Field(0.8, gt=0.0, le=1.0, description="Nucleus sampling threshold for evaluation.")
    top_k: int = Field(20, ge=-1, description="Top-k for evaluation (-1: off).")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Completion length limit; default (filled in when the config is loaded): "
        "rollout.max_tokens.",
    )
    max_prompts: int | None = Field(None, ge=1, description="Evaluate only the first N problems.")
    synthetic_problems: int = Field(200, ge=1, description="Size of the held-out synthetic set.")
    synthetic_seed: int = Field(
        12345, description="Seed of the held-out synthetic set (not the training seed)."
    )


class ControlConfig(_Section):
    enabled: bool = Field(True, description="Serve the control/status API (FastAPI) from the driver.")
    start_paused: bool = Field(
        False,
        description="Start with the loop paused before its first step (actors up, weights loaded): POST "
        "/resume starts it. For looking at a run before it trains (the dashboard, a scale request). Not "
        "kept in RUN_DIR/config.yaml: a resumed launch runs unless this is given again.",
    )
    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs a token.")
    port: int = Field(
        0, ge=0, le=65535, description="Port (0: any free port, written to RUN_DIR/control.json)."
    )
    token: str | None = Field(
        None,
        description="Bearer token for state-changing calls; default: token_file, else the token_env "
        "variable, else a random one (in RUN_DIR/control.json, mode 0600). Refused as a command-line "
        "override (`ps` shows it): use token_file or token_env.",
    )
    token_file: str | None = Field(
        None,
        description="File whose first line is the bearer token, read by the driver at start (so the token "
        "is on no command line and in no config file).",
    )
    token_env: str = Field(
        "DUET_CONTROL_TOKEN",
        description="Environment variable of the driver holding the bearer token (when token and "
        "token_file are unset). The driver's Ray processes do not inherit it.",
    )

    @model_validator(mode="after")
    def _resumable(self) -> ControlConfig:
        if self.start_paused and not self.enabled:
            raise ValueError(
                "control.start_paused: a run started paused waits for POST /resume, which needs the control "
                "API: set control.enabled=true or leave start_paused off"
            )
        return self

    def read_token(self) -> str | None:
        """The bearer token from token, token_file or the token_env variable (None: none given).
        Raises ConfigError naming control.token_file when that file cannot be read or is empty."""
        import os

        if self.token:
            return self.token
        if self.token_file:
            try:
                token = Path(self.token_file).expanduser().read_text().strip().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(
                    f"control.token_file: cannot read {self.token_file!r} ({type(e).__name__}): give a "
                    "readable file whose first line is the token"
                ) from None
            if not token or not token[0].strip():
                raise ConfigError(
                    f"control.token_file: {self.token_file!r} is empty: its first line is the token"
                )
            return token[0].strip()
        return os.environ.get(self.token_env, "").strip() or None


class ClusterConfig(_Section):
    placement_timeout_s: float = Field(
        300.0,
        gt=0.0,
        description="Longest wait, in seconds, for a placement group (the learner's, each engine's) to be "
        "placed; past it the run fails naming what the cluster could not hold.",
    )
    autoscaling: bool = Field(
        False,
        description="The cluster adds nodes on demand (Ray autoscaler, KubeRay): a plan bigger than the "
        "cluster is then a warning at start, and the placement waits up to placement_timeout_s.",
    )
    engine_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources each engine's bundle asks for, e.g. {rollout_node: 1} with the "
        "rollout nodes started by `ray start --resources='{\"rollout_node\": 8}'`: steers engines there.",
    )
    learner_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources each learner rank's bundle asks for (as engine_resources).",
    )
    colocate: bool = Field(
        False,
        description="One GPU for the whole run (a one-GPU machine): the engine and the learner rank share "
        "it, half of it each in Ray's accounting. Needs rollout.num_engines=1, rollout.gpus_per_engine=1, "
        "learner.num_ranks=1 and rollout.gpu_memory_utilization <= 0.6 (vLLM's share of the GPU's memory; "
        "the learner uses the rest). The weights go by the gloo path, through host memory: NCCL cannot "
        "join two ranks on one GPU. A run that resolves to CPU places as usual (the limits above still apply).",
    )
    weight_transport: Literal["auto", "network", "shared_memory"] = Field(
        "auto",
        description="How the weights reach an engine on the host path (CPU engines, cluster.colocate): "
        "shared_memory packs them once into a file in /dev/shm that the engine maps (the engine must run on "
        "learner rank 0's node, and /dev/shm hold one copy of the weights); network broadcasts them over a "
        "gloo group (TCP). auto: shared memory for each engine on learner rank 0's node when /dev/shm has "
        "room, the network for the others. GPU engines receive over NCCL whatever this says.",
    )

    gpu_memory_gib: float | None = Field(
        None,
        gt=0.0,
        description="Memory of the GPU a colocated run shares (cluster.colocate), in GiB, for the check that "
        "the learner (weights, gradients and AdamW state at its ZeRO stage and dtype) plus vLLM's "
        "rollout.gpu_memory_utilization fit it. None: read at start from a GPU of the cluster (preflight); "
        "set it when no GPU node is up yet (an autoscaling cluster).",
    )

    @model_validator(mode="after")
    def _resources(self) -> ClusterConfig:
        for name in ("engine_resources", "learner_resources"):
            for key, value in getattr(self, name).items():
                if key in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(
                        f"cluster.{name}: {key!r} is set by the plan (rollout/learner sections); "
                        "name a custom resource here"
                    )
                if value <= 0:
                    raise ValueError(f"cluster.{name}.{key} must be > 0 (got {value})")
        return self


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _derived_defaults(self) -> Config:
        """Fields whose default is another field's value, filled in here and nowhere else. They are then
        written into RUN_DIR/config.yaml as numbers, so a resumed run reads back the same values."""
        half = self.model.dtype != "float32"
        if self.learner.zero_stage is None:
            # One rank has nothing to partition, and ZeRO's bookkeeping costs it time (benchmarks/real_model.py:
            # learner_plain_ratio 2.69 at ZeRO-2 against 1.25 at ZeRO-0 on 135M, CPU).
            one = self.learner.num_ranks == 1 and (not half or self.learner.grad_accum_dtype == "model")
            self.learner.zero_stage = 0 if one else 2
        if self.learner.lora.enabled and self.learner.lora.alpha is None:
            self.learner.lora.alpha = 2.0 * self.learner.lora.rank
        if self.algorithm.length_norm is None:
            self.algorithm.length_norm = self.rollout.max_tokens
        if self.eval.max_tokens is None:
            self.eval.max_tokens = self.rollout.max_tokens
        if self.data.synthetic_task is None:
            self.data.synthetic_task = "multiply" if self.env.enabled else "add"
        if self.env.max_total_tokens is None:
            self.env.max_total_tokens = self.rollout.max_model_len
        if self.env.max_total_tokens > self.rollout.max_model_len:
            raise ValueError(
                f"env.max_total_tokens ({self.env.max_total_tokens}) is above rollout.max_model_len "
                f"({self.rollout.max_model_len}): an episode is one sequence of the engine; raise "
                "rollout.max_model_len or lower env.max_total_tokens"
            )
        if self.rollout.max_engines is not None and self.rollout.max_engines < self.rollout.num_engines:
            raise ValueError(
                f"rollout.max_engines ({self.rollout.max_engines}) is below rollout.num_engines "
                f"({self.rollout.num_engines}): raise it or leave it unset"
            )
        for n_field, n, t_field in (
            ("rollout.group_size", self.rollout.group_size, "rollout.temperature"),
            ("eval.samples_per_prompt", self.eval.samples_per_prompt, "eval.temperature"),
        ):
            if n > 1 and (self.rollout if t_field.startswith("rollout") else self.eval).temperature == 0:
                raise ValueError(
                    f"{t_field}=0 samples greedily, one answer per prompt, and {n_field} is {n}: vLLM refuses "
                    f"n > 1 with greedy sampling. Set {n_field}=1, or {t_field} above 0"
                )
        if self.cluster.colocate:
            self._check_colocate()
        if half and self.learner.grad_accum_dtype == "float32" and self.learner.zero_stage == 0:
            raise ValueError(
                f"learner.grad_accum_dtype=float32 with model.dtype={self.model.dtype} needs "
                "learner.zero_stage >= 1: DeepSpeed 0.19.8 cannot sum half-precision gradients in float32 "
                "without ZeRO (with one rank ZeRO-2 partitions nothing and costs the same memory). Set "
                "learner.zero_stage=2, or learner.grad_accum_dtype=model to accumulate in "
                f"{self.model.dtype}"
            )
        if self.algorithm.extend_tied_to:
            self._check_extension()
        return self

    def _check_extension(self) -> None:
        cap, g = self.algorithm.extend_tied_to, self.rollout.group_size
        ratio = cap // g
        if cap <= g or cap > 16 or cap % g or ratio & (ratio - 1):
            raise ValueError(
                f"algorithm.extend_tied_to={cap}: a tied group doubles from rollout.group_size ({g}), so "
                f"this must be {g} times a power of two, greater than {g} and at most 16 "
                f"({', '.join(str(g * 2**k) for k in range(1, 5) if g * 2**k <= 16) or 'none fits'}), "
                "or 0 (off)"
            )
        if not self.algorithm.filter_tied:
            raise ValueError(
                f"algorithm.extend_tied_to={cap} needs algorithm.filter_tied=true: a group still tied at "
                f"{cap} rollouts is dropped before the learner"
            )

    def _check_colocate(self) -> None:
        r, lr = self.rollout, self.learner
        one_each = {
            "rollout.num_engines": r.num_engines,
            "rollout.max_engines": r.max_engines or 1,
            "rollout.gpus_per_engine": r.gpus_per_engine,
            "learner.num_ranks": lr.num_ranks,
            "learner.gpus_per_rank": lr.gpus_per_rank,
        }
        for name, value in one_each.items():
            if value != 1:
                raise ValueError(
                    f"{name}={value} with cluster.colocate=true: one engine and one learner rank share "
                    f"one GPU; set {name}=1, or cluster.colocate=false to give each its own GPUs"
                )
        if r.gpu_memory_utilization > 0.6:
            raise ValueError(
                f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} with cluster.colocate=true "
                f"leaves the learner {1 - r.gpu_memory_utilization:.0%} of the shared GPU: set it to at "
                "most 0.6 (0.3 is plenty for a model of a few hundred million parameters)"
            )


# ---- presets: one word names a whole algorithm setting (README, Presets) ----
# The paper's GRPO setting (arXiv 2510.00977): population std (±1 pairs), clip-higher, tied groups dropped.
_PAPER_GRPO = {
    "advantage": "grpo",
    "std": "population",
    "clip_low": 0.2,
    "clip_high": 0.28,
    "aggregation": "seq_mean_token_mean",
    "filter_tied": True,
}
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's 2-GRPO.
    "2-grpo": {"rollout": {"group_size": 2}, "algorithm": _PAPER_GRPO},
    # The paper's baseline: 16 rollouts per prompt. Under its protocol (same rollouts per step) also
    # set rollout.prompts_per_step to 1/8 and learner.lr to 1/8 of 2-GRPO's (configs/ do).
    "16-grpo": {"rollout": {"group_size": 16}, "algorithm": _PAPER_GRPO},
    # Dr. GRPO (Liu et al., 2025): no std, constant length normaliser.
    "dr-grpo": {
        "algorithm": {"advantage": "dr_grpo", "aggregation": "seq_mean_token_sum_norm", "filter_tied": True},
    },
    # DAPO (Yu et al., 2025): clip-higher, token-mean, dynamic sampling, overlong masking.
    "dapo": {
        "rollout": {"group_size": 16},
        "algorithm": {
            "advantage": "grpo",
            "std": "sample",
            "clip_low": 0.2,
            "clip_high": 0.28,
            "aggregation": "token_mean",
            "filter_tied": True,
            "refill": True,
            "overlong": "mask",
        },
    },
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


def deep_merge(base: dict, update: dict) -> dict:
    """`base` updated by `update`, section by section (nested dicts merge; other values replace). A new
    tree: later overrides that set values in it leave `base`, `update` (and PRESETS) as they were."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def _printable(text: str) -> str:
    """Text for a one-line message: as it is, or quoted when it holds line breaks or other controls."""
    return text if text.isprintable() else repr(text)


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    shown = _printable(dotted)
    if not all(k.strip() for k in keys):
        raise ConfigError(f"override {dotted!r}: not a section.field name (e.g. rollout.group_size=4)")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    # YAML parsing gives ints, floats, bools, null and lists the same spelling as the config file.
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(
            f"{shown}: the value {raw!r} is not valid YAML ({' '.join(str(problem).split())}); quote it "
            "if it is text"
        ) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> Config:
    """Build the config: defaults < preset < YAML file < `dotted.name=value` overrides."""
    tree: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        tree = deep_merge(tree, PRESETS[preset])
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"--config {path}: not valid YAML{where} ({problem})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        file_preset = loaded.pop("preset", None)
        if file_preset is not None:
            if file_preset not in PRESETS:
                raise ConfigError(f"{path}: unknown preset {file_preset!r}; choose one of {sorted(PRESETS)}")
            tree = deep_merge(PRESETS[file_preset], tree)
        tree = deep_merge(tree, loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), raw)
    return validate_tree(tree)


def add_config_arguments(ap: argparse.ArgumentParser) -> None:
    """The config options every command that runs the system shares (`duet train`, `duet eval`)."""
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="named algorithm preset")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=4")


# Fields that hold a secret, and where the secret goes instead of the command line (which `ps` shows to
# every user of the machine, and the Ray dashboard shows for a job's entrypoint).
SECRET_FIELDS = {
    "control.token": "control.token_file=PATH or the variable control.token_env names (DUET_CONTROL_TOKEN)",
    "rewards.remote_token": "rewards.remote_token_file=PATH or the variable rewards.remote_token_env names "
    "(DUET_REWARD_TOKEN)",
}


def refuse_secret_overrides(overrides: list[str]) -> None:
    """A secret given as a `section.field=value` override is refused, with where to put it instead."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in SECRET_FIELDS:
            raise ConfigError(
                f"{key}: a secret on the command line shows in `ps` (and in a Ray job's entrypoint); "
                f"give it as {SECRET_FIELDS[key]}"
            )


def config_from_arguments(args: argparse.Namespace, *extra_overrides: str) -> Config:
    """`load_config` of what `add_config_arguments` parsed; `extra_overrides` apply last."""
    return load_config(args.config, [*args.overrides, *extra_overrides], args.preset)


def validate_tree(tree: dict) -> Config:
    """The config of a tree of sections; every problem is one line that starts with the field's dotted
    name (one line in all for one bad field)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines: dict[str, list[str]] = {}  # section.field -> its problems: one line per bad field
        for err in e.errors():
            where = ".".join(_printable(str(p)) for p in err["loc"]) or "config"
            field = ".".join(_printable(str(p)) for p in err["loc"][:2]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            elif err["type"] in ("model_type", "dict_type"):
                msg = "must be a section (a mapping of fields)"
            elif err["type"] == "string_type" and isinstance(err.get("input"), (dict, list)):
                msg += " (YAML read a value starting with '{' or '[' as a mapping or list: quote it)"
            detail = " ".join(msg.split())
            lines.setdefault(field, []).append(detail if where == field else f"{where}: {detail}")
        raise ConfigError(
            "\n".join(f"{field}: {'; '.join(problems)}" for field, problems in lines.items())
        ) from None


def config_reference() -> str:
    """Markdown table of every field: the README's config reference is generated from this."""
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def section(prefix: str, cls: type[BaseModel]) -> None:
        for name, f in cls.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, _Section):  # e.g. learner.lora
                section(f"{prefix}.{name}", f.annotation)
                continue
            ann = str(f.annotation).replace("typing.", "").replace("|", "\\|")
            if getattr(f.annotation, "__name__", None) in ("int", "float", "str", "bool"):
                ann = f.annotation.__name__
            default = f.default if f.default is not None else "null"
            rows.append(f"| `{prefix}.{name}` | `{ann}` | `{default}` | {f.description} |")

    for section_name, section_field in Config.model_fields.items():
        section(section_name, section_field.annotation)
    return "\n".join(rows)
