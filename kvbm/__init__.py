"""kvbm: a hash-addressed KV-cache block manager with tiered offload for LLM serving.

Importing kvbm loads no engine, CUDA or NIXL code; those load when a module that needs them
is first used.

Module map (each package's ``__init__`` lists its own modules):

- ``kvbm.manager``: the block manager: which tier holds each block, the plans it returns, the
  offload policy, block events and stats.
- ``kvbm.transfer``: the transfer engine, transfer jobs, and the G1 <-> G2 copy handlers.
- ``kvbm.tiers``: the storage tiers below the engine: the tier contract, the in-memory slot
  index, G2's host buffer.
- ``kvbm.tiers.disk``: G3, the disk tier: directory, LMDB index, slot files, handlers, cascade.
- ``kvbm.remote``: transport between worker processes: NIXL pulls of leased, checksummed blocks.
- ``kvbm.process``: what kvbm does in the processes it runs in: CPU permissions, its own
  threads, exiting with the process that started a server.
- ``kvbm.ids``: identifier types shared by every module (block hash, job id, tier).
- ``kvbm.errors``: kvbm's exceptions.
- ``kvbm.config``: the configuration: one frozen dataclass, validated once.
- ``kvbm.hashing``: block hashing: chained xxh3_128 over token arrays.
- ``kvbm.layout``: block layout and G1 registration across the engine's tensors.
- ``kvbm.integrity``: checksums of block bytes (xxh3_64 per slot), in batches.
- ``kvbm.burst_log``: logs repeated failures once per burst, not once per block.
- ``kvbm.connectors`` (``connectors/``): engine connectors; ``kvbm.connectors.vllm`` is the
  vLLM connector (scheduler and worker sides, plugin hook, stats).
- ``kvbm.serving`` (``serving/``): serving: the serve command, the router, the embedded model,
  vLLM settings and launcher, the ``kvbm`` command line.
"""

__version__ = "0.1.0"
