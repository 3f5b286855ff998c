"""`python -m ensemble.tune`: see ensemble.tune.cli (nothing here is pickled by Ray)."""

import sys

from ensemble.tune.cli import main

sys.exit(main())
