"""``python -m per_buffer.testing``: serve Per on loopback (see :func:`per_buffer.testing.main`)."""

import sys

from ._process import main

if __name__ == "__main__":
    sys.exit(main())
