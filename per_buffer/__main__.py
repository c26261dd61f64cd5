"""``python -m per_buffer``: the same ``per-buffer`` command as the console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
