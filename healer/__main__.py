"""`python -m healer` runs the command-line interface."""

import sys

from healer.cli import main

sys.exit(main())
