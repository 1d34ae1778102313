"""``python -m deploy_diff.cli`` (what ``torchrun ... -m deploy_diff.cli train`` runs)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
