"""Per-token log-probs and entropy of completions, without full-vocabulary logits.

A causal LM's head turns every position's hidden state into V logits; at V = 151,936 and a few thousand
positions that is gigabytes per copy, and the learner only needs the completion positions. So:

- the model runs with `logits_to_keep` set to the span of positions that predict completion tokens, so
  the hidden states of the rest never reach the head;
- `CompletionHead` stands in for the model's output layer (same parameters, same names:
  `lm_head.weight` stays `lm_head.weight` for checkpoints and the weight broadcast). Asked for logits it
  gives logits; given a request it picks the completion positions and computes, `chunk_tokens` at a
  time, log π(y_t) = log_softmax(z)[y_t] with z = W h / temperature, and the entropy without gradient;
- under autograd every chunk but the last is checkpointed: its logits are recomputed in backward instead
  of kept. The last chunk's are kept: its backward runs first, before any recompute, so at most one
  chunk's vocabulary-sized tensors exist at once, forward or backward. The chunks are cut from the end
  (the short remainder first), so the kept one is a whole chunk and a request of one chunk recomputes
  nothing. A recompute skips the entropy (no gradient needs it).

The head runs inside the model's own forward (one call per forward), so under ZeRO-3 every rank gathers
and releases its weight in the same collectives as any other layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class _Request:
    rows: Tensor  # [N] batch row of each completion token
    cols: Tensor  # [N] its column among the kept positions (the position that predicts it)
    slots: Tensor  # [N] its index within its completion
    targets: Tensor  # [N] the token
    shape: tuple[int, int]  # [B, C] of the padded output
    temperature: float


class CompletionHead(nn.Module):
    """The output layer of a causal LM, able to score completion tokens in chunks (see module doc)."""

    def __init__(self, head: nn.Linear, chunk_tokens: int) -> None:
        super().__init__()
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be ≥ 1, got {chunk_tokens}")
        self.weight = head.weight  # the same Parameter object: tied embeddings stay tied
        self.register_parameter("bias", head.bias)
        self.in_features, self.out_features = head.in_features, head.out_features
        self.chunk_tokens = chunk_tokens
        self.request: _Request | None = None
        self.entropy: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        if self.request is None:
            return F.linear(hidden, self.weight, self.bias)
        req = self.request
        h = hidden[req.rows, req.cols]  # [N, H]: completion positions only
        pieces_logp, pieces_ent = [], []
        bounds = chunk_bounds(h.shape[0], self.chunk_tokens)
        for i, (a, b) in enumerate(bounds):
            entropy: list[Tensor] = []

            def score(h_chunk: Tensor, t_chunk: Tensor, entropy: list[Tensor] = entropy) -> Tensor:
                logp, ent = self._score(h_chunk, t_chunk, req.temperature, with_entropy=not entropy)
                if ent is not None:
                    entropy.append(ent)
                return logp

            if torch.is_grad_enabled() and b > a and i < len(bounds) - 1:
                logp = checkpoint(score, h[a:b], req.targets[a:b], use_reentrant=False)
            else:
                logp = score(h[a:b], req.targets[a:b])
            pieces_logp.append(logp)
            pieces_ent.append(entropy[0])
        logp = torch.cat(pieces_logp)
        out = torch.zeros(req.shape, dtype=logp.dtype, device=logp.device)
        out = out.index_put((req.rows, req.slots), logp)
        entropy = torch.zeros(req.shape, dtype=logp.dtype, device=logp.device)
        self.entropy = entropy.index_put((req.rows, req.slots), torch.cat(pieces_ent))
        return out

    def _score(
        self, h: Tensor, targets: Tensor, temperature: float, with_entropy: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        # fp32 (float64 kept) before the log-softmax: bf16 loses too much over a large vocabulary.
        z = F.linear(h, self.weight, self.bias)
        z = z if z.dtype == torch.float64 else z.float()
        if temperature != 1.0:  # a division of a vocabulary-sized tensor (and its backward) saved at T = 1
            z = z / temperature
        logp_all = F.log_softmax(z, dim=-1)  # one fused kernel, forward and backward
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():  # no loss term uses the entropy: no graph for it
                entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[a, b) spans of at most `chunk` covering range(n), cut from the end: the remainder comes first and
    the last span is a whole chunk (one empty span when n = 0)."""
    edges = [0, *range(n % chunk or chunk, n, chunk), n]
    return list(pairwise(edges))


def install_completion_head(model: nn.Module, chunk_tokens: int) -> CompletionHead:
    """Put a `CompletionHead` in place of `model`'s output layer (before DeepSpeed wraps the model)."""
    current = model.get_output_embeddings()
    if isinstance(current, CompletionHead):
        return current
    if not isinstance(current, nn.Linear):
        raise TypeError(f"the model's output layer is {type(current).__name__}, not nn.Linear")
    head = CompletionHead(current, chunk_tokens)
    model.set_output_embeddings(head)
    if model.get_output_embeddings() is not head:
        raise TypeError(f"{type(model).__name__} did not accept a new output layer")
    return head


def completion_logprobs(
    model: nn.Module,
    head: CompletionHead,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """log π(completion token | prefix) under the tempered distribution, [B, C] (C the longest completion,
    0 past each row's end), and the entropy there (no gradient). `model` is the HF model or the DeepSpeed
    engine around it; `head` the `CompletionHead` installed in it. Sequences are right-padded as given."""
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"row {i}: empty prompt (its first completion token has no prefix to score it)")
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    # The logits at position t predict token t + 1: completion tokens are predicted from len(p) - 1 on.
    lo = min(len(p) for p in prompt_ids) - 1
    hi = max(max(len(s) - 1 for s in seqs), lo + 1)
    rows, cols, slots, targets = [], [], [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        for j, token in enumerate(c):
            rows.append(i)
            cols.append(len(p) - 1 + j - lo)
            slots.append(j)
            targets.append(token)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    head.request = _Request(
        as_long(rows),
        as_long(cols),
        as_long(slots),
        as_long(targets),
        (len(seqs), max(len(c) for c in completion_ids)),
        temperature,
    )
    try:
        out = model(
            input_ids=ids.to(device),
            attention_mask=attn.to(device),
            logits_to_keep=torch.arange(lo, hi, device=device),
            use_cache=False,
        )
        entropy = head.entropy
    finally:
        head.request, head.entropy = None, None
    return out.logits, entropy


def reference_logprobs(
    model: nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """The learner's computation before `CompletionHead`, kept as the reference that tests and
    benchmarks/learner_memory.py compare against: fp32 logits at every position, a padded copy of the
    completion positions stacked into [B, C, V], log-softmax and entropy (with gradient) over all of it."""
    from learner.losses import entropy_from_logits, token_logprobs

    def pad(rows: list[list[int]]) -> Tensor:
        out = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out.to(device)

    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    logits = model(input_ids=pad(seqs), attention_mask=pad([[1] * len(s) for s in seqs])).logits
    logits = logits.float() / temperature
    width = max(len(c) for c in completion_ids)
    rows_logits = []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        chunk = logits[i, len(p) - 1 : len(p) - 1 + len(c)]
        rows_logits.append(F.pad(chunk, (0, 0, 0, width - len(c))))
    step_logits = torch.stack(rows_logits)
    return token_logprobs(step_logits, pad(completion_ids)), entropy_from_logits(step_logits)
