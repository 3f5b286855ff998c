"""`python -m ensemble.report`: see ensemble.report.cli."""

import sys

from ensemble.report.cli import main

sys.exit(main())
