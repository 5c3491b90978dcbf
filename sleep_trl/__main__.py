"""`python -m sleep_trl RECIPE.yaml` and `accelerate launch -m sleep_trl RECIPE.yaml`."""

import sys

from .cli import main

sys.exit(main())
