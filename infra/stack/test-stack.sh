#!/usr/bin/env bash
# `make test-stack`: start the stack (infra/stack/stack.sh), run tests/stack against it (they
# deploy with infra/stack/deploy.sh and start the workers), and stop and remove everything at
# the end, whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=$(mktemp -d /tmp/longreward-stack.XXXXXX)
cleanup() {
    bash infra/stack/stack.sh down "$dir"
    # deploy.sh links the checkout where the deployments' pull step looks for the code.
    if [ "$(readlink /opt/longreward 2>/dev/null)" = "$PWD" ]; then rm -f /opt/longreward; fi
}
trap cleanup EXIT
bash infra/stack/stack.sh up "$dir"
# shellcheck disable=SC1091
source "$dir/env"
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -p no:cacheprovider tests/stack "$@"
