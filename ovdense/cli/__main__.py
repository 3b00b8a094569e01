"""``python -m ovdense.cli``: the ``ovdense`` command."""

import sys

from ovdense.cli import main

sys.exit(main())
