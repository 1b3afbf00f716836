"""vLLM's offline LLM.generate as a benchmark peer, run in vLLM's own virtualenv (make bench-peers).

Imports nothing of lmbatch nor of the bench package (neither is installed in that virtualenv), so
it runs as a plain script, not as `-m bench.vllm_peer`: bench/cpu_peers.py writes a job file and
runs it with the peer's python, once per timed run (-P keeps bench/ off its sys.path):

    bench/.peers/vllm/bin/python -P bench/vllm_peer.py JOB.json RESULT.json

The job holds the model directory, dtype, engine limits and the workload's token ids; the result
the wall time of generate (engine construction excluded), each request's output tokens, and
vLLM's version. Greedy, EOS ignored, prefix caching on, as lmbatch runs.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path).read())
    # vLLM's CPU backend reads these at import (docs: "CPU - vLLM", environment variables).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gb", 4)))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", job.get("threads_bind", "auto"))
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=job["model"], dtype=job["dtype"], enable_prefix_caching=True, skip_tokenizer_init=True,
              max_num_seqs=job["max_num_seqs"], max_num_batched_tokens=job["max_num_batched_tokens"],
              max_model_len=job["max_model_len"], seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, detokenize=False)
              for m in job["max_tokens"]]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)          # warm-up, as lmbatch's engine load does
    llm.reset_prefix_cache()
    t0 = time.monotonic()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.monotonic() - t0
    result = {"wall_s": wall, "tokens": [list(o.outputs[0].token_ids) for o in outs], "version": vllm.__version__}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
