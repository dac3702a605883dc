"""Local data for training: documents from every supported format, stable splits, token blocks."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import write_repetitive_corpus

from edgefed.documents import (
    BLOCK_CHARS,
    LONG_FILE_CHARS,
    Document,
    document_id,
    read_documents,
    skipped_files,
)
from edgefed.errors import DataError, InputFileError
from edgefed.train.blocks import PAD, evaluation_stream, pack_blocks, token_stream
from edgefed.train.split import (
    SPLITS,
    TEST,
    TRAIN,
    TRUST_VAL,
    SplitRule,
    record_split,
    recorded_splits,
)
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
    assert (docs.files, docs.skipped, docs.duplicates) == (6, ("image.txt", "latin1.txt"), 1)
    assert (
        skipped_files(docs.skipped)
        == "skipped 2 files that are not UTF-8 text: image.txt, latin1.txt"
    )
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


def test_fewer_than_three_documents_are_refused_with_a_way_out(tmp_path):
    docs = read_documents(write_repetitive_corpus(tmp_path, 3)).documents
    for few in (docs[:1], docs[:2]):
        refused = r"split is empty: \d documents? in all.*at least 3"
        with pytest.raises(DataError, match=refused) as e:
            split(few, SplitRule())
        assert "add documents" in e.value.fix
    assert all(split(docs, SplitRule())[name] for name in SPLITS)
    with pytest.raises(ValueError, match="leave a share for training"):
        SplitRule(val_fraction=0.5, test_fraction=0.5)


def _notes(n: int, start: int = 0) -> list[Document]:
    """`n` short documents of different content."""
    documents = []
    for i in range(start, start + n):
        text = (
            f"note {i}: the {('red', 'green', 'blue')[i % 3]} {('fox', 'owl', 'eel', 'yak')[i % 4]}"
            f" counted {i * 7919 % 1000} stones by the river"
        )
        documents.append(Document(id=document_id(text), text=text, source=f"note{i}.txt"))
    return documents


def _assignment(parts) -> dict[str, str]:
    return {d.id: name for name in SPLITS for d in parts[name]}


@pytest.mark.parametrize("n", [3, 5, 10, 39])
def test_small_sets_never_leave_a_split_empty(n):
    docs = _notes(n)
    filled = 0
    for seed in range(25):
        rule = SplitRule(seed=seed)
        parts = split(docs, rule)
        assert all(parts[name] for name in SPLITS), (n, seed)
        assignment = _assignment(parts)
        assert sorted(assignment) == sorted(d.id for d in docs)  # each document once
        assert _assignment(split(docs[::-1], rule)) == assignment  # order does not matter
        by_hash = {d.id: rule.split_of(d.id) for d in docs}
        if set(by_hash.values()) == set(SPLITS):
            assert assignment == by_hash  # a set that fills every split by hash keeps the hash
        else:
            filled += 1
            moved = [d for d in docs if assignment[d.id] != by_hash[d.id]]
            assert len(moved) == len(set(SPLITS) - set(by_hash.values()))  # one per empty split
            assert len(parts[TRAIN]) >= len(parts[TEST]) and len(parts[TRAIN]) >= 1
    if n <= 10:
        assert filled > 0  # the hash alone leaves these sets with an empty split


def test_a_filled_split_takes_the_nearest_document_of_the_largest_split():
    docs = _notes(39)
    rule = next(
        SplitRule(seed=s)
        for s in range(200)
        if TEST not in {SplitRule(seed=s).split_of(d.id) for d in docs}
    )
    parts = split(docs, rule)
    (moved,) = parts[TEST]
    assert rule.split_of(moved.id) == TRAIN  # train is the largest split
    train_by_hash = [d for d in docs if rule.split_of(d.id) == TRAIN]
    assert moved == min(train_by_hash, key=lambda d: rule.position(d.id))  # lowest u: nearest


def test_adding_documents_keeps_every_recorded_document_in_its_split(tmp_path):
    moved_without_record = 0
    for seed in range(12):
        rule = SplitRule(seed=seed)
        for n, added in ((3, 1), (3, 5), (5, 2), (10, 30), (39, 4)):
            manifest = tmp_path / f"{seed}-{n}-{added}.json"
            before = split(_notes(n), rule, recorded_splits(manifest))
            assert recorded_splits(manifest) == {}  # no manifest yet: nothing recorded
            record_split(before, manifest)
            old = _assignment(before)
            assert recorded_splits(manifest) == old

            grown = _notes(n) + _notes(added, start=n)
            after = split(grown, rule, recorded_splits(manifest))
            assert all(after[name] for name in SPLITS)
            new = _assignment(after)
            assert {doc: new[doc] for doc in old} == old
            assert all(new[d.id] == rule.split_of(d.id) for d in grown if d.id not in old)
            record_split(after, manifest)
            assert recorded_splits(manifest) == new

            without = _assignment(split(grown, rule))
            if any(without[doc] != old[doc] for doc in old):
                moved_without_record += 1
                # the record refuses a split that moves one of its documents
                with pytest.raises(DataError, match=r"is recorded in the .* split of"):
                    record_split(split(grown, rule), manifest)
    # why the record is passed back: which document fills a gap depends on the whole set
    assert moved_without_record > 0


def test_a_split_emptied_by_removed_documents_takes_only_a_new_one(tmp_path):
    docs = _notes(10)
    rule = SplitRule(
        seed=next(s for s in range(100) if len(split(docs, SplitRule(seed=s))[TEST]) == 1)
    )
    manifest = tmp_path / "split.json"
    first = split(docs, rule)
    record_split(first, manifest)
    (test_doc,) = first[TEST]
    left = [d for d in docs if d != test_doc]
    with pytest.raises(DataError, match=r"the test split is empty: the documents recorded in it"):
        split(left, rule, recorded_splits(manifest))
    newcomer = _notes(1, start=100)
    again = split(left + newcomer, rule, recorded_splits(manifest))
    assert again[TEST] == tuple(newcomer)  # the new document fills it; no recorded one moves
    old = _assignment(first)
    assert all(_assignment(again)[doc] == old[doc] for doc in old if doc != test_doc.id)


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


def _paragraph(i: int, size: int) -> str:
    words = f"paragraph {i} says that the {('tide', 'wind', 'rain')[i % 3]} came in early"
    return (words + ". ") * (size // (len(words) + 2)) + f"end of {i}."


def test_a_long_file_is_cut_into_documents_at_paragraph_boundaries(tmp_path):
    paragraphs = [_paragraph(i, 400 + 97 * (i % 23)) for i in range(60)]
    text = "\n\n".join(paragraphs) + "\n"
    assert len(text) > LONG_FILE_CHARS
    book = tmp_path / "book.txt"
    book.write_text(text)

    docs = read_documents(book).documents
    assert len(docs) >= len(text) // BLOCK_CHARS
    assert [d.source for d in docs] == [f"{book}#{n}" for n in range(1, len(docs) + 1)]
    assert all(len(d.text) <= BLOCK_CHARS and d.id == document_id(d.text) for d in docs)
    # every block is whole paragraphs, in order, and together they are the file
    assert [p for d in docs for p in d.text.split("\n\n")] == paragraphs
    # a block closes only when the next paragraph does not fit
    for block, following in itertools.pairwise(docs):
        assert len(block.text) + 2 + len(following.text.split("\n\n")[0]) > BLOCK_CHARS
    assert read_documents(book).documents == docs  # the same file: the same ids

    # text added at the end changes only the last block; the others keep their ids (and splits)
    book.write_text(text + "\n" + "\n\n".join(_paragraph(i, 900) for i in range(60, 70)))
    grown = read_documents(book).documents
    assert grown[: len(docs) - 1] == docs[:-1] and len(grown) > len(docs)

    # a file split into blocks is a client that splits
    assert all(split(docs, SplitRule())[name] for name in SPLITS)


def test_a_giant_paragraph_is_cut_at_line_breaks_then_at_the_limit(tmp_path):
    lines = [f"line {i} of a log without blank lines, status ok" for i in range(900)]
    log = tmp_path / "app.md"
    log.write_text("\n".join(lines))
    docs = read_documents(log).documents
    assert len(docs) > 1 and all(len(d.text) <= BLOCK_CHARS for d in docs)
    assert [line for d in docs for line in d.text.split("\n")] == lines  # cut between lines

    solid = tmp_path / "solid.txt"
    solid.write_text("".join(f"{i:07d}" for i in range(LONG_FILE_CHARS // 7 + 1000)))  # one line
    pieces = read_documents(solid).documents
    assert "".join(d.text for d in pieces) == solid.read_text()
    assert [len(d.text) for d in pieces][:-1] == [BLOCK_CHARS] * (len(pieces) - 1)


def test_files_up_to_the_long_file_size_stay_one_document(tmp_path):
    paragraphs = [_paragraph(i, 1000) for i in range(40)]
    text = "\n\n".join(paragraphs)
    (tmp_path / "at.txt").write_text(text[:LONG_FILE_CHARS])
    (tmp_path / "over.txt").write_text(text[: LONG_FILE_CHARS + 1])
    docs = read_documents(tmp_path).documents
    assert [d.source.rsplit("/", 1)[-1] for d in docs if d.source.endswith("at.txt")] == ["at.txt"]
    assert sum(d.source.split("/")[-1].startswith("over.txt#") for d in docs) > 1


def test_bbc_news_articles_stay_whole():
    from edgefed.demo_text import bbc_folder

    try:
        folder = bbc_folder()
    except InputFileError:  # the demo text is an optional install
        pytest.skip("the BBC demo text is not installed")
    articles = read_documents(folder).documents
    longest = max(len(d.text) for d in articles)
    assert 20_000 < longest < LONG_FILE_CHARS  # the longest article is 25,485 characters
    assert not [d.source for d in articles if "#" in d.source]
    assert all(d.source.endswith(".txt") for d in articles)


def test_every_round_of_a_device_and_its_scoring_keep_one_assignment(tmp_path):
    from edgefed.device.split_text import recorded_assignment, recorded_rule
    from edgefed.device.train import _carry_split_record
    from edgefed.device.workspace import Workspace

    workspace = Workspace(tmp_path / "device")
    docs = _notes(5)
    rule = next(  # a seed under which the hash leaves a split empty, so a document was moved
        SplitRule(seed=s)
        for s in range(100)
        if len({SplitRule(seed=s).split_of(d.id) for d in docs}) < len(SPLITS)
    )
    first = split(docs, rule)
    record_split(first, workspace.train_run(0).split)
    for round_number in (1, 2, 3):
        _carry_split_record(workspace, round_number)  # what train_round does before training
    grown = docs + _notes(3, start=5)
    run = workspace.train_run(3)
    later = split(grown, rule, recorded_splits(run.split))
    record_split(later, run.split)
    old = _assignment(first)
    assert {doc: _assignment(later)[doc] for doc in old} == old
    # trust and test text are cut as the run recorded them, looked up from its adapter folder
    assert recorded_rule(run.adapter) == rule
    assert recorded_assignment(run.adapter) == _assignment(later)
    assert _assignment(split(grown, rule, recorded_assignment(run.adapter))) == _assignment(later)
    # a round that already has its record keeps it
    _carry_split_record(workspace, 3)
    assert recorded_splits(run.split) == _assignment(later)
