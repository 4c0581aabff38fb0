"""Training started from EvolutionaryScale's weights: `esm3 convert from-esm` writes a
checkpoint that `checkpoint.init_from` loads (fresh optimizer, step 0, an `init` event),
and the first step's loss is the loss of those weights evaluated directly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from esm3.interop.esm import from_esm_state_dict
from esm3.train.data import BatchBuilder, load_datasets
from esm3.train.loss import ESM3Loss
from jobs.convert import from_esm, to_esm
from jobs.errors import UserError
from jobs.train.config import load_config
from tests.test_esm_parity import _esm_model
from tests.train.conftest import write_config
from tests.train.test_training import _run

pytestmark = [
    pytest.mark.usefixtures("process_group"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]


def test_converted_esm_weights_start_training_at_their_own_loss(tmp_path, train_data):
    esm_model = _esm_model(64, 2, 4, 2, seed=0)
    torch.save(esm_model.state_dict(), tmp_path / "esm.pt")
    facts = from_esm(tmp_path / "esm.pt", tmp_path / "init", n_heads=2)
    assert facts["model"] == {"d_model": 64, "n_layers": 2, "d_head": 32, "geom_heads": 4,
                              "ffn_multiple": 256}  # fmt: skip
    extra = f'[checkpoint]\ninit_from = "{tmp_path / "init"}"'
    cfg = load_config(
        write_config(tmp_path / "c.toml", train_data, extra),
        ["model.geom_heads=4", "model.ffn_multiple=256"],
    )
    # esm's residue-annotation head has 1478 ids: the run's vocabulary must have 1474 labels
    sites = tuple(f"site-{i}" for i in range(1474))
    cfg = replace(cfg, tasks=replace(cfg.tasks, residue_labels=sites))
    res, rows, events = _run(cfg, train_data, tmp_path / "ck")
    assert res.status == "completed" and rows[0]["step"] == 1
    (init,) = [e for e in events if e["kind"] == "init"]
    assert init["step"] == 0 and str(tmp_path / "init") in init["message"]

    direct = from_esm_state_dict(esm_model.state_dict(), n_heads=2)
    batch = BatchBuilder(cfg, load_datasets(cfg, train_data), rank=0, per_rank=4).build(0, 0)
    with torch.no_grad():
        loss = ESM3Loss(cfg.loss_weights)(direct(**batch.inputs), batch).loss
    assert rows[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert rows[1]["loss"] != pytest.approx(rows[0]["loss"], rel=1e-6)  # and it trains

    # and back: the trained checkpoint loads into esm's class, strict
    to_esm(tmp_path / "ck", tmp_path / "trained.pt")
    back = _esm_model(64, 2, 4, 2, seed=1)
    back.load_state_dict(torch.load(tmp_path / "trained.pt", weights_only=True), strict=True)


def test_convert_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="bad.pt"):
        from_esm(tmp_path / "bad.pt", tmp_path / "out")
    torch.save({"encoder.sequence_embed.weight": torch.zeros(64, 32)}, tmp_path / "part.pt")
    with pytest.raises(UserError, match="not an ESM3 state dict"):
        from_esm(tmp_path / "part.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not a checkpoint"):
        to_esm(tmp_path, tmp_path / "x.pt")
