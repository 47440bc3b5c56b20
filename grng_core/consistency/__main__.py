"""python -m grng_core.consistency"""

import sys

from grng_core.consistency.cli import main

sys.exit(main())
