"""Rank 0 of tensor-parallel runs whose worker exits at each stage in turn (no main guard, as a
plain user script): `python tests/parallel/_stage_failures.py MODEL STAGE...`.

Prints one JSON line per stage: the error rank 0 raised, its type, how long after the worker's
exit it came (the worker prints its exit time, which the error quotes from its last output), and
whether the worker process is gone afterwards.
"""

import json
import os
import re
import sys
import time

from anyquant import LLM, SamplingParams
from anyquant.parallel import launch

launch.WORKER_MODULE = "tests.parallel._failing_worker"
model, stages = sys.argv[1], sys.argv[2:]
for stage in stages:
    os.environ["ANYQUANT_TEST_WORKER_EXIT"] = stage
    llm = None
    result = {"stage": stage, "error": None}
    try:
        llm = LLM(model, dtype="float32", tensor_parallel_size=2)
        # EOS ignored: a request that ended at its first or second token (a sampled EOS) would
        # finish before the worker's third forward pass, and the "step" stage would raise nothing.
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        llm.generate(prompt_token_ids=[[256, 72, 101]], sampling_params=params)
    except Exception as exc:
        caught = time.time()
        result.update(error=str(exc), type=type(exc).__name__)
        found = re.search(r"exit-time ([0-9.]+)", str(exc))
        result["seconds_after_exit"] = caught - float(found.group(1)) if found else None
    if llm is not None:
        pids = llm.model.workers.pids()
        llm.close()
        result["workers_left"] = [p for p in pids if os.path.exists(f"/proc/{p}")]
    print(json.dumps(result), flush=True)
