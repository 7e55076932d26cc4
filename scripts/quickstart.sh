#!/usr/bin/env bash
# Set up (or reuse) the environment, then score every filter of the pretrained ResNet-20's
# layer3.2.conv1 on 2,000 CIFAR-10 test images and print the most and least important filters
# with the classes that depend on them most.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
carprune score --model resnet20 --weights ../shared/data/models/resnet20-12fca82f.th \
  --data ../shared/data/cifar10-jpeg.tar.gz --split test --layer "${1:-layer3.2.conv1}" \
  --num-images 2000 --out out/quickstart
