"""``python -m arrcoc.lmms_tasks OUT``: export ToyVQA as an lmms-eval task folder."""

import sys

from . import main

sys.exit(main())
