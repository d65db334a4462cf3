#!/usr/bin/env bash
# Build `.gpu` for benchmarks/gpu_bench.py on a device machine: the transformers wheel the project runs
# on, the cached 0.5B's tokenizer files, this checkout's src/ and the benchmark script. The device tool
# sends only the checkout its session was started in, so build `.gpu` there:
#     bash benchmarks/gpu_prepare.sh [REPO]    # REPO: that checkout's root (default: this one)
# `.gpu` is git-ignored (`/.gpu/` goes into the repository's info/exclude too) and travels by `carry`.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "${1:-$here}" && pwd)"
dest="$repo/.gpu"
tok="${S2T_TOKENIZER:-${S2T_CACHE:-$HOME/.cache/select2think}/models/qwen2.5-coder-0.5b-instruct/bf16}"
py="${PYTHON:-python3}"

for f in tokenizer.json tokenizer_config.json; do
    [ -f "$tok/$f" ] || { echo "no $tok/$f: fetch the 0.5B first (s2t models fetch), or set S2T_TOKENIZER" >&2; exit 2; }
done
rm -rf "$dest"
mkdir -p "$dest/tokenizer"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$dest" transformers==5.24.0
cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$dest/tokenizer/"
[ -f "$tok/chat_template.jinja" ] && cp "$tok/chat_template.jinja" "$dest/tokenizer/"
cp -r "$here/src" "$dest/src"
find "$dest/src" -name __pycache__ -prune -exec rm -rf {} +
cp "$here/benchmarks/gpu_bench.py" "$dest/"
git -C "$here" rev-parse HEAD > "$dest/COMMIT" 2>/dev/null || echo unknown > "$dest/COMMIT"
exclude="$(git -C "$repo" rev-parse --git-common-dir)/info/exclude"
case "$exclude" in /*) ;; *) exclude="$repo/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
du -sh "$dest"
echo "carry .gpu and run (timeout_s 570):"
sed -n '/^    python3 -m pip install/p' "$here/benchmarks/gpu_bench.py" | sed 's/^    //'
