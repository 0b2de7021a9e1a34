#!/usr/bin/env bash
# Builds .devcoll (git-excluded) for the device machine: the collection as
# ansible_collections/llmfleet/serving and ansible-core's wheels, to name in the run's `carry`.
set -eu
cd "$(dirname "$0")/../.."
grep -qx '/.devcoll/' .git/info/exclude 2>/dev/null || echo '/.devcoll/' >> .git/info/exclude
dest=.devcoll/ansible_collections/llmfleet/serving
mkdir -p "$dest" .devcoll/whl
# roles/ and playbooks/ ride along so the preflight role can run there too.
rsync -a --delete --exclude __pycache__ plugins meta galaxy.yml roles playbooks "$dest/"
if ! ls .devcoll/whl/ansible_core-2.19.14-*.whl >/dev/null 2>&1; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .devcoll/whl \
    ansible-core==2.19.14 resolvelib==1.0.1
fi
du -sh .devcoll
