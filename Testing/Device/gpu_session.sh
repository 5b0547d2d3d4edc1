#!/bin/sh
# One prepared run on a lent GPU machine: the issue's GPU speed figure, then two denoisers trained side by side on
# the bundled ACDC model's VAE, motion and last step. Made for the project's device tool (README, Development: on a
# lent GPU):
#
#   here:  .venv/bin/python Testing/Device/prepare_gpu_kit.py          # .gpu_kit/: pack, speed case, MONAI wheel
#   there: run  command="sh Testing/Device/gpu_session.sh"  carry=[".gpu_kit"]  timeout_s=600
#
# The two runs answer the question stops 34-39 left (docs/measurements.md): is the latent estimate short for want of
# training or of capacity?
#   tuned: calid-acdc's own denoiser (widths 32,64,128) fine-tuned for STEPS (default 1500) steps of batch 128;
#   wide:  a new denoiser of widths WIDE (default 64,128,256, about 4x the parameters) trained from scratch for
#          WIDE_STEPS (default 1000) steps of batch 128 (calid train --denoiser-channels).
# Each stops after MINUTES (default 5.5) minutes of training whatever its steps (--denoiser-minutes) and exports its
# weights as they are, so both models come back inside the device's 10 minutes (the TRAIN_S timeout, 470 s, is only
# a last guard). The image there has PyTorch, OpenCV, scikit-image, SciPy and safetensors; MONAI comes from the kit
# and SimpleITK is not needed (calid.training.pack). The device tool returns at most 8 files of at most 16 MiB, so
# what comes back under $OUT is runs.tgz (gpu.txt, speed.md, and for each run NAME.log, NAME_metrics.csv and
# NAME.json, its model.json) and each run's model.safetensors as NAME.safetensors, or in parts of 15 MiB
# (NAME.safetensors.part00, ...) when larger: the wide model's is about 32 MB. Here: tar xzf runs.tgz, then
# cat NAME.safetensors* > FOLDER/model.safetensors beside NAME.json as FOLDER/model.json. The error heads'
# calibration is left for this machine to refit on the full-size stacks (--no-recalibrate; the command is in the README).
# DEVICE=cpu PYTHON=.venv/bin/python STEPS=2 WIDE_STEPS=2 MINUTES=1 TRAIN_S=1800 OUT=DIR rehearses it on this machine.
set -eu
: "${OUT:?OUT is not set: this runs on the device machine}"
STEPS="${STEPS:-1500}" WIDE_STEPS="${WIDE_STEPS:-1000}" WIDE="${WIDE:-64,128,256}" MINUTES="${MINUTES:-5.5}"
TRAIN_S="${TRAIN_S:-470}" DEVICE="${DEVICE:-cuda}" PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_kit/monai-*.whl
export PYTHONPATH="/tmp/site:$PWD/CaLIDUpsample" PYTHONUNBUFFERED=1
RUN="$(mktemp -d)" SMALL="$(mktemp -d)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } \
    | tee "$SMALL/gpu.txt"
"$PYTHON" Testing/Device/gpu_speed.py .gpu_kit/speed_case.npz --device "$DEVICE" --threads 16 2>&1 | tee "$SMALL/speed.md"

train() {  # NAME DESCRIPTION [calid train options]: one run on half the CPU's threads; its files kept for $OUT
    name="$1" description="$2"
    shift 2
    timeout "$TRAIN_S" "$PYTHON" -m calid train --pack .gpu_kit/acdc.npz --init calid-acdc --output "$RUN/$name" \
        --device "$DEVICE" --threads 8 --flows-up-front --no-recalibrate --denoiser-batch 128 --warmup 100 \
        --denoiser-minutes "$MINUTES" --val-every 500 --val-volumes 8 --checkpoint-every 500 --seed 4 \
        --progress none --name "calid-acdc-$name" --description "$description (Testing/Device/gpu_session.sh)" "$@" \
        > "$SMALL/$name.log" 2>&1 || echo "$name: exit $?" >> "$SMALL/$name.log"
    cp "$RUN/$name/metrics.csv" "$SMALL/${name}_metrics.csv" || true
    cp "$RUN/$name/model/model.json" "$SMALL/$name.json" || true
    weights="$RUN/$name/model/model.safetensors"
    if [ ! -f "$weights" ]; then
        return
    elif [ "$(wc -c < "$weights")" -gt 15728640 ]; then
        "$PYTHON" -c 'import sys; data, part = open(sys.argv[1], "rb").read(), 15 << 20
for i, start in enumerate(range(0, len(data), part)):
    open(f"{sys.argv[2]}{i:02d}", "wb").write(data[start:start + part])' "$weights" "$OUT/$name.safetensors.part"
    else
        cp "$weights" "$OUT/$name.safetensors"
    fi
}
train tuned "calid-acdc's denoiser fine-tuned up to $STEPS steps of batch 128 on one GPU" \
    --denoiser-steps "$STEPS" --lr 2e-4 &
train wide "a new denoiser of widths $WIDE on calid-acdc's VAE, up to $WIDE_STEPS steps of batch 128 on one GPU" \
    --denoiser-steps "$WIDE_STEPS" --denoiser-channels "$WIDE" --lr 3e-4 &
wait
tail -n 3 "$SMALL/tuned.log" "$SMALL/wide.log"
tar -czf "$OUT/runs.tgz" -C "$SMALL" .
ls -l "$OUT"
