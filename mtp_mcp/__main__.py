"""python -m mtp_mcp: the same as the mtp-mcp command."""

import sys

from mtp_mcp.cli import main

sys.exit(main())
