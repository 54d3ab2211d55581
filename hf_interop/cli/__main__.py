"""`python -m hf_interop.cli` runs the `hf-interop` command."""

import sys

from . import main

sys.exit(main())
