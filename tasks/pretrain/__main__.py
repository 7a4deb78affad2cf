"""`python -m tasks.pretrain CONFIG [--ship]`: rebuild (or check) the shipped pretrained base."""

import sys

from tasks.pretrain import main

sys.exit(main())
