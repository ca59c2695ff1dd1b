#!/usr/bin/env bash
# Debian packages that the browser test (chromium, chromium-driver) and the Slurm test (slurmctld,
# slurmd, slurm-client, munge) need. Installed only when running as root with apt-get; otherwise
# those tests skip and say why. Called by `make test`.
set -u
PACKAGES="chromium chromium-driver slurmctld slurmd slurm-client munge"
missing=""
for p in $PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "note: not root or no apt-get; not installing:$missing (the browser/Slurm tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing Debian packages:$missing"
apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; } ||
    echo "warning: apt-get could not install$missing (the browser/Slurm tests will skip)" >&2
exit 0
