#!/bin/bash
# trial 0 of a default mlp study (the seed's configuration), real MNIST, 10 epochs, study seeds 0-2
export PYTHONPATH=/work/wt-sweeps MNIST_TUNE_HOME=/tmp/anchor/mlruns
unset MNIST_TUNE_DATA MNIST_TUNE_CHECKSUMS
for seed in 0 1 2; do
  echo "== mnist-tune study --model mlp --trials 1 --seed $seed --study-name seed-anchor-$seed --no-plots --threads 1"
  nice /work/main/.venv/bin/python -m mnist_tune study --model mlp --trials 1 --seed $seed --study-name seed-anchor-$seed --no-plots --threads 1 2>&1 | grep -v "it/s\|s/it\|%|"
  /work/main/.venv/bin/python -m mnist_tune best --study seed-anchor-$seed
  /work/main/.venv/bin/python -m mnist_tune best --study seed-anchor-$seed --format json
done
