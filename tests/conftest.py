import os
import sys
import tempfile
from pathlib import Path

# tests/tiny.py is imported as `tiny` by the test modules
sys.path.insert(0, str(Path(__file__).parent))

# A private structure cache per test session: no test depends on what a user's cache holds.
os.environ.setdefault("LORAPLAN_CACHE_DIR", tempfile.mkdtemp(prefix="loraplan-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
