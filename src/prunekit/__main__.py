"""``python -m prunekit`` runs the CLI."""

import sys

from prunekit.cli.main import main

sys.exit(main())
