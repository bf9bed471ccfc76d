"""G3, the disk tier: everything of it in one package.

- ``layout``: G3's directory: what is in it, who may use it, what happens when it does not match.
- ``index``: G3's control plane: the tier's TierIndex, persisted in LMDB.
- ``store``: G3's data plane: slot files read and written in batches by preadv/pwritev threads.
- ``handlers``: the worker's half of G3: transfer handlers for demotion (G2 -> G3), promotion
  (G3 -> G2) and onboarding (G3 -> G1 when G1 is host memory).
- ``cascade``: the manager's half of G3: demotion from G2 under the offload policy, and
  onboarding through G2.
- ``read_failures``: which blocks keep failing to read, so that their tier drops them.
"""
