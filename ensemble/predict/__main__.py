"""`python -m ensemble.predict`: see ensemble.predict.cli (nothing here is pickled by Ray)."""

import sys

from ensemble.predict.cli import main

sys.exit(main())
