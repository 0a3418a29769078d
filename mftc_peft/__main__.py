"""`python -m mftc_peft ...` is the `mftc-peft` command."""

import sys

from .cli import main

sys.exit(main())
