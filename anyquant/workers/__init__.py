"""Tensor-parallel ranks as processes: rank 0's model proxy and the worker loop that mirrors it.

`rank_zero.py` starts the ranks and wraps rank 0's model in `TensorParallelModel`, `worker.py` is
what every other rank runs (load its shard, mirror each forward), `main.py` the workers' entry
point. The collectives, the step messages and the process launch they use live in `parallel/`.

Nothing is imported here: `python -m anyquant.workers.main` imports this package first, and the
worker must start watching rank 0's liveness before anything imports torch.
"""
