"""Tensor parallelism over torch.distributed: rank state, collectives, and worker ranks.

`state.py` says who a process is and builds its groups, `comm.py` holds the collectives layers
call, `partition.py` the arithmetic of which entries of a split dimension each rank holds,
`wire.py` the step messages rank 0 publishes and `launch.py` starts worker ranks and watches them.
What the ranks run (rank 0's model proxy, the worker loop that mirrors it, the workers' entry
point) loads and runs a model, so it lives above the engine, in the `workers` package.

Nothing is imported here: the workers' entry point (`python -m anyquant.workers.main`) must start
watching rank 0's liveness before anything imports torch (seconds on a busy machine, during which a
worker whose rank 0 was killed would otherwise linger).
"""
