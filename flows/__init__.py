"""Prefect flows: ordering, fan-out, parameters, schedules and artifacts over the stage tasks."""
