"""Moving block bytes: the engine that runs transfer jobs, and the G1 <-> G2 copy handlers.

- ``engine``: :class:`~kvbm.transfer.engine.TransferEngine`: runs jobs with handlers keyed by
  (source tier, destination tier).
- ``jobs``: transfer jobs and their results: the messages between the manager and the engine.
- ``blockcopy``: batched numpy block copies between engine arrays (G1) and a slot buffer (G2).
- ``host_copy``: G1 <-> G2 handlers; numpy copies when G1 is host memory.
- ``cuda_copy``: G1 (CUDA) <-> G2 (pinned host) copies on a dedicated CUDA stream; imports torch.

G3's handlers are in :mod:`kvbm.tiers.disk.handlers`; pulls between workers in :mod:`kvbm.remote`.
"""
