#!/usr/bin/env bash
# Packs the mmseqs2 and mkdssp that `install-tools.sh` installed from Debian bookworm into a
# self-contained tree, so that any x86_64 base with glibc >= 2.36 (Debian 12, the Ubuntu 24.04
# of the NVIDIA PyTorch images) runs the very same builds as the Debian hosts of `make setup`:
#   OUT/usr/local/lib/esm3-tools/{bin,lib}   the binaries and every shared library they load
#                                            except glibc's own (the base provides those)
#   OUT/usr/local/bin/{mmseqs,mkdssp}        wrappers that set LD_LIBRARY_PATH for that one process
#   OUT/usr/share/libcifpp/                  mmCIF dictionaries mkdssp reads at run time
#   OUT/usr/local/share/esm3/tools.env       the versions found, read back by smoke.sh
#   OUT/usr/local/share/esm3/smoke/          tiny real inputs for smoke.sh (UniProt sequences
#                                            from mmseqs2-examples, PDB 1CBS from libcifpp-dev)
# Versions are pinned by checking: the build fails unless mmseqs and mkdssp report exactly
# MMSEQS2_VERSION and DSSP_VERSION (Debian stable does not move them within a release).
# Usage (as root, in the image's tools stage): bundle-tools.sh OUT
set -euo pipefail

out=${1:?usage: bundle-tools.sh OUTDIR}
: "${MMSEQS2_VERSION:?set MMSEQS2_VERSION (e.g. 14-7e284)}"
: "${DSSP_VERSION:?set DSSP_VERSION (e.g. 4.2.2)}"
N_SMOKE_SEQS=${N_SMOKE_SEQS:-16}

die() { echo "bundle-tools.sh: $*" >&2; exit 1; }

# mmseqs prints the Debian version, e.g. 14-7e284+ds-1+b2: the upstream tag precedes '+'.
mmseqs_full=$(mmseqs version)
[ "${mmseqs_full%%+*}" = "$MMSEQS2_VERSION" ] ||
  die "mmseqs2 is ${mmseqs_full}, the image pins ${MMSEQS2_VERSION} (build arg MMSEQS2_VERSION)"
dssp_full=$(mkdssp --version | awk '/version/ {print $NF; exit}')
[ "$dssp_full" = "$DSSP_VERSION" ] ||
  die "mkdssp is ${dssp_full}, the image pins ${DSSP_VERSION} (build arg DSSP_VERSION)"

root=$out/usr/local/lib/esm3-tools
mkdir -p "$root/bin" "$root/lib" "$out/usr/local/bin" "$out/usr/local/share/esm3/smoke"

# Debian ships one mmseqs build per SIMD level (mmseqs-avx2, -avx, -sse4.1, -ssse3, -sse3).
binaries=(/usr/bin/mmseqs-* "$(command -v mkdssp)")
cp -L "${binaries[@]}" "$root/bin/"

# Shared libraries, minus glibc's (loader, libc, libm, ...) which must come from the base.
for b in "${binaries[@]}"; do
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
done | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|libutil.so*) ;;
    *) cp -L "$lib" "$root/lib/" ;;
  esac
done

cat > "$out/usr/local/bin/mmseqs" <<'EOF'
#!/bin/sh
# mmseqs2 from Debian bookworm (bundled by containers/bundle-tools.sh): pick the build for
# the fastest SIMD level this CPU has. /proc/cpuinfo spells SSE4.1 sse4_1 and SSE3 pni.
d=/usr/local/lib/esm3-tools
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
for pair in avx2:avx2 avx:avx sse4_1:sse4.1 ssse3:ssse3 pni:sse3; do
  case " $flags " in *" ${pair%%:*} "*) simd=${pair#*:}; break ;; esac
done
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/bin/mmseqs-${simd:-sse3}" "$@"
EOF
cat > "$out/usr/local/bin/mkdssp" <<'EOF'
#!/bin/sh
# mkdssp from Debian bookworm (bundled by containers/bundle-tools.sh).
d=/usr/local/lib/esm3-tools
LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/bin/mkdssp" "$@"
EOF
chmod 0755 "$out/usr/local/bin/mmseqs" "$out/usr/local/bin/mkdssp"

mkdir -p "$out/usr/share/libcifpp"
cp -r /usr/share/libcifpp/. "$out/usr/share/libcifpp/"

cat > "$out/usr/local/share/esm3/tools.env" <<EOF
MMSEQS2_VERSION=${MMSEQS2_VERSION}
MMSEQS2_DEBIAN_VERSION=$(dpkg-query -W -f '${Version}' mmseqs2)
DSSP_VERSION=${DSSP_VERSION}
DSSP_DEBIAN_VERSION=$(dpkg-query -W -f '${Version}' dssp)
EOF

# Smoke inputs: the first real UniProt records of mmseqs2-examples, and PDB entry 1CBS that
# Debian ships as libcifpp's example (fetched as a .deb, never installed).
smoke=$out/usr/local/share/esm3/smoke
zcat /usr/share/doc/mmseqs2/example-data/DB.fasta.gz |
  awk -v n="$N_SMOKE_SEQS" '/^>/ {k++} k <= n' > "$smoke/sequences.fasta"
[ "$(grep -c '^>' "$smoke/sequences.fasta")" = "$N_SMOKE_SEQS" ] ||
  die "could not take $N_SMOKE_SEQS sequences from mmseqs2-examples"
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download -qq libcifpp-dev >/dev/null 2>&1 &&
  dpkg-deb -x libcifpp-dev_*.deb x) || die "apt-get download libcifpp-dev failed (1CBS example)"
cp "$tmp/x/usr/share/doc/libcifpp-dev/examples/1cbs.cif.gz" "$smoke/1cbs.cif.gz"
rm -rf "$tmp"

# The bundled binaries start with the bundled libraries (the wrappers name their final place).
LD_LIBRARY_PATH="$root/lib" "$root/bin/mkdssp" --version >/dev/null
for b in "$root"/bin/mmseqs-*; do
  # a build for a SIMD level this CPU lacks dies of SIGILL (132): only a missing library fails
  LD_LIBRARY_PATH="$root/lib" "$b" version >/dev/null 2>&1 || [ $? -eq 132 ] ||
    die "$(basename "$b") does not start with the bundled libraries"
done
echo "bundled mmseqs2 ${mmseqs_full} and mkdssp ${dssp_full} into ${out}"
