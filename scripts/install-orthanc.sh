#!/usr/bin/env bash
# Installs Orthanc and its DICOMweb plugin (Debian packages, pinned) for the benchmarks that compare
# the gateway with Orthanc (`make bench-gateway`, `make bench-pipeline`). The benchmark starts its own
# Orthanc on loopback and stops it after; the package's system service is not used. Safe to run again.
set -euo pipefail

ORTHANC_VERSION="1.10.1+dfsg-2+deb12u1"
DICOMWEB_VERSION="1.7+dfsg-6+b2"

if command -v Orthanc >/dev/null 2>&1 && dpkg-query -W -f='${Version}' orthanc-dicomweb 2>/dev/null | grep -qx "$DICOMWEB_VERSION"; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[orthanc] Orthanc is not installed and this is not a Debian root shell: install orthanc=$ORTHANC_VERSION and orthanc-dicomweb=$DICOMWEB_VERSION" >&2
  exit 1
fi
echo "[orthanc] installing orthanc $ORTHANC_VERSION and orthanc-dicomweb $DICOMWEB_VERSION (Debian)" >&2
apt-get update -qq >/dev/null
# No init system here: the package's service is not started (policy-rc.d refuses), the benchmark runs its own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "orthanc=$ORTHANC_VERSION" "orthanc-dicomweb=$DICOMWEB_VERSION" >/dev/null
if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
