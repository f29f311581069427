"""`python -m rsclip_jax` is the `rsclip` command."""

import sys

from rsclip_jax.cli import main

sys.exit(main())
