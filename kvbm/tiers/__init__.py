"""Storage tiers below the engine: the contract (``base``), the in-memory slot index that
implements it (``slot_index``), and G2's host buffer (``host``)."""
