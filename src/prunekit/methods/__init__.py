"""Pruning methods, one file each, on the plug-in interface of :mod:`prunekit.methods.base`.

Importing this package registers the built-in methods (``oneshot``, ``gradual``,
``filter_config``, ``hyperspherical``, ``autobot``) and retraining extensions (weight and LR
rewinding). A method registered elsewhere (a user's module, a test) works through ``prunekit
run`` and ``prunekit prune`` the same way: see docs/architecture.md, "Adding a method".
"""

from prunekit.methods import autobot, filter_config, gradual, hyperspherical, oneshot, retraining  # noqa: F401  (registration)
from prunekit.methods.base import (METHODS, RETRAIN_EXTENSIONS, Method, MethodContext, Plugin, PruneResult,
                                   plugins_for, register_method, run_prune, validate_method)

__all__ = ["METHODS", "RETRAIN_EXTENSIONS", "Method", "MethodContext", "Plugin", "PruneResult", "plugins_for",
           "register_method", "run_prune", "validate_method"]
