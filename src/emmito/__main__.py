"""``python -m emmito``: the same as the ``emmito`` command."""

import sys

from emmito.cli import main

sys.exit(main())
