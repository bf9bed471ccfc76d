"""The block manager: which tier holds each block, and the transfer jobs that move blocks.

- ``block_manager``: :class:`~kvbm.manager.block_manager.BlockManager`: lookups, onboard and
  offload planning, leases, commits of job results.
- ``plans``: what a lookup found and what an onboarding moves (the manager's return values).
- ``policy``: the offload policy: when a block computed in the engine is copied down to G2.
- ``events``: block stored/removed events, for KV-aware routing.
- ``stats``: typed per-tier stats snapshots, their JSON form and Prometheus text.
"""
