# Sourced by the GPU checks (gpu_check.sh, gpu_pack_check.sh): sets $out and $py and writes
# the record's header (commit, GPU, torch) to $out/$record.
set -u -o pipefail
out=${OUT:-.}
{ echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"; git status --short 2>/dev/null; } | tee "$out/$record"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/$record"
$py -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/$record"
