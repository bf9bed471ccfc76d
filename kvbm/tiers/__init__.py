"""Storage tiers below the engine.

- ``base``: the tier contract: what the manager needs from any storage level below the engine.
- ``slot_index``: the in-memory TierIndex (hash -> slot, LRU order, leases, two-phase store);
  G2 uses it as is.
- ``host``: G2's data plane: one kvbm-owned host buffer of fixed-size slots.
- ``disk``: G3, the disk tier, in a package of its own.
"""
