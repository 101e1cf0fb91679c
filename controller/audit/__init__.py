"""Evidence: the hash-chained audit log, its checkpoints, exports for SIEMs, and offline verification."""
