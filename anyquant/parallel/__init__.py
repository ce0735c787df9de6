"""Tensor parallelism over torch.distributed: rank state, collectives, and worker ranks.

`state.py` says who a process is and builds its groups, `comm.py` holds the collectives layers
call, `partition.py` the arithmetic of which entries of a split dimension each rank holds,
`launch.py` starts worker ranks (`worker_main.py`) and `workers.py` runs the worker loop that
mirrors rank 0's forward passes.

Nothing is imported here: `python -m anyquant.parallel.worker_main` imports this package first, and
the worker must start watching rank 0's liveness before anything imports torch (seconds on a busy
machine, during which a worker whose rank 0 was killed would otherwise linger).
"""
