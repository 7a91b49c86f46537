#!/usr/bin/env bash
# Checks that the CUDA build of memtune compiles, on any x86-64 Linux machine, GPU or not.
#
# candle's `cuda` feature needs nvcc at build time. The CUDA 13.0 toolkit wheels on PyPI ship nvcc,
# the headers and the libraries (CUDA 12's wheels carry no nvcc), so this script installs them into
# a local venv and points the build at it; no system CUDA is needed. See
# ../shared/CANDLE_NOTES.md, "GPU crates without a GPU".
#
#   scripts/check-cuda.sh                  cargo check --no-default-features --features cuda
#   scripts/check-cuda.sh --release-build  also builds target/cuda/release/memtune (links the
#                                          CUDA libraries and a driver stub; implies --link)
#   scripts/check-cuda.sh --link           installs the link libraries and the stub only
#   scripts/check-cuda.sh --env            prints the environment lines to `eval`, then exits
#
# Environment:
#   CUDA_VENV         the venv (default: <repo>/.cuda-venv, git-ignored)
#   CUDA_TARGET_DIR   cargo's target dir for the CUDA build (default: <repo>/target/cuda), kept
#                     apart so the CUDA feature set never rebuilds the normal build's dependencies
#   CUDA_COMPUTE_CAP  the GPU generation to compile kernels for (default 90: H100/H200); required
#                     by candle's build when no GPU is present
#   CARGO_FLAGS       extra flags for cargo (e.g. "--jobs 1")
#
# Time on 2 cores: ~8 min for a fresh check, ~9.5 min for a fresh release build (nvcc compiling
# candle's kernels dominates); warm rebuilds ~1.5 min. Run it before every change to GPU code
# (anything under `#[cfg(feature = "cuda")]`, src/probe/meter.rs's CUDA meter, src/device.rs).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CUDA_VENV:-$repo/.cuda-venv}"
target_dir="${CUDA_TARGET_DIR:-$repo/target/cuda}"
compute_cap="${CUDA_COMPUTE_CAP:-90}"
toolkit_version="13.0.3.0"

link=0
release=0
env_only=0
for arg in "$@"; do
    case "$arg" in
        --link) link=1 ;;
        --release-build) link=1; release=1 ;;
        --env) env_only=1 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "check-cuda.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

if [[ "$(uname -m)" != "x86_64" ]]; then
    echo "check-cuda.sh: the CUDA wheels used here are x86-64 only (this is $(uname -m))" >&2
    exit 2
fi

# 1. The toolkit, in a venv of its own. nvcc + cccl (~300 MB) are enough to check; linking needs
#    the runtime libraries too (~1.2 GB).
extras="nvcc,cccl"
if (( link )); then extras="nvcc,cccl,cudart,cublas,curand,nvrtc"; fi
stamp="$venv/.memtune-cuda-toolkit-$toolkit_version-$extras"
if [[ ! -f "$stamp" ]]; then
    echo "== installing cuda-toolkit[$extras]==$toolkit_version into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "cuda-toolkit[$extras]==$toolkit_version"
    touch "$stamp"
fi

cuda_root="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
if [[ ! -x "$cuda_root/bin/nvcc" ]]; then
    echo "check-cuda.sh: no nvcc under $cuda_root/bin (the wheel layout changed?)" >&2
    exit 1
fi

# 2. Linking: the wheels ship versioned sonames only (libcublas.so.13), the linker wants the
#    unversioned names; and no wheel ships the driver, so link against a stub libcuda.so whose
#    every entry point returns CUDA_ERROR_NO_DEVICE (100). The stub is for the linker only: the
#    binary loads the real libcuda.so.1 at start-up on a GPU machine. Never put $cuda_root/lib/stubs
#    on the library path of a machine with a driver.
if (( link )); then
    for versioned in "$cuda_root"/lib/lib*.so.*; do
        [[ -e "$versioned" ]] || continue
        base="$(basename "$versioned")"
        unversioned="$cuda_root/lib/${base%%.so.*}.so"
        [[ -e "$unversioned" ]] || ln -s "$base" "$unversioned"
    done
    stub="$cuda_root/lib/stubs/libcuda.so"
    if [[ ! -f "$stub" ]]; then
        echo "== building the libcuda.so link stub" >&2
        mkdir -p "$cuda_root/lib/stubs"
        # Every cu* function cuda.h declares, under the names the linker sees: the header maps
        # many to versioned names (cuCtxCreate -> cuCtxCreate_v4), which is what cudarc's
        # bindgen-made bindings link, so take them after the preprocessor; the plain spellings
        # too, for older entry points. Each returns CUDA_ERROR_NO_DEVICE.
        symbols="$( {
            echo '#include <cuda.h>' | cc -E -P -I"$cuda_root/include" - \
                | grep -oE '^\s*(extern\s+)?CUresult\s+cu[A-Za-z0-9_]+' | awk '{print $NF}'
            grep -ohE '\bCUresult\s+CUDAAPI\s+cu[A-Za-z0-9_]+' "$cuda_root"/include/cuda.h \
                | awk '{print $3}'
        } | sort -u )"
        if [[ -z "$symbols" ]]; then
            echo "check-cuda.sh: found no cu* functions in $cuda_root/include/cuda.h" >&2
            exit 1
        fi
        {
            echo '/* memtune link stub: not a driver. Every call fails with CUDA_ERROR_NO_DEVICE. */'
            for symbol in $symbols; do echo "int $symbol(void) { return 100; }"; done
        } > "$cuda_root/lib/stubs/libcuda_stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$cuda_root/lib/stubs/libcuda_stub.c"
        ln -sf libcuda.so "$cuda_root/lib/stubs/libcuda.so.1"
    fi
fi

export CUDA_HOME="$cuda_root" CUDA_PATH="$cuda_root" CUDA_ROOT="$cuda_root"
export PATH="$cuda_root/bin:$PATH"
export CUDA_COMPUTE_CAP="$compute_cap"
export CARGO_TARGET_DIR="$target_dir"
if (( link )); then
    export LIBRARY_PATH="$cuda_root/lib:$cuda_root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi

if (( env_only )); then
    echo "export CUDA_HOME='$cuda_root' CUDA_PATH='$cuda_root' CUDA_ROOT='$cuda_root'"
    echo "export PATH='$cuda_root/bin':\"\$PATH\" CUDA_COMPUTE_CAP='$compute_cap' CARGO_TARGET_DIR='$target_dir'"
    if (( link )); then echo "export LIBRARY_PATH='$LIBRARY_PATH'"; fi
    exit 0
fi

cd "$repo"
echo "== nvcc: $(nvcc --version | tail -n 1); CUDA_COMPUTE_CAP=$compute_cap; target dir $target_dir" >&2

# 3. The check: every `#[cfg(feature = "cuda")]` line, lib, binary, tests and examples.
# shellcheck disable=SC2086
cargo check --no-default-features --features cuda --all-targets ${CARGO_FLAGS:-}
echo "== cargo check --features cuda: ok" >&2

# 4. The binary for GPU machines (sm_$compute_cap kernels). It needs libcuda.so.1 to start, so it
#    runs only where a driver is installed.
if (( release )); then
    # shellcheck disable=SC2086
    cargo build --release --no-default-features --features cuda --bin memtune ${CARGO_FLAGS:-}
    binary="$target_dir/release/memtune"
    echo "== built $binary ($(du -h "$binary" | cut -f1)); needs on the GPU machine:" >&2
    ldd "$binary" 2>/dev/null | grep -E 'cuda|cublas|curand|nvrtc' >&2 || true
fi
