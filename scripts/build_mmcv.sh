#!/usr/bin/env bash
# Build mmcv 2.1.0 (full, with ops) from its source release against the torch installed in the
# current Python, cache the wheel, and install it. mmsegmentation 1.2.2 needs mmcv >= 2.0.0rc4,
# < 2.2.0 and imports mmcv.ops, and mmcv 2.1.0 ships no wheels for current torch.
#
# The one change to mmcv's sources: its setup.py asks for -std=c++14/-std=c++17, but torch >= 2.10
# headers need C++20, so we replace those flags with -std=c++20. Nothing else is patched.
#
#   PYTHON=.venv/bin/python scripts/build_mmcv.sh          # CPU ops (what `make test` uses)
#   FORCE_CUDA=1 PYTHON=python scripts/build_mmcv.sh       # GPU machines: CUDA ops as well
#
# Also honoured: MAX_JOBS (parallel compiles, default nproc), TORCH_CUDA_ARCH_LIST (e.g. "9.0";
# default: the visible GPUs' architectures, or every architecture of the CUDA version without a GPU).
#
# Cache: $PROTEUS_WHEEL_CACHE (default ~/.cache/proteus/wheels), keyed by mmcv, torch, python, CUDA and
# the architectures built for.
set -euo pipefail
PYTHON=$("${PYTHON:-python}" -c "import sys; print(sys.executable)")  # absolute: we cd later
MMCV_VERSION=2.1.0
FORCE_CUDA=${FORCE_CUDA:-0}
CACHE=${PROTEUS_WHEEL_CACHE:-$HOME/.cache/proteus/wheels}

# an installed mmcv counts only with the ops asked for: CPU-only ops do not satisfy FORCE_CUDA=1
if "$PYTHON" -c "
import sys, mmcv
from mmcv.ops import get_compiling_cuda_version
sys.exit(mmcv.__version__ != '$MMCV_VERSION' or ('$FORCE_CUDA' == '1' and get_compiling_cuda_version() == 'not available'))
" 2>/dev/null; then
  echo "mmcv $MMCV_VERSION with ops already installed"; exit 0
fi
key=$("$PYTHON" -c "import sys, torch; print(f'torch{torch.__version__.split(\"+\")[0]}-py{sys.version_info[0]}{sys.version_info[1]}')")
flavour=cpu  # CUDA: also the architectures compiled for, so a wheel cached for other GPUs is not reused
[ "$FORCE_CUDA" = 1 ] && flavour=$("$PYTHON" -c "import os, torch
gpus = {'%d.%d' % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
archs = os.environ.get('TORCH_CUDA_ARCH_LIST') or ';'.join(sorted(gpus)) or 'all'
print(f'cuda{torch.version.cuda}-arch-' + '_'.join(archs.replace(';', ' ').split()))")
dest="$CACHE/mmcv-$MMCV_VERSION-$key-$flavour"
if ! ls "$dest"/mmcv-*.whl >/dev/null 2>&1; then
  command -v g++ >/dev/null || { echo "error: building mmcv needs g++ (apt-get install g++)" >&2; exit 1; }
  "$PYTHON" -m pip install -q "setuptools<81" wheel ninja  # mmcv's setup.py imports pkg_resources
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$MMCV_VERSION"
  tar xzf "$work"/mmcv-$MMCV_VERSION.tar.gz -C "$work"
  src="$work/mmcv-$MMCV_VERSION"
  sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  grep -q 'std=c++20' "$src/setup.py" || { echo "error: could not set -std=c++20 in mmcv's setup.py" >&2; exit 1; }
  echo "building mmcv $MMCV_VERSION ($flavour ops) against $key; about 25 min on 2 cores" >&2
  start=$(date +%s)
  (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=$FORCE_CUDA MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" .) \
    || { echo "error: mmcv $MMCV_VERSION failed to build against $key (see the compiler output above)" >&2; exit 1; }
  mkdir -p "$dest"
  cp "$work"/dist/mmcv-*.whl "$dest/"
  echo "built in $(( $(date +%s) - start )) s; cached in $dest" >&2
fi
"$PYTHON" -m pip install -q "$dest"/mmcv-*.whl  # its deps (mmengine, opencv, ...)
# same version number either way: replace an installed CPU-only build with this one
"$PYTHON" -m pip install -q --force-reinstall --no-deps "$dest"/mmcv-*.whl
"$PYTHON" -c "import mmcv
from mmcv.ops import get_compiling_cuda_version
print('mmcv', mmcv.__version__, 'with ops OK; CUDA ops:', get_compiling_cuda_version())"
