#!/usr/bin/env bash
# The CUDA checks, in one short run on a GPU machine (writes its outputs to ${OUT:-.}/):
#   MNIST_TUNE_DATA=<folder with MNIST/raw> bash benchmarks/gpu_check.sh
# 1. the device-parametrised tests on cuda (hand-written MLP step = autograd, FlatAdamW = AdamW,
#    CUDA-graph replay = eager steps, fit learns, bf16 autocast path), 2. epoch time seed vs ours
#    for the MLP and the Mixer (patch 7, dim 128, depth 8), with and without the CUDA graph, with
#    amp / compile, 3. N workers sharing the GPU.
record=gpu.txt source "$(dirname "$0")/gpu_preamble.sh"
timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_optim.py -m "not slow" 2>&1 \
    | tee "$out/gpu_tests.txt" | tail -15
timeout 120 $py benchmarks/epoch_time.py --device cuda --models mlp --batch-sizes 32,100,256 --epochs 2 \
    --variants nograph,default 2>&1 | tee "$out/epoch_time_cuda_mlp.txt"
timeout 170 $py benchmarks/epoch_time.py --device cuda --models mixer --mixer-dim 128 --mixer-depth 8 \
    --batch-sizes 100 --epochs 2 --variants nograph,default,amp,compile 2>&1 | tee "$out/epoch_time_cuda_mixer.txt"
timeout 90 $py benchmarks/device_sharing.py --device cuda --workers 1,2,4 --epochs 5 2>&1 \
    | tee "$out/device_sharing_cuda.txt"
