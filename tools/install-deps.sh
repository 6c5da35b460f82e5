#!/usr/bin/env bash
# The Debian packages mooncakefs needs: FUSE 3 (kernel helper + headers for building pyfuse3), fio
# (the filesystem tests verify with it), etcd (cluster mode; the tests start their own on loopback) and
# iproute2 (the tests simulate hosts with network namespaces).  Run as root; idempotent.
set -euo pipefail
packages=(fuse3 libfuse3-dev pkg-config fio etcd-server iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
