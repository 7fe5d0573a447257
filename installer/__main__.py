"""`python3 -m appliance.installer`: the installer's entry point (install.sh runs it)."""

import sys

from appliance.installer.cli import main

sys.exit(main())
