#!/usr/bin/env bash
# Every GPU check in one call, for a machine lent for a few minutes: the dense tests on CUDA (mmcv's
# CUDA kernels against its CPU ops, the four mmseg configs, torchrun through mmengine's launcher with
# NCCL), the other CUDA tests (our step's losses vs the reference's, pretraining, linear probe and
# kNN under torchrun on NCCL), then the figures of docs/benchmarks.md: the pretraining step (B<-L
# and S<-B at batch 128, bf16, ours vs the reference, eager and compiled; the DINOv3 recipes B<-L/16
# and S<-7B/16, ours only, the 7B teacher in bf16; S and B from one DINOv2 g pass, the teacher-sharing
# speedup), the input pipeline per worker count, the DALI loader's img/s on one GPU and the end-to-end step
# (Ti <- S and S <- B) with each --loader, and the logistic regression on CUDA.
# Each log goes to $OUT (default ./gpu_checks) as it runs, so a run cut short keeps what finished.
#
#   bash scripts/gpu_checks.sh                 # everything
#   bash scripts/gpu_checks.sh b_l s_b logreg  # only these steps (names as in the logs), e.g. a rerun
#   STEPS=5 bash scripts/gpu_checks.sh         # fewer timed steps
#
# Wheels for packages the machine lacks or has in an unsupported version (requirements.txt: timm
# >=1.0.9,<1.1, pillow <13; mmengine, mmsegmentation, albumentations and their dependencies; an mmcv
# wheel built with FORCE_CUDA=1 for the machine's python and torch; nvidia-dali-cuda130 or -cuda120 as torch's
# CUDA, with its nvidia-* and optree, makefun, astunparse, gast, libcst dependencies) can sit in .whl/: they are
# installed into /tmp/site first. docs/benchmarks.md lists the set for an offline H200 machine.
set -uo pipefail
OUT=${OUT:-gpu_checks}
STEPS=${STEPS:-20}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

ONLY=" $* "
run() {  # run NAME CMD...: log to $OUT/NAME.log, keep going on failure; skip NAME if not asked for
  local name=$1; shift
  [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
  echo "== $name: $*" | tee "$OUT/$name.log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

run env bash -c "nvidia-smi; git rev-parse HEAD 2>/dev/null; $PYTHON -c 'import torch, timm, torchvision;
print(torch.__version__, torch.version.cuda, timm.__version__, torchvision.__version__, torch.cuda.get_device_name())'"
run mmcv "$PYTHON" -c "import mmcv, mmseg; from mmcv.ops import get_compiling_cuda_version as v
print('mmcv', mmcv.__version__, 'CUDA ops:', v(), 'mmseg', mmseg.__version__)"
pytest=("$PYTHON" -m pytest -q -rs -p no:cacheprovider)
run dense timeout 420 "${pytest[@]}" tests/test_dense.py
run cuda_tests timeout 300 "${pytest[@]}" -k "cuda or nccl" tests/test_benchmark.py tests/test_pretrain_launch.py \
  tests/test_linear_eval.py tests/test_teachers.py tests/test_loaders.py tests/test_dali.py
step=("$PYTHON" -m pretrain.benchmark --batch-size 128 --precision bf16 --warmup 5 --steps "$STEPS")
run b_l "${step[@]}" --teacher dinov2_vitl14 --student vit_base --reference
run b_l_compile "${step[@]}" --teacher dinov2_vitl14 --student vit_base --compile
run s_b "${step[@]}" --teacher dinov2_vitb14 --student vit_small --reference
run s_b_compile "${step[@]}" --teacher dinov2_vitb14 --student vit_small --compile
run b_l_dinov3 "${step[@]}" --teacher dinov3_vitl16 --student vit_base
run s_7b_dinov3 "${step[@]}" --teacher dinov3_vit7b16 --student vit_small
# a CNN student (channels-last on CUDA) against a ViT-S of similar cost, from the same teacher
run r50_b "${step[@]}" --teacher dinov2_vitb14 --student timm:resnet50
run s_b_plain "${step[@]}" --teacher dinov2_vitb14 --student vit_small
# one DINOv2 g pass for S and B (--student a,b): the joint step vs each student's own; teacher-sharing speedup
run sb_g_shared "${step[@]}" --teacher dinov2_vitg14 --student vit_small,vit_base
run pipeline "$PYTHON" -m pretrain.benchmark --pipeline --images 512 --workers 1,4,8,15
# --loader dali: its pipeline's img/s on one GPU per count of its CPU threads (the CPU loaders', on the same mix of JPEGs: `pipeline`)
run pipeline_dali "$PYTHON" -m pretrain.benchmark --pipeline --loaders dali --device cuda --images 2048 \
  --pipeline-batch 128 --workers 4,8,15
# the end-to-end step with each loader: pretrain.main, random teacher, batch 128, bf16, 30 iterations on 4096
# generated JPEGs (made once, in $E2E_DATA); the img/s of its progress lines after the first is the figure
E2E_DATA=${E2E_DATA:-/tmp/proteus_e2e/data}
e2e() {  # e2e TEACHER STUDENT LOADER
  [ -d "$E2E_DATA/train" ] || "$PYTHON" -c "from pathlib import Path; from pretrain.benchmark import generate_jpegs
generate_jpegs(Path('$E2E_DATA'), 4096)"
  rm -rf "/tmp/proteus_e2e/$2_$3"  # a fresh run each time, not a resume of the last one
  "$PYTHON" -m pretrain.main --data-path "$E2E_DATA" --teacher "$1" --random-teacher --student "$2" --loader "$3" \
    --batch-size 128 --precision bf16 --epochs 1 --epoch-length 30 --warmup-epochs 0 --teacher-stats-batches 1 \
    --pca-every 0 --print-freq 10 --num-workers 15 --output-dir "/tmp/proteus_e2e/$2_$3"
}
for loader in classic cpu dali; do
  run "e2e_ti_s_$loader" e2e dinov2_vits14 vit_tiny "$loader"
  run "e2e_s_b_$loader" e2e dinov2_vitb14 vit_small "$loader"
done
run logreg "$PYTHON" -m fine_grained.benchmark --device cuda
