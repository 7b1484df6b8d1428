"""Pruning methods, each a small set of Trainer hooks (plus a schedule or LR plan where needed)."""
