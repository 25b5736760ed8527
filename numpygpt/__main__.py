"""``python -m numpygpt train|generate|gradcheck``: the same as the ``numpygpt`` command."""

import sys

from numpygpt.cli import main

sys.exit(main())
