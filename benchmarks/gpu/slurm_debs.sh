#!/usr/bin/env bash
# Download Debian 12's Slurm 22.05 packages, and the shared libraries they link against that an
# Ubuntu 24.04 image may lack, so a machine without network or apt can run the local cluster
# from an unpacked copy (benchmarks/gpu/slurm_unpack.sh; it puts on LD_LIBRARY_PATH only the
# libraries that machine really lacks).
#
# Usage (on Debian 12 amd64 with network, as root or a user apt lets download):
#   benchmarks/gpu/slurm_debs.sh .gpu-stage/slurm-debs
#
# Which libraries, and why (objdump -p NEEDED of the binaries and of the plugins the local cluster
# loads; Ubuntu 24.04 always has libc6, libpam0g, liblz4-1, libtinfo6, libsystemd0):
#   libhwloc15 (+ libudev1, its dependency)  slurmd, slurmstepd
#   libnuma1                                 slurmd, task/affinity
#   libjson-c5                               serializer/json: `squeue --json`, `sinfo --json`
#   libreadline8                             scontrol (also sacctmgr, sreport)
# Not downloaded, because the local cluster never loads what needs them (checked with every
# one of them hidden: the cluster starts and runs jobs): libmunge2 (auth/munge; cluster.auth is
# none, munged could not run there anyway), libdbus-1-3 (cgroup/v2, which slurmd cannot start
# without systemd; the local cluster has slurmd load cgroup/v1 when cluster.cgroups is off),
# liblua5.1-0 (the *_lua plugins), libyaml-0-2 (serializer/yaml: `squeue --json` tries to load
# it and goes on without it), libpmix2 (mpi/pmix; MpiDefault=none), librrd (not in these
# packages). libslurm38 is not needed: the programs link libslurmfull.so from the plugins' package.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 DOWNLOAD_DIR" >&2
    exit 2
fi
dest=$1

SLURM_PACKAGES=(slurmctld slurmd slurm-client slurm-wlm-basic-plugins)
LIBRARY_PACKAGES=(libhwloc15 libudev1 libnuma1 libjson-c5 libreadline8)

arch=$(dpkg --print-architecture)
if [[ $arch != amd64 ]]; then
    echo "this machine is $arch; the GPU machine is amd64" >&2
    exit 1
fi
if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "warning: not Debian 12 (bookworm); the packages will not be 22.05.8" >&2
fi
# apt-get download needs package lists; fetch them once if this machine has none.
if [[ -z $(apt-cache policy slurmd 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -v none) ]]; then
    apt-get update -qq
fi

mkdir -p "$dest"
cd "$dest"
# A fresh set every time: debs of two versions side by side would be unpacked over each other.
rm -f ./*.deb
# apt-get download warns when the _apt sandbox user cannot write here; the download still works.
apt-get download -q "${SLURM_PACKAGES[@]}" "${LIBRARY_PACKAGES[@]}" 2> >(grep -v 'unsandboxed' >&2)
wait

count=$(ls ./*.deb | wc -l)
expected=$((${#SLURM_PACKAGES[@]} + ${#LIBRARY_PACKAGES[@]}))
if [[ $count -ne $expected ]]; then
    echo "expected $expected packages, got $count" >&2
    exit 1
fi
ls -1 ./*.deb | sed 's|^\./||'
echo "total: $(du -ch ./*.deb | tail -1 | cut -f1) in $(pwd)"
