"""`python -m builder` is the `build` command."""

import sys

from .cli import main

sys.exit(main())
