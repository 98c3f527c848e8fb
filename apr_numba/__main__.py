"""``python -m apr_numba`` == ``apr-numba``."""

import sys

from apr_numba.cli.main import main

sys.exit(main())
