"""The pruning engine: importance criteria, selection, and physical compaction."""
