"""Command-line interface; the only part of prunekit that prints."""
