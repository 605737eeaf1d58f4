"""Run by tests/vllm_env.py inside vLLM's own virtual environment (never imported by the suite):
vLLM's offline engine on a model folder, as a user runs it (`LLM(model=OUT)`, no flags for the model),
in float32 on CPU. Reads a JSON request on stdin: {"model": folder, "prompts": [[ids], ...],
"new_tokens": n}; writes one JSON line to stdout: for each prompt the log-probability of each of its
tokens after the first (vLLM's prompt log-probs), the greedy continuation and its log-probabilities,
and the architecture vLLM resolved. Several models ({"runs": [request, ...]}) are run one after the other
in one process (vLLM's start-up is paid once)."""

import json
import os
import sys


def main() -> None:
    request = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
    for one in request.get("runs", [request]):
        print("STREAMPRUNE-RESULT " + json.dumps(generate(one)), flush=True)


def generate(request: dict) -> dict:
    import gc

    from vllm import LLM, SamplingParams
    llm = LLM(model=request["model"], dtype="float32", enforce_eager=True, seed=0,
              max_model_len=request.get("max_model_len", 512))
    params = SamplingParams(temperature=0.0, max_tokens=request["new_tokens"], logprobs=0, prompt_logprobs=0,
                            ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params)
    results = []
    for ids, out in zip(request["prompts"], outputs):
        gen = out.outputs[0]
        prompt = [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]
        results.append({"prompt_logprobs": prompt, "tokens": list(gen.token_ids),
                        "logprobs": [step[t].logprob for step, t in zip(gen.logprobs, gen.token_ids)]})
    architecture = llm.llm_engine.model_config.architecture
    del llm  # its engine process ends before the next model's starts
    gc.collect()
    return {"model": request["model"], "architecture": architecture, "results": results}


if __name__ == "__main__":  # vLLM starts its engine process by spawn, which re-imports this file
    main()
