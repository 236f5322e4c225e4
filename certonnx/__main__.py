"""``python -m certonnx`` (used by torchrun for multi-process training)."""

import sys

from certonnx.cli import main

sys.exit(main())
