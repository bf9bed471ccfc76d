"""Storage tiers below the engine: the contract (``base``), the in-memory slot index that
implements it (``slot_index``), G2's host buffer (``host``), and G3's directory
(``disk_layout``), LMDB index (``disk_index``) and slot files (``disk_store``)."""
