"""``python -m sigreg_kernels``: the environment report for bug reports (see _env_report.py)."""

import sys

from ._env_report import main

sys.exit(main())
