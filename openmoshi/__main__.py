"""`python -m openmoshi` runs the `openmoshi` command line.

May import: openmoshi.cli.
"""

import sys

from openmoshi.cli.main import main

sys.exit(main())
