"""`python -m llamaherd` is `herd`."""

import sys

from .cli import main

sys.exit(main())
