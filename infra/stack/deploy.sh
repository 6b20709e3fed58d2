#!/usr/bin/env bash
# Deploy the project to a Prefect server: the README's "Against any Prefect server" steps, as
# `make test-stack` runs them (the README's block is checked against this file by the tests).
# Needs PREFECT_API_URL; run from the repository root with the project's .venv on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PREFECT_API_URL:?set PREFECT_API_URL to the server, e.g. http://127.0.0.1:4200/api}"

prefect work-pool create cpu --type process
prefect work-pool create gpu --type process
prefect gcl create longreward-judge --limit 16     # first: the nightly build fails without it
ln -sfn "$PWD" /opt/longreward                     # where the deployments' pull step finds the code
prefect deploy --all                               # from the repository root, in .venv
