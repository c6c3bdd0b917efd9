"""Measure MCQ scoring speed: likelihood fast paths against greedy generation, in one run.

Usage: ``python bench/eval_speed.py [--model smollm2-135m] [--n 16] [--batch-size 8]``

Prints questions per second for each path and its speed ratio to generation, by wall-clock time
and by process CPU time (the CPU ratio is steadier when other jobs share the machine). All paths score
the same questions with the same model in the same process, so the ratios are comparable even
on a loaded machine, but the absolute rates are not. On a CPU shared with other jobs, pass
``--threads 1``: on a 2-core machine running other jobs, this script ran about 4 times slower
with torch's default of 2 threads than with 1 thread.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hm_utils import evaluate as ev  # noqa: E402
from hm_utils.data import Example  # noqa: E402
from hm_utils.models import provision, resolve_model  # noqa: E402
from hm_utils.prompts import default_template, render_target  # noqa: E402

# Hand-written USMLE-style questions of typical MMLU length (the timing depends on length only).
QUESTIONS = [
    (
        "A 45-year-old man presents with crushing chest pain radiating to the left arm for 30 minutes. "
        "Which enzyme rises first after myocardial injury?",
        ("Troponin I", "Lactate dehydrogenase", "Alkaline phosphatase", "Amylase"),
        0,
    ),
    (
        "A child has bowing of the legs, delayed closure of the fontanelles and low serum phosphate. "
        "Deficiency of which vitamin is the most likely cause?",
        ("Vitamin A", "Vitamin B12", "Vitamin D", "Vitamin K"),
        2,
    ),
    (
        "Which cranial nerve innervates the lateral rectus muscle of the eye?",
        ("Oculomotor nerve", "Trochlear nerve", "Abducens nerve", "Facial nerve"),
        2,
    ),
    (
        "A patient taking warfarin needs rapid reversal before emergency surgery. Which treatment acts fastest?",
        ("Oral vitamin K", "Prothrombin complex concentrate", "Protamine sulfate", "Aspirin"),
        1,
    ),
    (
        "Which organism most commonly causes community-acquired pneumonia in adults?",
        ("Streptococcus pneumoniae", "Escherichia coli", "Clostridium difficile", "Candida albicans"),
        0,
    ),
    (
        "A young woman has heat intolerance, weight loss, exophthalmos and a diffuse goitre. "
        "Which antibody is most characteristic of her disease?",
        (
            "Anti-thyroid peroxidase",
            "TSH receptor stimulating antibody",
            "Anti-nuclear antibody",
            "Anti-mitochondrial antibody",
        ),
        1,
    ),
    (
        "Which part of the nephron is the main site of action of furosemide?",
        ("Proximal tubule", "Thick ascending limb of the loop of Henle", "Distal convoluted tubule", "Collecting duct"),
        1,
    ),
    (
        "Which cell type produces surfactant in the lung alveoli?",
        ("Type I pneumocytes", "Alveolar macrophages", "Type II pneumocytes", "Club cells"),
        2,
    ),
]


def build_examples(n: int) -> list[Example]:
    """Cycle the hand-written questions to ``n`` examples."""
    examples = []
    for i in range(n):
        question, options, answer = QUESTIONS[i % len(QUESTIONS)]
        example = Example(
            id=f"bench-{i}",
            dataset="bench",
            language="en",
            task_type="mcq",
            instruction="Answer the multiple-choice question.",
            input=question,
            output=options[answer],
            options=options,
            answer_index=answer,
        )
        examples.append(example)
    return examples


def timed(label: str, function, n: int, results: dict[str, tuple[float, float]]):
    """Run ``function`` once; store and print its wall-clock and process CPU questions per second."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    value = function()
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    results[label] = (n / wall, n / cpu)
    print(f"{label:<34} wall {wall:6.1f} s  CPU {cpu:6.1f} s  {n / wall:6.2f} questions/s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded checkpoint name or model folder")
    parser.add_argument("--n", type=int, default=16, help="number of questions")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = provision(args.model) if args.model == "smollm2-135m" else resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    examples = build_examples(args.n)
    template = default_template("en", "mcq")
    prompts = ev.encode_prompts(tokenizer, examples, template)
    mean_prompt = np.mean([len(p) for p in prompts])
    print(
        f"model {path}, {args.n} questions, mean prompt {mean_prompt:.0f} tokens, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    ev.score_continuations(model, prompts[:2], [[0], [0]])  # warm-up

    n, batch_size, results = args.n, args.batch_size, {}
    texts = timed(
        "generate (greedy)",
        lambda: ev.generate_texts(model, tokenizer, prompts, args.max_new_tokens, batch_size),
        n,
        results,
    )
    options = timed(
        "option likelihood (shared prompt)",
        lambda: ev.option_logprobs(model, tokenizer, examples, template, batch_size=batch_size, prompts=prompts),
        n,
        results,
    )

    pair_prompts = [p for p, e in zip(prompts, examples) for _ in e.options]
    pair_options = [ev.encode_text(tokenizer, o) for e in examples for o in e.options]
    timed(
        "option likelihood (one row/option)",
        lambda: ev.score_continuations(model, pair_prompts, pair_options, batch_size),
        n,
        results,
    )
    timed(
        "letter next-token",
        lambda: ev.letter_logprobs(model, tokenizer, examples, template, batch_size, prompts),
        n,
        results,
    )
    timed(
        "target NLL",
        lambda: ev.answer_logprobs(model, tokenizer, examples, template, batch_size, prompts),
        n,
        results,
    )
    timed(
        "option + letter + NLL in one pass",
        lambda: ev.mcq_likelihoods(model, tokenizer, examples, template, batch_size=batch_size, prompts=prompts),
        n,
        results,
    )

    print()
    wall_base, cpu_base = results["generate (greedy)"]
    print(f"{'speed relative to generation':<34} {'wall':>6} {'CPU':>6}")
    for label, (wall_rate, cpu_rate) in results.items():
        print(f"{label:<34} {wall_rate / wall_base:5.2f}x {cpu_rate / cpu_base:5.2f}x")

    generated = [ev.parse_choice(text, e.options) for text, e in zip(texts, examples)]
    by_option = [int(np.argmax(sums / counts)) for sums, counts in options]
    agree = np.mean([g == o for g, o in zip(generated, by_option)])
    print(
        f"\ngenerated choice == option-likelihood choice on {100 * agree:.0f} % of questions; "
        f"first answer {texts[0]!r}, target {render_target(examples[0])!r}"
    )


if __name__ == "__main__":
    main()
