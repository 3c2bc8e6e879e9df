"""`python -m blitzdiff ...` is the `blitzdiff` command."""

import sys

from .cli import main

sys.exit(main())
