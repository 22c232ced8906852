#!/usr/bin/env bash
# Installs the Python toolchain the project needs: a pinned uv in $ENCLAVE_CACHE, the locked
# workspace environment (.venv), and the Debian tools the tests use (dcmtk). Safe to run again.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"; root="$(cd "$here/.." && pwd)"
UV_VERSION=0.13.9
cache="${ENCLAVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enclave}"
uv_home="$cache/uv-$UV_VERSION"
if [ ! -x "$uv_home/bin/uv" ]; then
  echo "[bootstrap] installing uv $UV_VERSION into $uv_home" >&2
  python3 -m venv "$uv_home"
  "$uv_home/bin/pip" install -q "uv==$UV_VERSION"
fi
export PATH="$uv_home/bin:$PATH"
echo "[bootstrap] syncing the locked Python environment" >&2
(cd "$root" && uv sync --frozen --all-packages --quiet)
if ! command -v dcmdump >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[bootstrap] installing dcmtk (Debian) for the DICOM client tests" >&2
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk >/dev/null
fi
