import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .cli import main

sys.exit(main())
