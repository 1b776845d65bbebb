"""``python -m dit_engine.cli ...`` (e.g. under torchrun) is the ``dit`` command."""

import sys

from . import main

sys.exit(main())
