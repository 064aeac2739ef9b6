"""`python -m openmoshi` runs the `openmoshi` command line."""

import sys

from openmoshi.cli.main import main

sys.exit(main())
