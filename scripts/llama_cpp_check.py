"""Run an exported GGUF through llama.cpp itself and compare its greedy answers with ours.

llama-cpp-python is not a dependency of the project (pip compiles llama.cpp for it: 50 minutes on
2 busy CPU cores), and the project's uv settings keep it out of the environment, so install it
beside it and put it on the path:

    pip install --target /tmp/llama-cpp llama-cpp-python
    PYTHONPATH=/tmp/llama-cpp uv run python scripts/llama_cpp_check.py --run logs/runs/demo \
        --gguf logs/runs/demo/export/demo-f16.gguf

For each of the run's first held-out prompts it checks that llama.cpp tokenizes the chat-formatted
prompt text as our tokenizer does, then decodes greedily from the same prompt tokens with llama.cpp
and with the run's adapter model, and reports how many prompts and tokens agree.
"""

from __future__ import annotations

import argparse
import json

import mlx_grpo  # noqa: F401 (loads the optimised BLAS before mlx.core)
from mlx_grpo.config import load_run_config
from mlx_grpo.data import build_prompt_tokens
from mlx_grpo.evaluate import held_out_items, load_run_adapters
from mlx_grpo.models import load_model
from mlx_grpo.rollout import generate_rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="The training run the GGUF was exported from.")
    parser.add_argument("--gguf", required=True, help="The exported GGUF file.")
    parser.add_argument("--prompts", type=int, default=20, help="Held-out prompts to compare.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from llama_cpp import Llama

    cfg = load_run_config(args.run)
    model, tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
    load_run_adapters(model, args.run)
    items = held_out_items(cfg)[:args.prompts]
    system = cfg.data.system_prompt or None
    prompts = [build_prompt_tokens(tokenizer, item, system) for item in items]
    eos = set(tokenizer.eos_token_ids)
    ours = generate_rollout(model, prompts, group_size=1, max_new_tokens=args.max_new_tokens, eos_token_ids=eos,
                            temperature=0.0).completion_tokens

    llm = Llama(model_path=args.gguf, n_ctx=2048, verbose=False, seed=0)
    same_tokenization = same_answers = same_tokens = total_tokens = 0
    for prompt, expected in zip(prompts, ours):
        text = tokenizer.decode(prompt)
        same_tokenization += llm.tokenize(text.encode(), add_bos=False, special=True) == list(prompt)
        llm.reset()
        theirs = []
        for token in llm.generate(list(prompt), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                  reset=True):
            if token in eos or token == llm.token_eos() or len(theirs) >= args.max_new_tokens:
                break
            theirs.append(token)
        expected = [t for t in expected if t not in eos]
        same_answers += theirs == expected
        same_tokens += sum(a == b for a, b in zip(theirs, expected))
        total_tokens += max(len(theirs), len(expected))
        if theirs != expected:
            print(json.dumps({"ours": tokenizer.decode(expected), "llama.cpp": tokenizer.decode(theirs)}))
    print(json.dumps({"prompts": len(prompts), "same_prompt_tokenization": same_tokenization,
                      "same_greedy_answer": same_answers, "same_tokens": same_tokens,
                      "tokens": total_tokens}))


if __name__ == "__main__":
    main()
