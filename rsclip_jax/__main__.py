"""`python -m rsclip_jax` is the `rsclip` command."""

import sys

from rsclip_jax.entry import main

sys.exit(main())
