#!/usr/bin/env bash
# The whole story on one machine, CPU is enough: prepare CIFAR-10, build a BadNets record with the CPU training
# recipe cut to 6 epochs (only if record/$RECORD is absent), remove the backdoor with ULRL and print before -> after.
# 6 of the recipe's 18 epochs: about 7 minutes for the attack on 2 cores without native bfloat16 (float32), 1.5 for
# ULRL (measured 8 min 36 s in all, ASR 0.950 -> 0.013, 2026-12-03; docs/speed.md).
#   bash sh/demo.sh                 # RECORD=badnet_cpu_demo by default
set -euo pipefail
cd "$(dirname "$0")/.."
RECORD=${RECORD:-badnet_cpu_demo}
download=()
if [ ! -f data/cifar10/cifar-10-batches-py/data_batch_1 ]; then
    if [ -f ../shared/data/prepare_cifar10.py ]; then
        python ../shared/data/prepare_cifar10.py data/cifar10      # the team's offline copy
    else
        download=(--download True)                                  # the official files, from the internet
    fi
fi
if [ ! -f "record/$RECORD/attack_result.pt" ]; then
    python attack/badnet.py --yaml_path config/attack/prototype/cifar10_cpu.yaml \
        --bd_yaml_path config/attack/badnet/default.yaml --save_folder_name "$RECORD" --epochs 6 "${download[@]}"
fi
python defense/ulrl.py --result_file "$RECORD" --yaml_path config/defense/ulrl/cifar10.yaml --dataset cifar10
