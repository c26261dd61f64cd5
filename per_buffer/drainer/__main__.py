"""``python -m per_buffer.drainer``: a drainer whose options arrive on standard input."""

import sys

from ._process import main

sys.exit(main())
