"""``python -m eplb``."""
import sys

from .cli import main

sys.exit(main())
