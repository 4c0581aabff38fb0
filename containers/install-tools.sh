#!/usr/bin/env bash
# Installs the system tools the suite calls: mmseqs2 and mkdssp (always), and with
# --slurm the local-cluster tools (slurm-wlm, munge), plus --browser for chromium and
# --strace for the tests that list the files a command opens.
# Shared by `make setup` and the image recipe so host and image agree on versions.
# On Debian as root it installs with apt; elsewhere it only checks and says what is missing.
set -euo pipefail

PKGS=(mmseqs2 mmseqs2-examples dssp)
TOOLS=(mmseqs mkdssp)
for arg in "$@"; do
  case "$arg" in
    --slurm) PKGS+=(slurm-wlm munge); TOOLS+=(slurmctld slurmd munged sbatch) ;;
    --browser) PKGS+=(chromium chromium-driver); TOOLS+=(chromium chromedriver) ;;
    --images) PKGS+=(podman runc debootstrap); TOOLS+=(podman debootstrap) ;;
    --strace) PKGS+=(strace); TOOLS+=(strace) ;;
    *) echo "install-tools.sh: unknown option '$arg' (use --slurm, --browser, --images, --strace)" >&2; exit 2 ;;
  esac
done

missing=()
for t in "${TOOLS[@]}"; do
  command -v "$t" >/dev/null 2>&1 || [ -x "/usr/sbin/$t" ] || missing+=("$t")
done
[ -f /usr/share/doc/mmseqs2/example-data/DB.fasta.gz ] || missing+=("mmseqs2-examples")
[ ${#missing[@]} -eq 0 ] && { echo "system tools present: ${TOOLS[*]}"; exit 0; }

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing with apt: ${PKGS[*]}"
  export DEBIAN_FRONTEND=noninteractive
  stamp=/var/lib/apt/periodic/update-success-stamp
  if [ ! -d /var/lib/apt/lists/partial ] || [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v lock | grep -v partial)" ] || [ ! -e "$stamp" ] ; then
    apt-get update -qq
  fi
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null || {
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null; }
  echo "installed: ${PKGS[*]}"
else
  echo "missing system tools: ${missing[*]}" >&2
  echo "  on Debian/Ubuntu: sudo apt-get install ${PKGS[*]}" >&2
  echo "  or run inside the suite's image (make image; see README 'Containers')" >&2
  exit 1
fi
