"""`python -m diffunet` runs the command line (useful under `torchrun`)."""

import sys

from diffunet.cli import main

sys.exit(main())
