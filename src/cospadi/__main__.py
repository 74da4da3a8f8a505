"""`python -m cospadi ...` (what torchrun starts on every rank): the command line."""
import sys

from .cli import main

sys.exit(main())
