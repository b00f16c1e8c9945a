"""``python -m tasks.data prepare ...``: see :mod:`tasks.data.prepare`."""

import sys

from tasks.data.prepare import main

sys.exit(main())
