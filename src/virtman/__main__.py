from __future__ import annotations

import sys

from virtman.cli.main import main

sys.exit(main())
