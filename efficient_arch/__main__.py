"""``python -m efficient_arch`` == the ``efficient-arch`` console script."""

import sys

from efficient_arch.cli import main

sys.exit(main())
