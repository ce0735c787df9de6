"""Tensor parallelism over torch.distributed: rank state, collectives, and spawned worker ranks.

`state.py` says who a process is and builds its groups, `comm.py` holds the collectives layers
call, `workers.py` starts ranks and runs the worker loop that mirrors rank 0's forward passes.
"""

from anyquant.parallel.state import ParallelError, ParallelState

__all__ = ["ParallelError", "ParallelState"]
