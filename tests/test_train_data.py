"""Local data for training: documents from every supported format, stable splits, token blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_repetitive_corpus

from edgefed.documents import Document, document_id, read_documents
from edgefed.errors import DataError
from edgefed.train.blocks import PAD, evaluation_stream, pack_blocks, token_stream
from edgefed.train.split import SPLITS, TEST, TRAIN, TRUST_VAL, SplitRule, record_split
from edgefed.train.split import split_documents as split


def test_every_format_reads_documents_and_counts_what_it_leaves_out(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    (tmp_path / "notes.md").write_text("# heading\nmarkdown document")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"text": "first line document", "id": 1})
        + "\n\n"
        + json.dumps({"text": "plain text document"})  # a duplicate of a.txt
        + "\n"
    )
    (tmp_path / "table.csv").write_text('id,body\n1,"csv row, with a comma"\n2,second row\n')
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\x00\x01binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "ignored.bin").write_bytes(b"not looked at")

    with pytest.raises(DataError, match=r"table.csv has no column 'text' \(columns: id, body\)"):
        read_documents(tmp_path)
    (tmp_path / "table.csv").write_text('id,text\n1,"csv row, with a comma"\n2,second row\n')
    docs = read_documents(tmp_path)
    assert sorted(docs.texts) == sorted(
        [
            "plain text document",
            "# heading\nmarkdown document",
            "first line document",
            "csv row, with a comma",
            "second row",
        ]
    )
    assert (docs.files, docs.skipped, docs.duplicates) == (6, 2, 1)
    assert {d.source.rsplit("/", 1)[-1] for d in docs.documents} >= {"rows.jsonl:1", "table.csv:2"}
    assert all(d.id == document_id(d.text) for d in docs.documents)

    by_field = read_documents(tmp_path / "rows.jsonl", text_field="text")
    assert by_field.texts == ("first line document", "plain text document")


def test_malformed_structured_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        read_documents(bad)
    bad.write_text('{"text": "fine"}\n{"body": "elsewhere"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no string field 'text'.*--text-field"):
        read_documents(bad)
    bad.write_text('{"body": "elsewhere"}\n')
    assert read_documents(bad, text_field="body").texts == ("elsewhere",)


def test_adding_files_keeps_every_old_document_in_its_split(tmp_path):
    folder = write_repetitive_corpus(tmp_path / "data", 60)
    rule = SplitRule(seed=3, val_fraction=0.2, test_fraction=0.2)
    before = split(read_documents(folder).documents, rule)
    record_split(before, tmp_path / "split.json")
    old = {d.id: name for name in SPLITS for d in before[name]}
    assert all(before[name] for name in SPLITS)

    write_repetitive_corpus(folder, 40, start=60)
    after = split(read_documents(folder).documents, rule)
    record_split(after, tmp_path / "split.json")
    new = {d.id: name for name in SPLITS for d in after[name]}
    assert len(new) == 100
    assert {doc: new[doc] for doc in old} == old
    manifest = json.loads((tmp_path / "split.json").read_text())
    assert len(manifest["documents"]) == 100
    assert {e["split"] for e in manifest["documents"].values()} == {TRAIN, TRUST_VAL, TEST}

    # another seed is another split, and the workspace refuses it
    other = split(
        read_documents(folder).documents, SplitRule(seed=4, val_fraction=0.2, test_fraction=0.2)
    )
    assert {d.id: name for name in SPLITS for d in other[name]} != new
    with pytest.raises(DataError, match="was split with"):
        record_split(other, tmp_path / "split.json")


def test_an_empty_split_is_refused_with_a_way_out(tmp_path):
    docs = read_documents(write_repetitive_corpus(tmp_path, 3)).documents
    with pytest.raises(DataError, match=r"split is empty \(3 document\(s\).*--val-fraction"):
        split(docs, SplitRule())
    with pytest.raises(ValueError, match="leave a share for training"):
        SplitRule(val_fraction=0.5, test_fraction=0.5)


def test_blocks_start_with_bos_pack_documents_and_pad_only_the_last():
    docs = [Document(id=str(i), text="x" * n, source="") for i, n in enumerate((5, 3, 7))]
    stream = token_stream(docs, lambda text: np.arange(len(text), dtype=np.int32) + 10, eos=2)
    assert stream.tolist() == [10, 11, 12, 13, 14, 2, 10, 11, 12, 2, *list(range(10, 17)), 2]
    blocks = pack_blocks(stream, seq_len=8, bos=1)
    assert blocks.tokens.shape == (3, 8) and blocks.text_tokens == len(stream) == 18
    assert (blocks.tokens[:, 0] == 1).all()
    assert np.concatenate([b[1:] for b in blocks.tokens])[:18].tolist() == stream.tolist()
    assert (blocks.tokens[2, 5:] == PAD).all() and (blocks.tokens[:2] != PAD).all()
    assert evaluation_stream(stream, 1, 4).tolist() == [1, 10, 11, 12, 13]
    with pytest.raises(DataError, match="no text to train on"):
        pack_blocks(stream[:0], seq_len=8, bos=1)
