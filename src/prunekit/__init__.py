"""prunekit: make PyTorch models smaller and faster by pruning, and say honestly what you got."""

from prunekit.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
