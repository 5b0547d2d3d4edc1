#!/bin/sh
# One prepared run on a lent GPU machine: the GPU speed figure, then the bundled ACDC model's denoiser
# fine-tuned at GPU scale. Made for the project's device tool (README, Development: on a lent GPU):
#
#   here:  .venv/bin/python Testing/Device/prepare_gpu_kit.py          # .gpu_kit/: pack, speed case, MONAI wheel
#   there: run  command="sh Testing/Device/gpu_session.sh"  carry=[".gpu_kit"]  timeout_s=600
#
# The image there has PyTorch, OpenCV, scikit-image, SciPy and safetensors; MONAI comes from the kit and SimpleITK is
# not needed (calid.training.pack). Back under $OUT: gpu.txt, speed.md, train.log, metrics.csv and the trained
# model's model.json and model.safetensors. Its error head's calibration is left for this machine to refit on the
# full-size stacks (--no-recalibrate; the command is in the README). STEPS (default 1500) sets the length: a step of
# batch 128 was estimated at about 0.2 s there (the batch is made on the CPU), so about 5 of the 10 minutes a
# command may take. Should a step take longer, the training is stopped after TRAIN_S seconds (default 460) so that
# the command still ends in time and metrics.csv (its seconds per step) comes back; the model then does not.
# DEVICE=cpu PYTHON=.venv/bin/python STEPS=2 OUT=DIR rehearses it on this machine.
set -eu
: "${OUT:?OUT is not set: this runs on the device machine}"
STEPS="${STEPS:-1500}" TRAIN_S="${TRAIN_S:-460}" DEVICE="${DEVICE:-cuda}" PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_kit/monai-*.whl
export PYTHONPATH="/tmp/site:$PWD/CaLIDUpsample" PYTHONUNBUFFERED=1
RUN="$(mktemp -d)/run"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
    | tee "$OUT/gpu.txt"
"$PYTHON" Testing/Device/gpu_speed.py .gpu_kit/speed_case.npz --device "$DEVICE" --threads 16 2>&1 | tee "$OUT/speed.md"
timeout "$TRAIN_S" "$PYTHON" -m calid train --pack .gpu_kit/acdc.npz --init calid-acdc --output "$RUN" --device "$DEVICE" --threads 16 \
    --flows-up-front --no-recalibrate --denoiser-steps "$STEPS" --denoiser-batch 128 --lr 2e-4 --warmup 100 \
    --val-every 500 --val-volumes 8 --checkpoint-every 500 --seed 4 --progress none --name calid-acdc-gpu \
    --description "calid-acdc's denoiser fine-tuned $STEPS steps of batch 128 on one GPU (Testing/Device/gpu_session.sh)" \
    2>&1 | tee "$OUT/train.log"
cp "$RUN/metrics.csv" "$OUT/" || true
cp "$RUN/model/model.json" "$RUN/model/model.safetensors" "$OUT/"
