#!/usr/bin/env bash
# Deploy the project to a Prefect server: work pools, the judge limit, the deployments of
# prefect.yaml, and the automations that operate the nightly (infra/stack/automations.py).
# Running it again updates everything in place (an existing judge limit is kept as it is).
# `make test-stack` runs this file; the README's deployment steps are its lines
# (tests/test_infra.py checks that they match).
# Needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING when the server asks for one); run from the
# repository root with the project's .venv on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to the server, e.g. http://127.0.0.1:4200/api}"

prefect work-pool create cpu --type process --overwrite
prefect work-pool create gpu --type process --overwrite
prefect gcl inspect longreward-judge >/dev/null 2>&1 || prefect gcl create longreward-judge --limit 16   # before the nightly runs
prefect deploy --all                               # from the repository root, in .venv
python infra/stack/automations.py                  # crash zombie runs, retry a crashed nightly
