#!/usr/bin/env bash
# The Debian packages mooncakefs needs: FUSE 3 (kernel helper + headers for building pyfuse3), fio
# (the filesystem tests verify with it), etcd (cluster mode; the tests start their own on loopback) and
# iproute2 (the tests simulate hosts with network namespaces), and libibverbs' headers and tools
# (libibverbs-dev, rdma-core: the rdma transport's Cython hot path builds against infiniband/verbs.h), and
# Debian's pyverbs (python3-pyverbs: the rdma set-up loads it by its path when its modules fit our python).
# Run as root; idempotent.
set -euo pipefail
packages=(fuse3 libfuse3-dev pkg-config fio etcd-server iproute2 libibverbs-dev rdma-core python3-pyverbs)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Wait (up to 10 minutes) for another apt-get or unattended-upgrades holding the apt/dpkg locks instead of
# failing at once, as a fresh cloud VM often does right after boot.  DPkg::Lock::Timeout covers the dpkg
# locks of `install`; apt up to at least 2.6 ignores it for the lists lock of `update`, so that is retried.
lock_timeout=600
lock_wait=(-o "DPkg::Lock::Timeout=$lock_timeout")
apt_update() {
    local deadline=$((SECONDS + lock_timeout)) err said=
    while true; do
        if err=$(apt-get "${lock_wait[@]}" update -qq 2>&1 >/dev/null); then
            return 0
        fi
        if [[ $err != *"Could not get lock"* ]] || ((SECONDS >= deadline)); then
            printf '%s\n' "$err" >&2
            return 1
        fi
        [[ $said ]] || echo "install-deps.sh: another apt holds its lock; waiting up to ${lock_timeout}s" >&2
        said=1
        sleep 3
    done
}
if ((${#missing[@]})); then
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get "${lock_wait[@]}" install -y -qq "${missing[@]}" >/dev/null
fi
