#!/usr/bin/env bash
# Runs on the device machine (the `run` tool), from the repository root, with .devcoll carried:
#   bash tests/device/run.sh LABEL
# Captures raw NVIDIA outputs, an NVML call recording and a sysfs snapshot, runs the gpu_info
# module through ansible-playbook -c local (basic, full, nvidia-smi only, sysfs only), runs
# bench/gpu_info.py, sanitizes serials/UUIDs, and leaves one tarball plus logs in $OUT.
# Prepare here first: tests/device/prepare.sh
set -u
label=${1:-device}
export PATH=/usr/local/nvidia/bin:$PATH LC_ALL=C.UTF-8 LANG=C.UTF-8 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcoll/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devcoll
export ANSIBLE_COLLECTIONS_PATH=$PWD/.devcoll ANSIBLE_CONFIG=$PWD/tests/device/ansible.cfg
export ANSIBLE_LOCAL_TEMP=/tmp/ansible-local ANSIBLE_REMOTE_TEMP=/tmp/ansible-remote
cap=$OUT/$label
mkdir -p "$cap"
python3 --version; python3 -c 'import pynvml, jinja2, yaml; print("pynvml", pynvml.__file__)'
nvidia-smi -L | sed -E 's/UUID: [^)]*/UUID: .../'
step() { local name=$1 t0; shift; t0=$(date +%s.%N); "$@"; local rc=$?; echo "step $name rc=$rc $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || true)s"; }
step xml  sh -c "nvidia-smi -q -x > $cap/nvidia-smi-q-x.xml"
step q    sh -c "nvidia-smi -q > $cap/nvidia-smi-q.txt"
step csv  sh -c "nvidia-smi \$(python3 -c 'from ansible_collections.llmfleet.serving.plugins.module_utils._gpu import query_gpu_args as a; print(\" \".join(a()))') > $cap/query-gpu.csv 2>&1"
step topo sh -c "nvidia-smi topo -m > $cap/topo.txt 2>&1"
step nvlink sh -c "nvidia-smi nvlink -s > $cap/nvlink-s.txt 2>&1"
step help sh -c "nvidia-smi --help-query-gpu > $cap/help-query-gpu.txt 2>&1"
step nvml sh -c "python3 tests/device/nvml_record.py > $cap/nvml-record.json 2> $cap/nvml-record.err"
step sysfs python3 tests/device/sysfs_snapshot.py "$cap/sysfs"
export CAPTURE_DIR=$cap
step playbook sh -c "/tmp/site/bin/ansible-playbook -c local -i localhost, tests/device/gpu_info.yml > $cap/playbook.log 2>&1"
tail -n 25 "$cap/playbook.log"
if [ -f .devcoll/ansible_collections/llmfleet/serving/playbooks/preflight.yml ]; then
  step preflight sh -c "/tmp/site/bin/ansible-playbook -i tests/device/inventory.yml .devcoll/ansible_collections/llmfleet/serving/playbooks/preflight.yml -e preflight_enforce=false > $cap/preflight.log 2>&1"
  tail -n 30 "$cap/preflight.log"
fi
# Where a module process spends its time: imports, then a profile of one basic run.
mod=ansible_collections.llmfleet.serving.plugins.modules.gpu_info
python3 -X importtime -m $mod '{"ANSIBLE_MODULE_ARGS": {}}' 2> "$cap/importtime.txt" > /dev/null
python3 -m cProfile -s cumulative -m $mod '{"ANSIBLE_MODULE_ARGS": {}}' 2>&1 | grep -A40 'Ordered by' > "$cap/cprofile.txt"
step bench sh -c "python3 bench/gpu_info.py --playbook --repeat 7 --json $cap/bench.json > $cap/bench.txt 2>&1"
cat "$cap/bench.txt"
python3 tests/device/sanitize.py "$cap"
tar -C "$OUT" -czf "$OUT/$label.tgz" "$label" && rm -rf "$cap"
ls -la "$OUT"
