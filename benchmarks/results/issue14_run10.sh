#!/bin/bash
# issue 14, the sweep's own epochs: sweep-seed pairs run in order, one study at a time per lane, one torch thread each
# usage: run.sh SWEEP:SEED ...   (code frozen at /tmp/i14/code, commit in COMMIT)
cd /tmp/i14
export PYTHONPATH=/tmp/i14/code
PY=/work/main/.venv/bin/python
for pair in "$@"; do
  sweep=${pair%%:*}; s=${pair##*:}; name=$sweep-s$s; mkdir -p $name
  start=$(date -u +%s)
  $PY -m mnist_tune study --sweep /tmp/i14/code/mnist_tune/sweeps/$sweep.yaml --trials 40 --seed $s --study-name $name \
    --storage sqlite:////tmp/i14/$name/optuna.db --tracking-uri sqlite:////tmp/i14/$name/mlflow.db --threads 1 --no-plots > $name.log 2>&1
  rc=$?
  { echo "# $name: rc $rc, $(( $(date -u +%s) - start )) s wall, code $(cat code/COMMIT), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
    echo "# PYTHONPATH=/tmp/i14/code python -m mnist_tune study --sweep mnist_tune/sweeps/$sweep.yaml --trials 40 --seed $s --study-name $name --storage sqlite:///.../optuna.db --tracking-uri sqlite:///.../mlflow.db --threads 1 --no-plots"
    grep -v '^\s*$' $name.log | tail -8
    $PY -m mnist_tune best --study $name --storage sqlite:////tmp/i14/$name/optuna.db --format json; } > $name.txt 2>&1
done
