#!/usr/bin/env bash
# Trial packs on a CUDA machine, in one short run (~8 min; writes its outputs to ${OUT:-.}/):
#   MNIST_TUNE_DATA=<folder with MNIST/raw> bash benchmarks/gpu_pack_check.sh
# 1. the pack tests on cuda (a pack = its members' separate trainings step by step, through the
#    captured CUDA graph; compaction; refill), 2. the --pack auto dry run, 3. pack_throughput:
#    trials/hour of the mlp and mixer sweeps, sequential vs K = 4, 16 (mlp), auto, with the
#    pruning costs (masked vs compacted vs refilled), shrunk to fit (see its --help for the full run).
record=gpu_pack.txt source "$(dirname "$0")/gpu_preamble.sh"
timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_pack.py tests/test_train.py -k "pack or graph" 2>&1 \
    | tee "$out/gpu_pack_tests.txt" | tail -15
timeout 200 $py benchmarks/pack_throughput.py --device cuda --sweeps mlp --packs 1,4,16,auto --seeds 0 \
    --trials 16 --epochs 2 --out "$out" 2>&1 | tee "$out/pack_throughput_cuda_mlp.txt"
timeout 160 $py benchmarks/pack_throughput.py --device cuda --sweeps mixer --packs 1,4,auto --seeds 0 \
    --trials 8 --epochs 1 --train-subset 20000 --out "$out/mixer" 2>&1 | tee "$out/pack_throughput_cuda_mixer.txt"
