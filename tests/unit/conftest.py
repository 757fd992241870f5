"""The unit tests share their in-memory network and fakes (tests/unit/net.py); with
--import-mode=importlib this folder is not on sys.path by itself."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
