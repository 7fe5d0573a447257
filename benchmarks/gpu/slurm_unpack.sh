#!/usr/bin/env bash
# Unpack the Slurm packages that benchmarks/gpu/slurm_debs.sh downloaded into PREFIX (never into
# /), so the local cluster runs on a machine without network or apt; writes PREFIX/env.sh.
#
# Usage (no network needed; root is not needed to unpack):
#   benchmarks/gpu/slurm_unpack.sh DEB_DIR PREFIX      e.g. ... /tmp/stage/slurm-debs /tmp/slurm
#   . PREFIX/env.sh
# then run the local cluster with cluster.plugin_dir set to $SLURM_PLUGIN_DIR (env.sh prints it).
#
# What running from a prefix needs, for Debian's Slurm 22.05:
# - The programs find libslurmfull.so through their RUNPATH /usr/lib/x86_64-linux-gnu/slurm-wlm,
#   and the plugins in PluginDir, compiled in as the same directory. LD_LIBRARY_PATH comes before
#   RUNPATH, so env.sh puts the prefix's copy of that directory first; slurm.conf needs
#   PluginDir=<it> (the appliance writes it from cluster.plugin_dir).
# - Of the other libraries, only those this host lacks (or has in too old a version) are used
#   from the prefix: they are linked into PREFIX/lib-extra, which goes on LD_LIBRARY_PATH; the
#   host's own libraries stay in use for everything else.
# - slurmd runs slurmstepd from a compiled-in path, /usr/sbin/slurmstepd, unless started with
#   `-d <path>`; the appliance passes -d with the slurmstepd next to the slurmd it starts, so
#   nothing is needed in /usr/sbin. (Starting slurmd by hand: `slurmd -d $SLURM_PREFIX/usr/sbin/
#   slurmstepd ...`.)
# - Debian installs slurmd, slurmctld and slurmstepd as *-wlm with update-alternatives links,
#   which `dpkg -x` does not make: this script makes them in PREFIX/usr/sbin.
# - The daemons take -f <slurm.conf>; the client programs read SLURM_CONF (the appliance sets it);
#   without either they read /etc/slurm/slurm.conf.
# - slurmd passes its environment to slurmstepd, and jobs get the submitter's environment
#   (sbatch's default --export=ALL), so LD_LIBRARY_PATH reaches both from env.sh.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 DEB_DIR PREFIX" >&2
    exit 2
fi
debs=$(cd "$1" && pwd)
mkdir -p "$2"
prefix=$(cd "$2" && pwd)
if [[ $prefix == / ]]; then
    echo "refusing to unpack into /" >&2
    exit 1
fi
shopt -s nullglob
packages=("$debs"/*.deb)
if [[ ${#packages[@]} -eq 0 ]]; then
    echo "no .deb files in $debs" >&2
    exit 1
fi

extract() { # extract DEB DIR: the package's files, as `dpkg -x` does
    local deb=$1 dir=$2
    if command -v dpkg-deb >/dev/null; then
        dpkg-deb -x "$deb" "$dir"
    elif command -v python3 >/dev/null; then
        python3 - "$deb" "$dir" <<'EOF'
import io, sys, tarfile
deb, dest = sys.argv[1], sys.argv[2]
data = open(deb, "rb").read()
if data[:8] != b"!<arch>\n":
    sys.exit(f"{deb} is not a Debian package")
pos = 8
while pos + 60 <= len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    body = data[pos + 60:pos + 60 + size]
    pos += 60 + size + (size & 1)
    if name.startswith("data.tar"):
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:  # .xz, .gz, .bz2
            tar.extractall(dest, filter="tar")
        break
else:
    sys.exit(f"no data.tar in {deb}")
EOF
    else
        local tmp
        tmp=$(mktemp -d)
        (cd "$tmp" && ar x "$deb")
        tar -xf "$tmp"/data.tar.* -C "$dir"
        rm -rf "$tmp"
    fi
}

for deb in "${packages[@]}"; do
    extract "$deb" "$prefix"
done

multiarch=usr/lib/x86_64-linux-gnu
plugins=$prefix/$multiarch/slurm-wlm
extra=$prefix/lib-extra
for name in slurmctld slurmd slurmstepd; do
    if [[ -x $prefix/usr/sbin/$name-wlm ]]; then
        ln -sfn "$name-wlm" "$prefix/usr/sbin/$name"
    fi
done
if [[ ! -f $plugins/libslurmfull.so ]]; then
    echo "no $plugins/libslurmfull.so: is slurm-wlm-basic-plugins among the packages?" >&2
    exit 1
fi

# Which libraries this host lacks: ask the loader about every program and plugin, with only the
# Slurm directory and the libraries taken so far, and take the missing ones that the packages
# have; again, until nothing more can be taken (a taken library may need another one).
list_deps() {
    if command -v ldd >/dev/null; then
        ldd "$1" 2>&1 || true
    else
        /lib64/ld-linux-x86-64.so.2 --list "$1" 2>&1 || true
    fi
}
objects=("$prefix"/usr/sbin/*-wlm "$prefix"/usr/bin/* "$plugins"/*.so*)
rm -rf "$extra"
mkdir -p "$extra"
unresolved() { # "<soname> <object>" for each library the loader cannot find (or is too old)
    local obj
    for obj in "${objects[@]}"; do
        LD_LIBRARY_PATH=$plugins:$extra list_deps "$obj" | sed -nE \
            -e "s|^[[:space:]]*([^[:space:]]+) => not found.*|\1 $obj|p" \
            -e "s|^.*[[:space:]]([^[:space:]]+): version .* not found.*|\1 $obj|p"
    done | sed -E 's|^[^ ]*/||' | sort -u
}
while true; do
    taken=0
    while read -r soname _; do
        [[ -e $extra/$soname ]] && continue
        for dir in "$prefix/$multiarch" "$prefix/lib/x86_64-linux-gnu"; do
            if [[ -e $dir/$soname ]]; then
                ln -s "$dir/$soname" "$extra/$soname"
                taken=1
                break
            fi
        done
    done < <(unresolved)
    [[ $taken -eq 1 ]] || break
done

# What still cannot load: fatal for the programs; for plugins, fine unless the cluster uses them.
missing=$(unresolved)
programs_missing=$(grep -E ' .*/usr/s?bin/' <<<"$missing" || true)
plugins_missing=$(grep -vE ' .*/usr/s?bin/' <<<"$missing" || true)

lib_path=$plugins
taken=$(ls "$extra")
if [[ -n $taken ]]; then
    lib_path=$plugins:$extra
fi
cat >"$prefix/env.sh" <<EOF
# Generated by benchmarks/gpu/slurm_unpack.sh: source it before running Slurm from this prefix.
export SLURM_PREFIX=$prefix
# What cluster.plugin_dir (slurm.conf PluginDir) must be.
export SLURM_PLUGIN_DIR=$plugins
export PATH=$prefix/usr/sbin:$prefix/usr/bin\${PATH:+:\$PATH}
export LD_LIBRARY_PATH=$lib_path\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF

echo "unpacked ${#packages[@]} packages into $prefix"
echo "libraries this host lacks, used from the prefix: ${taken:-none}" | tr '\n' ' '
echo
if [[ -n $plugins_missing ]]; then
    echo "plugins that cannot load here (the local cluster does not use them):"
    awk '{print "  " $2 " needs " $1}' <<<"$plugins_missing" | sed "s|$plugins/||"
fi
echo "environment ($prefix/env.sh):"
sed 's/^/  /' "$prefix/env.sh"
echo "slurm.conf: PluginDir=$plugins (appliance: cluster.plugin_dir: $plugins)"
echo "slurmd by hand: slurmd -d $prefix/usr/sbin/slurmstepd -f <slurm.conf> ..."
if [[ -n $programs_missing ]]; then
    echo "error: Slurm's programs cannot load here:" >&2
    awk '{print "  " $2 " needs " $1}' <<<"$programs_missing" >&2
    exit 1
fi
