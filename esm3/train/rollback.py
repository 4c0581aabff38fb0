"""PaLM-style rollback: back to a checkpoint from before a burst of spikes, skipping the
batches that caused it.

Batches are a pure function of the data index (step + data offset), so skipping them is
only a larger data offset after the restore: the restored step trains next on the first
data index after the last offending batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RollbackPlan:
    """A rollback decided after step `from_step` (training reached it) with data offset
    `data_offset`; the burst's first spike was at step `first_spike`."""

    from_step: int
    data_offset: int
    first_spike: int

    @property
    def max_step(self) -> int:
        """The newest checkpoint step that may be restored: before the first spike."""
        return self.first_spike - 1

    @property
    def last_bad_data(self) -> int:
        """The data index of the step just trained: the last offending batch."""
        return self.from_step - 1 + self.data_offset

    def resume_offset(self, to_step: int) -> int:
        """The data offset after restoring `to_step`: its next batch follows the bad ones."""
        return self.last_bad_data + 1 - to_step

    def skipped(self, to_step: int, restored_offset: int) -> int:
        """Batches never trained after the rollback (those from the checkpoint on)."""
        return self.last_bad_data + 1 - (to_step + restored_offset)

    def message(self, to_name: str, to_step: int, restored_offset: int) -> str:
        return (
            f"rolled back from step {self.from_step} to {to_name}, skipping "
            f"{self.skipped(to_step, restored_offset)} batch(es) "
            f"(data {to_step + restored_offset}..{self.last_bad_data})"
        )


def plan_rollback(
    step: int, data_offset: int, spike_steps: list[int], checkpoint_steps: list[int]
) -> RollbackPlan | None:
    """The rollback for a burst (`spike_steps`, oldest first) seen by step `step`, or None
    when no checkpoint predates its first spike."""
    first = spike_steps[0]
    if not any(s < first for s in checkpoint_steps):
        return None
    return RollbackPlan(step, data_offset, first)
