"""The versioned documents of a workspace: old files still read, newer ones are refused clearly."""

from __future__ import annotations

import json

import pytest

from edgefed.device.records import EvaluationRecord, RoundRecord, TrustRecord
from edgefed.device.workspace import DeviceConfig
from edgefed.errors import InputFileError, ModelFormatError

# trust.json as written before formats were versioned and before --clip-norm existed
OLD_TRUST = {"round": 0, "scheme": "perplexity", "devices": ["alice", "bob"],
             "scores": [-2.0, -2.1], "weights": [0.9, 0.1],
             "normalization": {"temperature": 0.01, "top_k": None, "threshold": None},
             "merge": "factors", "relative_error": 0.0, "peers_used": ["bob"]}  # fmt: skip
OLD_ROUND = {"round": 0, "steps": {
    "train": {"steps": 4, "finished": "t1"},
    "sync": {"verified_peers": ["bob"], "rejected": 0, "seconds": 1.0, "finished": "t2"},
    "aggregate": {"scheme": "perplexity", "finished": "t3"},
}}  # fmt: skip


def test_files_from_before_versions_read_as_format_1(tmp_path):
    (tmp_path / "trust.json").write_text(json.dumps(OLD_TRUST))
    trust = TrustRecord.read(tmp_path / "trust.json")
    assert trust.weights_by_device() == {"alice": 0.9, "bob": 0.1}
    assert trust.delta_norms == {} and trust.clip_norm is None

    (tmp_path / "round.json").write_text(json.dumps(OLD_ROUND))
    record = RoundRecord.read(tmp_path / "round.json")
    assert list(record.steps) == ["train", "publish", "pull", "aggregate"]
    assert record.steps["publish"] == {"finished": "t2"}
    assert record.steps["pull"]["verified_peers"] == ["bob"] and not record.is_finished()

    record.write(tmp_path / "again.json")  # written back with its version, and read the same
    assert json.loads((tmp_path / "again.json").read_text())["format"] == 1
    assert RoundRecord.read(tmp_path / "again.json") == record


def test_newer_unknown_damaged_and_missing_documents_get_one_clear_error(tmp_path):
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"format": 2, "round": 0}))
    with pytest.raises(ModelFormatError, match="is format 2; this edgefed reads format 1") as new:
        EvaluationRecord.read(path)
    assert new.value.fix == "upgrade edgefed"
    path.write_text(json.dumps({"format": "x"}))
    with pytest.raises(ModelFormatError, match="format x") as unknown:
        EvaluationRecord.read(path)
    assert unknown.value.fix == EvaluationRecord.FIX
    path.write_text('{"round": 0')
    with pytest.raises(ModelFormatError, match="is damaged"):
        EvaluationRecord.read(path)
    path.write_text(json.dumps({"format": 1, "round": 0}))
    with pytest.raises(ModelFormatError, match="lacks or garbles 'device'"):
        EvaluationRecord.read(path)
    # a device's identity is not rebuilt by rerunning a step: its fix says so
    (tmp_path / "device.json").write_text(json.dumps({"format": 1, "device": "alice"}))
    with pytest.raises(ModelFormatError) as config:
        DeviceConfig.read(tmp_path / "device.json")
    assert "join again" in config.value.fix
    with pytest.raises(InputFileError, match="is missing"):
        TrustRecord.read(tmp_path / "nothing.json")


def test_a_federation_with_a_scheme_this_version_lacks_still_reads(tiny_llama_gguf):
    from edgefed.adapter import LoraSpec
    from edgefed.quant.gguf_file import read_base_info
    from edgefed.sync.manifest import Federation, Schedule, federation_manifest
    from edgefed.trust.settings import TrustSettings

    document = federation_manifest(federation_id="fed-x", base_info=read_base_info(tiny_llama_gguf),
                                   lora=LoraSpec(rank=4),
                                   schedule=Schedule(warmup_steps=3, round_steps=2),
                                   trust={"scheme": "from-the-future"})  # fmt: skip
    federation = Federation.from_document(document)
    schedule = federation.schedule
    assert schedule.training_of(0).steps == 3 and schedule.training_of(5).steps == 2
    assert federation.lora == LoraSpec(rank=4) and federation.document == document
    with pytest.raises(ValueError, match="unknown trust scheme 'from-the-future'"):
        TrustSettings.from_federation(federation.trust_default)  # refused where it is used
    with pytest.raises(ModelFormatError, match="not a usable"):
        Federation.from_document(document | {"schedule": {"warmup_steps": 3}})
