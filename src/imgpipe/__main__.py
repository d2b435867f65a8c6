"""`python -m imgpipe ...`: the same as the `imgpipe` command."""

import sys

from imgpipe.serving.cli import main

sys.exit(main())
