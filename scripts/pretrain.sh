#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Launch one of the paper's distillation recipes with torchrun:
#   scripts/pretrain.sh RECIPE [extra pretrain.main flags...]
#
#   RECIPE         ti_dinov2s | s_dinov2b | b_dinov2l | l_dinov2g | b_synclrl | b_clipl
#                  ti_dinov3s | s_dinov3b | b_dinov3l | l_dinov3hplus | s_dinov3_7b | b_dinov3_7b
#                  b_dinov2l_clipl | s_dinov3b_clipb16 (one student, two teachers)
#   DATA           ImageNet root holding train/<class>/<image>      default /data/imagenet
#   OUT            output dir (checkpoint.pth, log.txt, tensorboard/) default out/RECIPE
#   NPROC, NNODES, NODE_RANK, RDZV_ENDPOINT, RDZV_ID, DRY_RUN: see scripts/torchrun.sh
#   GLOBAL_BATCH   images per step over all processes               default 512 (the paper)
#   BATCH          per-process batch                        default GLOBAL_BATCH / (NPROC x NNODES)
#
# The per-process batch follows the GPU count so that the global batch stays 512 (4 x 128,
# 8 x 64, 16 x 32, ...): the lr scales with the global batch anyway, but 512 also keeps the
# paper's number of steps and its EMA horizon (the EMA decays per step). Extra flags come last
# and win (argparse keeps the last value), e.g. `--epochs 100` or `--batch-size 64`.
# Re-running the same command resumes from OUT/checkpoint.pth.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

RECIPES="ti_dinov2s s_dinov2b b_dinov2l l_dinov2g b_synclrl b_clipl ti_dinov3s s_dinov3b b_dinov3l l_dinov3hplus s_dinov3_7b b_dinov3_7b b_dinov2l_clipl s_dinov3b_clipb16"
RECIPE=${1:?usage: scripts/pretrain.sh RECIPE [pretrain.main flags...]; RECIPE: $RECIPES}
shift
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-out/$RECIPE}
NPROC=${NPROC:-4}
NNODES=${NNODES:-1}
GLOBAL_BATCH=${GLOBAL_BATCH:-512}

# student <- teacher, as in the paper (README.md, PROTOCOLS.md A). CLIP runs token-only by
# pretrain.main's own defaults, so no recipe needs more than these two flags. The DINOv3 recipes
# (PROTOCOLS G) keep every other setting of PROTOCOLS A; the student takes the teacher's DINOv3
# layout (patch 16, so the token grids match at any size) and the 7B runs in bf16
# (--teacher-dtype auto). DINOv3 files are gated: pass --teacher-checkpoint PATH after the recipe.
# The two-teacher recipes (issue 15) standardise each teacher's targets with PHI-S (the default with
# several teachers) and write adaptors.pth next to backbone.pth. B/14 <- DINOv2 L + CLIP L: CLIP on the
# student's 16x16 grid, token-only. S/14 <- DINOv3 B + CLIP B/16 (resampled): a patch-14 student in the
# DINOv2 layout, both teachers' 14x14 maps resampled to its 16x16 grid, so CLIP's patch map is distilled too.
options=()
case "$RECIPE" in
    ti_dinov2s) teacher=dinov2_vits14 student=vit_tiny ;;
    s_dinov2b) teacher=dinov2_vitb14 student=vit_small ;;
    b_dinov2l) teacher=dinov2_vitl14 student=vit_base ;;
    l_dinov2g) teacher=dinov2_vitg14 student=vit_large ;;
    b_synclrl) teacher=synclr_vitl14 student=vit_base ;;
    b_clipl) teacher=clip_vitl14 student=vit_base ;;
    ti_dinov3s) teacher=dinov3_vits16 student=vit_tiny ;;
    s_dinov3b) teacher=dinov3_vitb16 student=vit_small ;;
    b_dinov3l) teacher=dinov3_vitl16 student=vit_base ;;
    l_dinov3hplus) teacher=dinov3_vith16plus student=vit_large ;;
    s_dinov3_7b) teacher=dinov3_vit7b16 student=vit_small ;;
    b_dinov3_7b) teacher=dinov3_vit7b16 student=vit_base ;;
    b_dinov2l_clipl) teacher=dinov2_vitl14,clip_vitl14 student=vit_base ;;
    s_dinov3b_clipb16) teacher=dinov3_vitb16,clip_vitb16 student=vit_small options=(--student-layout dinov2) ;;
    *)
        echo "error: unknown recipe '$RECIPE'; one of: $RECIPES" >&2
        exit 2
        ;;
esac

BATCH=${BATCH:-$(split_batch "$GLOBAL_BATCH" $((NPROC * NNODES)))}

export NPROC NNODES
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" -m pretrain.main \
    --data-path "$DATA" --teacher "$teacher" --student "$student" \
    --batch-size "$BATCH" --output-dir "$OUT" ${options[@]+"${options[@]}"} "$@"
