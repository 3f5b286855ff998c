"""`python -m ensemble.stack`: see ensemble.stack.cli."""

import sys

from ensemble.stack.cli import main

sys.exit(main())
