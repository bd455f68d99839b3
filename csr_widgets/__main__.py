"""``python -m csr_widgets``: the csr-widgets command, in the form torchrun launches it:
``torchrun --nproc_per_node=N -m csr_widgets train ...`` (docs/training.md#on-a-cluster)."""
import sys

from .cli import main

sys.exit(main())
