#!/bin/bash
# issue 14 measurements: sweep-seed pairs run in order, one study at a time per lane
# usage: run.sh SWEEP:SEED ...   (code frozen at /tmp/imgaug/code, commit in COMMIT)
cd /tmp/imgaug
export PYTHONPATH=/tmp/imgaug/code
PY=/work/main/.venv/bin/python
for pair in "$@"; do
  sweep=${pair%%:*}; s=${pair##*:}; name=$sweep-s$s; mkdir -p $name
  start=$(date -u +%s)
  nice $PY -m mnist_tune study --sweep /tmp/imgaug/code/mnist_tune/sweeps/$sweep.yaml --trials 40 --seed $s --study-name $name \
    --storage sqlite:////tmp/imgaug/$name/optuna.db --tracking-uri sqlite:////tmp/imgaug/$name/mlflow.db --threads 1 --no-plots > $name.log 2>&1
  rc=$?
  { echo "# $name: rc $rc, $(( $(date -u +%s) - start )) s wall, code $(cat code/COMMIT)"; grep -v '^\s*$' $name.log | tail -8
    $PY -m mnist_tune best --study $name --storage sqlite:////tmp/imgaug/$name/optuna.db --format json; } > $name.txt 2>&1
done
