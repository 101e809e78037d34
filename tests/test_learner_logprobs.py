"""Completion log-probs in chunks (learner.logprobs) give the loss and gradients of the full-logits
computation they replaced (`reference_logprobs`: the learner's previous code, logits at every position,
a stacked copy of the completion positions, entropy with gradients)."""

from __future__ import annotations

import pytest
import torch

from learner.logprobs import (
    CompletionHead,
    completion_logprobs,
    install_completion_head,
    reference_logprobs,
)
from learner.losses import policy_loss


def _pad(rows, value, dtype):
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _model(vocab: int, seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).float()


def _batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompt_lens, comp_lens = [3, 7, 1, 5], [6, 2, 9, 0]  # ragged; one empty completion
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in prompt_lens]
    comps = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in comp_lens]
    return prompts, comps


def _loss(logp, comps, aggregation="token_mean"):
    mask = _pad([[1.0] * len(c) for c in comps], 0.0, torch.float32)
    adv = torch.tensor([1.0, -0.5, 0.25, 2.0])
    old = logp.detach() + 0.05 * torch.cos(torch.arange(logp.numel()).float()).view_as(logp)
    loss, _ = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, aggregation=aggregation)
    return loss, mask


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("chunk_tokens", "temperature"), [(1, 0.7), (4, 0.7), (4, 1.0), (512, 0.7), (512, 1.0)]
)
def test_chunked_logprobs_match_full_logits(chunk_tokens, temperature, tied):
    vocab = 1000
    ref_model = _model(vocab, tied=tied)
    new_model = _model(vocab, tied=tied)
    head = install_completion_head(new_model, chunk_tokens)
    assert [n for n, _ in new_model.named_parameters()] == [n for n, _ in ref_model.named_parameters()]
    assert new_model.state_dict().keys() == ref_model.state_dict().keys()
    prompts, comps = _batch(vocab)

    want_logp, want_ent = reference_logprobs(ref_model, prompts, comps, temperature)
    got_logp, got_ent = completion_logprobs(new_model, head, prompts, comps, temperature)
    assert got_logp.shape == want_logp.shape and got_ent.shape == want_ent.shape
    mask = _pad([[1.0] * len(c) for c in comps], 0.0, torch.float32).bool()
    torch.testing.assert_close(got_logp[mask], want_logp[mask], rtol=0, atol=2e-6)
    # -Σ p log p against logsumexp − Σ p z: the same value in fp32, rounded differently (a few ulp of ~7)
    torch.testing.assert_close(got_ent[mask], want_ent[mask].detach(), rtol=1e-6, atol=2e-6)
    assert not got_ent.requires_grad  # no loss term needs the entropy's gradient

    want_loss, _ = _loss(want_logp, comps)
    got_loss, _ = _loss(got_logp, comps)
    torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-6)
    want_loss.backward()
    got_loss.backward()
    want_grads = dict(ref_model.named_parameters())
    for name, p in new_model.named_parameters():
        want = want_grads[name].grad
        # fp32 sums in another order: within 1e-5 of the tensor's largest gradient (seen: ~1e-6)
        torch.testing.assert_close(p.grad, want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=name)


def test_chunks_are_cut_from_the_end_so_the_kept_last_one_is_whole():
    from learner.logprobs import chunk_bounds

    assert chunk_bounds(731, 512) == [(0, 219), (219, 731)]  # 219 recomputed in backward, 512 kept
    assert chunk_bounds(1024, 512) == [(0, 512), (512, 1024)]
    assert chunk_bounds(5, 2) == [(0, 1), (1, 3), (3, 5)]
    assert chunk_bounds(300, 512) == [(0, 300)]  # one chunk: nothing recomputed
    assert chunk_bounds(0, 512) == [(0, 0)]


def test_no_grad_path_and_plain_logits():
    vocab = 300
    model = _model(vocab)
    reference = _model(vocab)
    head = install_completion_head(model, 2)
    prompts, comps = _batch(vocab, seed=3)
    with torch.no_grad():
        got, _ = completion_logprobs(model, head, prompts, comps, 1.0)
        want, _ = reference_logprobs(reference, prompts, comps, 1.0)
        mask = _pad([[1.0] * len(c) for c in comps], 0.0, torch.float32).bool()
        torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=2e-6)
        # Without a request the head is the plain output layer (generation, export).
        ids = torch.tensor([prompts[1]])
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert head.request is None and isinstance(model.get_output_embeddings(), CompletionHead)


def test_bad_input_names_the_row():
    model = _model(50)
    head = install_completion_head(model, 8)
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        completion_logprobs(model, head, [[1], []], [[2], [3]], 1.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        CompletionHead(torch.nn.Linear(4, 5, bias=False), 0)
