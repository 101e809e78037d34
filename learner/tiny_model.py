"""The embedded default model: a tiny Llama and a character tokenizer, built offline and cached.

No hub access: the tokenizer is made with `tokenizers`, the model from a `LlamaConfig`. The shapes are
the smallest vLLM's CPU attention accepts (head_dim 64: 2 heads of hidden 128, 1 KV head).
A short supervised warm start on the synthetic task gives the policy some reward to start from,
so that RL has signal (a model that never answers right gets no gradient from GRPO).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
import tempfile
from pathlib import Path

BOXED = "\\boxed{"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.digits + "+-*/=()., ?!:;'\"" + string.ascii_letters + "{}[]^_\\$%&#@<>|~`\n")
VOCAB = [*SPECIALS, BOXED, *CHARS]
VOCAB_SIZE = 128  # padded: a multiple of 64 keeps vLLM's and HF's embedding shapes identical

ARCH = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 256,
}


def build_tokenizer(out_dir: str | Path, extra_tokens: tuple[str, ...] = ()):
    """A character-level fast tokenizer with `\\boxed{` as one token; saved as tokenizer.json.
    `extra_tokens` (the tool model's `<call>`, `</call>` ...) are single tokens too, after VOCAB."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*VOCAB, *extra_tokens])}
    if len(vocab) > VOCAB_SIZE:
        raise ValueError(f"{len(vocab)} tokens do not fit the padded vocabulary of {VOCAB_SIZE}")
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words = "".join(f"{re.escape(t)}|" for t in extra_tokens)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(words + r"\\boxed\{|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.model_max_length = ARCH["max_position_embeddings"]
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config():
    """The embedded model's LlamaConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **ARCH,
    )


def build_model(out_dir: str | Path, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def supervised_step(model, opt, tokenizer, problems: list[tuple[str, str]]) -> None:
    """One optimizer step of next-token loss on `\\boxed{answer}</s>` after each (problem, answer): the
    policy's answer format (the loss covers the answer tokens only)."""
    import torch

    prompts = [tokenizer(problem)["input_ids"] for problem, _ in problems]
    answers = [
        tokenizer(f"{BOXED}{answer}}}")["input_ids"] + [tokenizer.eos_token_id] for _, answer in problems
    ]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.zeros(len(problems), width, dtype=torch.long)
    labels = torch.full((len(problems), width), -100, dtype=torch.long)
    attn = torch.zeros(len(problems), width, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(a)
        attn[i, : len(seq)] = 1
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def warm_start(model, tokenizer, steps: int, max_operand: int, seed: int, lr: float = 3e-3) -> float:
    """Supervised pass on `a+b=` → `\\boxed{a+b}</s>`; returns greedy accuracy on fresh problems.

    Stopped early (few steps) on purpose: the point is a policy that is right sometimes, not always.
    """
    import torch

    rng = random.Random(seed + 17)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        pairs = [(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(64)]
        supervised_step(model, opt, tokenizer, [(f"{a}+{b}=", str(a + b)) for a, b in pairs])
    return greedy_accuracy(model, tokenizer, max_operand, seed + 99)


def greedy_accuracy(model, tokenizer, max_operand: int, seed: int, n: int = 128) -> float:
    import torch

    with torch.no_grad():
        return _greedy_accuracy(model, tokenizer, max_operand, seed, n)


def _greedy_accuracy(model, tokenizer, max_operand: int, seed: int, n: int) -> float:
    import torch

    model.eval()
    rng = random.Random(seed)
    correct = 0
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        ids = torch.tensor([tokenizer(f"{a}+{b}=")["input_ids"]])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        correct += text.strip() == f"{BOXED}{a + b}}}"
    return correct / n


def ensure_tiny_model(cache_dir: str | Path, warm_start_steps: int, max_operand: int, seed: int = 0) -> Path:
    """Return the folder of the cached tiny model, building and warm-starting it once.

    The folder name hashes everything that shapes the weights, so a change of any of them builds
    a new model instead of silently reusing a stale one. Written to a temp folder then renamed, so
    a crash never leaves a half-written model that looks complete.
    """
    key = json.dumps(
        {"arch": ARCH, "vocab": VOCAB, "steps": warm_start_steps, "max": max_operand, "seed": seed}
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(os.path.expanduser(str(cache_dir)))
    final = root / f"tiny-llama-{digest}"
    if (final / "duet_model.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    tokenizer = build_tokenizer(tmp)
    model = build_model(tmp, seed)
    accuracy = warm_start(model, tokenizer, warm_start_steps, max_operand, seed) if warm_start_steps else None
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "duet_model.json").write_text(
        json.dumps({"warm_start_steps": warm_start_steps, "greedy_accuracy": accuracy, "key": key}, indent=1)
    )
    try:
        tmp.rename(final)
    except OSError:  # another process built it first
        if not (final / "duet_model.json").exists():
            raise
    return final
