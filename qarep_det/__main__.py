"""``python -m qarep_det`` is the ``qarep-det`` console command."""

import sys

from qarep_det.cli.main import main

sys.exit(main())
