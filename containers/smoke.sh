#!/usr/bin/env bash
# Smoke test of an ESM3 suite image, run inside it (installed as /usr/local/bin/esm3-smoke):
#   1. versions: mmseqs2 and mkdssp are the pinned builds, torch imports; with a GPU also
#      CUDA, NCCL, TransformerEngine and xformers, each running one tiny op on the device
#   2. preprocess: a few real UniProt sequences clustered by mmseqs easy-linclust with the
#      paper's flags; one real structure (PDB 1CBS) annotated with mkdssp
#   3. train: a few optimizer steps of a tiny masked-LM transformer on those sequences
# Every check asserts a result (cluster membership, residue count, falling loss), not just an
# exit code. Prints "smoke: <step> ok" per step and "smoke: all checks passed" at the end.
#
# Usage: esm3-smoke [--versions]     --versions: step 1 only (the image's HEALTHCHECK)
# Env:   ESM3_SMOKE_DATA  inputs (default /usr/local/share/esm3/smoke, shipped in the image)
#        ESM3_TOOLS_ENV   pinned tool versions (default /usr/local/share/esm3/tools.env)
#        TMPDIR           scratch space (removed at exit); the image itself stays read-only
set -euo pipefail

SMOKE_DATA=${ESM3_SMOKE_DATA:-/usr/local/share/esm3/smoke}
TOOLS_ENV=${ESM3_TOOLS_ENV:-/usr/local/share/esm3/tools.env}
PY=${PYTHON:-python3}
# The paper's linclust flags (appendix A.2.1); 0.9 is one of its clustering levels.
LINCLUST_FLAGS=(--kmer-per-seq 100 --cluster-mode 2 --cov-mode 1 -c 0.8 --min-seq-id 0.9)
DSSP_1CBS_RESIDUES=137 # chain A of PDB 1CBS, cellular retinoic acid-binding protein II

fail() { echo "smoke: FAILED: $*" >&2; exit 1; }
ok() { echo "smoke: $1 ok ($(($(date +%s) - $2))s)"; }
work=$(mktemp -d "${TMPDIR:-/tmp}/esm3-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT

check_versions() {
  local t0; t0=$(date +%s)
  [ -r "$TOOLS_ENV" ] || fail "$TOOLS_ENV missing: not an image built by containers/Dockerfile"
  # shellcheck disable=SC1090
  . "$TOOLS_ENV"
  local mm dssp
  mm=$(mmseqs version) || fail "mmseqs does not run"
  [ "${mm%%+*}" = "$MMSEQS2_VERSION" ] || fail "mmseqs2 is $mm, pinned $MMSEQS2_VERSION"
  dssp=$(mkdssp --version | awk '/version/ {print $NF; exit}') || fail "mkdssp does not run"
  [ "$dssp" = "$DSSP_VERSION" ] || fail "mkdssp is $dssp, pinned $DSSP_VERSION"
  echo "smoke: mmseqs2 $mm, mkdssp $dssp"
  "$PY" - <<'EOF' || fail "python stack (see above)"
import importlib.metadata as md

import torch

print(f"smoke: python torch {torch.__version__}, esm3-suite {md.version('esm3-suite')}")
import esm3  # noqa: F401  the project itself
import jobs.cli  # noqa: F401

if torch.cuda.is_available():
    dev = torch.device("cuda")
    print(f"smoke: CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version()}, "
          f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    import transformer_engine.pytorch as te
    import xformers
    import xformers.ops as xops

    lin = te.Linear(64, 64, params_dtype=torch.bfloat16).to(dev)
    x = torch.randn(8, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lin(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), "TransformerEngine backward"
    q = torch.randn(1, 16, 2, 32, device=dev, dtype=torch.float16)
    out = xops.memory_efficient_attention(q, q, q)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(out, ref, atol=2e-3), "xformers attention differs from SDPA"
    print(f"smoke: TransformerEngine {md.version('transformer_engine')}, "
          f"xformers {xformers.__version__}: tiny ops ran on the GPU")
else:
    print("smoke: no GPU: CUDA, TransformerEngine and xformers checks skipped")
EOF
  ok versions "$t0"
}

preprocess_sequences() {
  local t0; t0=$(date +%s)
  # the bundled mmseqs with the paper's linclust flags, on real sequences; the suite's whole
  # sequence pipeline over these tools is covered by `make test` and `make demo`
  local fasta=$work/sequences.fasta n
  # Plain ids (s1, s2, ...): mmseqs shortens UniProt headers (sp|ACC|NAME) to ACC.
  awk '/^>/ {print ">s" ++k " " substr($0, 2); next} {print}' \
    "$SMOKE_DATA/sequences.fasta" >"$fasta"
  n=$(grep -c '^>' "$fasta")
  [ "$n" -ge 5 ] || fail "$SMOKE_DATA/sequences.fasta holds $n sequences, need >= 5"
  # Near-copies (one substitution) of records 2 and 5 must join their originals' clusters.
  awk '/^>/ {k++; keep = (k == 2 || k == 5)} keep && !/^>/ {seq[k] = seq[k] $0}
       END {for (k in seq) {s = seq[k]; m = int(length(s) / 2);
              c = (substr(s, m, 1) == "A") ? "G" : "A";
              print ">s" k "_mut"; print substr(s, 1, m - 1) c substr(s, m + 1)}}' \
    "$fasta" >"$work/mutants.fasta"
  cat "$work/mutants.fasta" >>"$fasta"
  mmseqs easy-linclust "$fasta" "$work/clu" "$work/mmseqs-tmp" "${LINCLUST_FLAGS[@]}" \
    --threads 1 -v 1 >"$work/mmseqs.log" 2>&1 || { cat "$work/mmseqs.log" >&2; fail "linclust"; }
  local tsv=$work/clu_cluster.tsv
  [ "$(cut -f2 "$tsv" | sort -u | wc -l)" -eq $((n + 2)) ] ||
    fail "linclust: $((n + 2)) sequences in, $(cut -f2 "$tsv" | sort -u | wc -l) members out"
  [ "$(wc -l <"$tsv")" -eq $((n + 2)) ] || fail "linclust: a sequence is in two clusters"
  local mut rep_mut rep_orig
  for mut in $(grep '^>.*_mut$' "$fasta" | cut -c2-); do
    rep_mut=$(awk -v m="$mut" '$2 == m {print $1}' "$tsv")
    rep_orig=$(awk -v m="${mut%_mut}" '$2 == m {print $1}' "$tsv")
    [ -n "$rep_orig" ] && [ "$rep_mut" = "$rep_orig" ] ||
      fail "linclust: $mut (99% identical) not clustered with ${mut%_mut}"
  done
  echo "smoke: linclust: $((n + 2)) sequences -> $(cut -f1 "$tsv" | sort -u | wc -l) clusters"
  ok "preprocess sequences" "$t0"
}

annotate_structure() {
  local t0; t0=$(date +%s)
  # the bundled mkdssp on a real structure, guarded against its silent zero-residue output
  mkdssp --output-format dssp "$SMOKE_DATA/1cbs.cif.gz" "$work/1cbs.dssp" 2>"$work/dssp.log" ||
    { cat "$work/dssp.log" >&2; fail "mkdssp on 1cbs.cif.gz"; }
  # Residue lines follow the "  #  RESIDUE" header; column 14 '!' marks chain breaks;
  # column 17 holds the DSSP code (H G I E B T S P or blank).
  local counts
  counts=$(awk 'body && substr($0, 14, 1) != "!" {n++; ss = substr($0, 17, 1);
                  if (ss == "H") h++; if (ss == "E") e++}
                /^  #  RESIDUE/ {body = 1}
                END {printf "%d %d %d", n, h, e}' "$work/1cbs.dssp")
  read -r nres helix strand <<<"$counts"
  [ "$nres" -eq "$DSSP_1CBS_RESIDUES" ] ||
    fail "mkdssp: 1CBS has $DSSP_1CBS_RESIDUES residues, got $nres (silent mmCIF failure?)"
  [ "$helix" -gt 0 ] && [ "$strand" -gt "$helix" ] ||
    fail "mkdssp: 1CBS is a beta barrel with two helices, got H=$helix E=$strand"
  echo "smoke: mkdssp: 1CBS $nres residues, H=$helix E=$strand"
  ok "annotate structure" "$t0"
}

train_steps() {
  local t0; t0=$(date +%s)
  # the suite's own tiny ESM3 model and corruption recipe (Table S6), AdamW as in training
  "$PY" - "$SMOKE_DATA/sequences.fasta" <<'EOF' || fail "training steps (see above)"
import sys

import numpy as np
import torch

from esm3.model.config import preset
from esm3.model.esm3 import ESM3
from esm3.model.loss import track_losses
from esm3.tasks.batching import collate
from esm3.tasks.config import TaskConfig
from esm3.tasks.corrupt import corrupt
from esm3.tasks.sample import Protein

STEPS = 30
torch.manual_seed(0)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
seqs, cur = [], []
for line in open(sys.argv[1]):
    if line.startswith(">"):
        if cur:
            seqs.append("".join(cur))
        cur = []
    else:
        cur.append(line.strip())
seqs.append("".join(cur))
rows = [{"id": f"s{i}", "dataset": "smoke", "sequence": s[:62], "length": len(s[:62])}
        for i, s in enumerate(seqs)]
proteins = [Protein.from_record(r) for r in rows]
task = TaskConfig(max_length=64)


def batch(seed):
    rng = np.random.default_rng(seed)
    parts = collate([corrupt(p, rng, task) for p in proteins]).to_torch()
    return [{k: v.to(dev) for k, v in d.items()} for d in parts]


model = ESM3(preset("tiny")).to(dev)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
held_out = batch(10_000)


def eval_loss():
    with torch.no_grad():
        return track_losses(model(**held_out[0]).logits, held_out[1], held_out[2])[0].item()


before = eval_loss()
for step in range(STEPS):
    inputs, targets, masks = batch(step)
    loss = track_losses(model(**inputs).logits, targets, masks)[0]
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
after = eval_loss()
print(f"smoke: train: {STEPS} AdamW steps of the tiny ESM3 on {dev}, "
      f"held-out loss {before:.3f} -> {after:.3f}")
assert np.isfinite(after), "loss is not finite"
assert after < before, "loss did not fall"
EOF
  ok "train steps" "$t0"
}

check_versions
if [ "${1:-}" = "--versions" ]; then exit 0; fi
[ $# -eq 0 ] || fail "unknown argument '$1' (usage: esm3-smoke [--versions])"
preprocess_sequences
annotate_structure
train_steps
echo "smoke: all checks passed"
