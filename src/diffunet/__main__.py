"""`python -m diffunet` runs the command line (useful under `torchrun`)."""

import sys

from .cli import main

sys.exit(main())
