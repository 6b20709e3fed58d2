"""LongReward scoring engine: the plain library (no orchestration imports)."""

import os

# litellm otherwise fetches its model price table from the network at import time.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
