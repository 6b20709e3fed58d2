"""Prefect tasks: thin wrappers over longreward_core, one file per stage.

They add names, retries, caching and logging; the work itself is in longreward_core.pipeline. Tasks
pass file paths, never data frames, and every output file is written atomically.
"""
