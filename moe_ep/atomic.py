"""Atomic file writes for the runtime: the one implementation lives in `eplb.atomic` (eplb never
imports moe_ep, so the shared piece sits in the lower layer)."""
from eplb.atomic import TMP_PREFIX, atomic_write, is_temp_file, write_bytes_atomic, write_json_atomic  # noqa: F401
