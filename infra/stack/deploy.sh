#!/usr/bin/env bash
# Deploy the project to a Prefect server: work pools, the judge limit, the deployments of
# prefect.yaml. `make test-stack` runs this file; the README's deployment steps are its lines
# (tests/test_infra.py checks that they match).
# Needs PREFECT_API_URL; run from the repository root with the project's .venv on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to the server, e.g. http://127.0.0.1:4200/api}"

prefect work-pool create cpu --type process
prefect work-pool create gpu --type process
prefect gcl create longreward-judge --limit 16     # first: the nightly build fails without it
prefect deploy --all                               # from the repository root, in .venv
