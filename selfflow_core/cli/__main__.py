"""``python -m selfflow_core.cli``: the ``selfflow`` command (as ``-m selfflow_core.cli.main``)."""

import sys

from selfflow_core.cli.main import main

sys.exit(main())
