"""A resumed run ends bit-identical to the uninterrupted one: the checks every resume test makes
(test_cl_faults, test_cl_launcher, test_cl_write_faults, test_cl_runs), in one place.

Both runs are 2-rank launches with checkpoints in ``<run>/<method>/checkpoints``; equality is exact
(``torch.equal`` and ``==`` on the JSON values), never a tolerance: a resume that replays a step,
skips one or restores a moment, a projector or a LoRA merge slightly differently shows up here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.launch import read_final_state, read_results


def assert_same_final_state(run: Path, reference: Path, method: str = "gorp", *,
                            merges: int | None = None) -> dict[str, torch.Tensor]:
    """The last checkpoints of two runs of ``method``: the same tag, and bit-identical fp32 masters of
    every trained tensor, recorded LoRA merges (what rebuilds the frozen weights; ``merges`` of them
    when given) and each rank's shared spaces. Returns the run's masters (name → flat fp32 tensor)."""
    tag, masters, merged, ranks = read_final_state(run, method)
    ref_tag, ref_masters, ref_merged, ref_ranks = read_final_state(reference, method)
    assert tag == ref_tag
    assert sorted(masters) == sorted(ref_masters)
    assert [k for k in masters if not torch.equal(masters[k], ref_masters[k])] == []
    assert len(merged) == len(ref_merged)
    if merges is not None:
        assert len(merged) == merges, len(merged)
    for record, ref_record in zip(merged, ref_merged):
        assert sorted(record) == sorted(ref_record)
        for layer in record:
            assert all(torch.equal(record[layer][k], ref_record[layer][k]) for k in ("A", "B", "scaling")), layer
    for state, ref_state in zip(ranks, ref_ranks):
        assert sorted(state["shared"]) == sorted(ref_state["shared"])
        for name, basis in state["shared"].items():
            assert torch.equal(basis, ref_state["shared"][name]), name
    return masters


def assert_resumed_equals_uninterrupted(run: Path, reference: Path, method: str = "gorp", *,
                                        merges: int | None = None) -> dict[str, torch.Tensor]:
    """A finished resumed run of ``method`` against the uninterrupted ``reference``: the same R and
    metrics in results.json, and :func:`assert_same_final_state`. Returns the run's masters."""
    resumed, expected = read_results(run, method), read_results(reference, method)
    assert resumed["R"] == expected["R"] and resumed["metrics"] == expected["metrics"]
    return assert_same_final_state(run, reference, method, merges=merges)
