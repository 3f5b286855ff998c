"""`python -m ensemble.retrieve`: see ensemble.retrieve.cli."""

import sys

from ensemble.retrieve.cli import main

sys.exit(main())
