"""Stage: publish the pairs as Parquet, a `datasets` folder and a manifest."""

from __future__ import annotations

from prefect import get_run_logger, task

from longreward_core.data.records import BuildManifest
from longreward_core.pipeline.build import publish_dataset


@task(name="publish", retries=1)
def publish(pairs_path: str, out_dir: str, manifest: BuildManifest) -> str:
    """Path of the manifest; the dataset folder is beside it."""
    path = publish_dataset(pairs_path, out_dir, manifest)
    get_run_logger().info("published %s", path.parent)
    return str(path)
