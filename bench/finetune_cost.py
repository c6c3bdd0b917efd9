"""Time LoRA training steps on a checkpoint with the base weights in fp32 and in bf16.

Each mode loads the model, adds a fresh LoRA adapter (``hm_utils.finetune.add_lora``) and runs
``train_lora`` for ``--steps`` optimiser steps plus one untimed warm-up step, all on the same
synthetic QA examples. The output is one row per mode: seconds per step, tokens per second
(prompt and answer tokens, padding excluded) and the speed relative to the first mode in the
same round. Rows are printed as each mode finishes. On a CPU shared with other processes,
run several rounds (``--repeats``): the modes alternate, so a change in load affects each
of them, and the medians are printed at the end.

Modes:
  fp32              base weights in fp32, output layer only at answer positions
  bf16              base weights in bf16, LoRA in fp32, output layer only at answer positions
  fp32-full-logits  base in fp32, output layer at every position (what Trainer computes)

Example:
  python bench/finetune_cost.py --steps 4 --threads 1
  python bench/finetune_cost.py --steps 2 --threads 1 --repeats 3 --modes fp32 fp32-full-logits
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

from hm_utils import finetune as ft  # noqa: E402
from hm_utils.data import Example  # noqa: E402
from hm_utils.models import resolve_model  # noqa: E402

MODES = {
    "fp32": ("float32", ft.answer_loss_sum),
    "bf16": ("bfloat16", ft.answer_loss_sum),
    "fp32-full-logits": ("float32", ft.full_logits_loss_sum),
    "bf16-full-logits": ("bfloat16", ft.full_logits_loss_sum),
}
WORDS = (
    "patient fever cough pain chronic acute infection blood pressure heart lung liver kidney "
    "treatment dose tablet daily symptoms diagnosis therapy muscle nerve skin bone joint chest "
    "headache nausea fatigue swelling rash allergy vitamin protein enzyme hormone insulin glucose "
    "inflammation tissue cell virus bacteria antibiotic vaccine surgery recovery risk severe mild"
).split()


def synthetic_examples(n: int, prompt_words: int, answer_words: int, seed: int) -> list[Example]:
    """Build ``n`` QA examples of random medical words with the given word counts."""
    rng = random.Random(seed)
    return [
        Example(
            id=f"bench-{index}",
            dataset="bench",
            language="en",
            task_type="qa",
            instruction="Explain the following case.",
            input=" ".join(rng.choices(WORDS, k=prompt_words)),
            output=" ".join(rng.choices(WORDS, k=answer_words)),
        )
        for index in range(n)
    ]


def time_mode(reference: str, mode: str, data: ft.TokenizedSet, settings: ft.LoraSettings, pad_id: int, targets):
    """Return (load seconds, per-step log) for one mode."""
    base_dtype, loss_fn = MODES[mode]
    start = time.perf_counter()
    model = ft.add_lora(ft.load_base_model(reference, base_dtype, "cpu"), settings, targets)
    load_seconds = time.perf_counter() - start
    log = ft.train_lora(model, data, settings, pad_id, loss_fn=loss_fn)
    return load_seconds, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded checkpoint name or model folder")
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps per mode (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--prompt-words", type=int, default=60, help="words in each synthetic question")
    parser.add_argument("--answer-words", type=int, default=25, help="words in each synthetic answer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=sorted(MODES))
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all modes; >1 also prints medians")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    reference = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    config = AutoConfig.from_pretrained(reference)
    targets = ft.resolve_target_modules("all-linear", ft.linear_module_names(ft.build_meta_model(config)))
    settings = ft.LoraSettings(
        learning_rate=1e-3, batch_size=args.batch_size, max_steps=args.steps + 1, warmup_ratio=0.0, group_by_length=False
    )
    examples = synthetic_examples(args.batch_size * (args.steps + 1), args.prompt_words, args.answer_words, seed=0)
    data = ft.tokenize_examples(tokenizer, examples, None, settings.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(
        f"model {args.model}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{data.n_tokens / len(examples):.0f} tokens per sequence ({data.n_target_tokens / len(examples):.0f} in the answer)"
    )

    print(f"{'round':>5} {'mode':<18} {'load s':>7} {'s/step':>8} {'tokens/s':>9} {'speed':>6} {'last loss':>9}", flush=True)
    rates: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for round_index in range(1, args.repeats + 1):
        for mode in args.modes:
            load_seconds, log = time_mode(reference, mode, data, settings, pad_id, targets)
            timed = log[1:]
            seconds = log[-1].elapsed_s - log[0].elapsed_s
            rate = sum(entry.tokens for entry in timed) / seconds
            rates[mode].append(rate)
            print(
                f"{round_index:>5} {mode:<18} {load_seconds:7.1f} {seconds / len(timed):8.2f} {rate:9.1f} "
                f"{rate / rates[args.modes[0]][-1]:6.2f} {timed[-1].loss:9.3f}",
                flush=True,
            )

    if args.repeats > 1:
        first_median = statistics.median(rates[args.modes[0]])
        print("median over rounds:")
        for mode, values in rates.items():
            median = statistics.median(values)
            print(f"      {mode:<18} {median:9.1f} tokens/s, speed {median / first_median:.2f}")


if __name__ == "__main__":
    main()
