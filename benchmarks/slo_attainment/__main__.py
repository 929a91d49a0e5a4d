"""``python -m benchmarks.slo_attainment``."""

import sys

from benchmarks.slo_attainment.run import main

sys.exit(main())
