"""`python3 -m installer`: the installer's entry point (install.sh runs it)."""

import sys

from installer.cli import main

sys.exit(main())
