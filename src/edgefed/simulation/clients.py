"""Who holds which text in a simulation: the BBC splits of the paper's setting, or your folders.

    bbc-specific   10 clients, 2 per topic, each with half of one topic's articles
    bbc-mixed      5 clients, client i with 75% of topic i and 25% of topic i+1
    --clients DIR  one sub-folder of text files per client (any data a user brings)

Articles are shuffled with the simulation seed before they are dealt, no article goes to two
clients, and a few articles of every topic (one document of every client folder) are held out
from all clients to form the federation's reference text for prediction trust. Every client's
actual mixture is reported, because a split that does not hold the mixture it claims (the
paper's "mixed" multilingual split) makes every conclusion drawn from it wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from edgefed.atomic import atomic_write_text
from edgefed.demo_text import BBC_TOPICS, bbc_topic
from edgefed.documents import Document, read_documents
from edgefed.errors import DataError, InputFileError

DATASETS = ("bbc-specific", "bbc-mixed")
REFERENCE_PER_TOPIC = 4
MIN_CLIENT_DOCUMENTS = 6  # enough for a train, a trust-validation and a test document


@dataclass(frozen=True)
class Client:
    """One virtual device's text, and where each document came from (topic or folder)."""

    name: str
    documents: tuple[Document, ...]
    labels: tuple[str, ...]  # one per document

    @property
    def mixture(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts


@dataclass(frozen=True)
class ClientSet:
    dataset: str
    clients: tuple[Client, ...]
    reference: tuple[Document, ...]  # held out from every client

    def write(self, folder: Path) -> dict[str, Path]:
        """Each client's documents as .txt files under folder/<client>/; the reference text."""
        paths = {}
        for client in self.clients:
            for document in client.documents:
                atomic_write_text(folder / client.name / f"{document.id[:24]}.txt", document.text)
            paths[client.name] = folder / client.name
        atomic_write_text(folder / "reference.txt", "\n\n".join(d.text for d in self.reference))
        return paths


def _shuffled_topics(seed: int) -> tuple[dict[str, list[Document]], list[Document]]:
    """Every topic's articles in a seeded order, minus the held-out reference articles."""
    topics, reference = {}, []
    for topic in BBC_TOPICS:
        documents = sorted(bbc_topic(topic).documents, key=lambda d: d.id)
        random.Random(f"{seed}:{topic}").shuffle(documents)
        reference.extend(documents[:REFERENCE_PER_TOPIC])
        topics[topic] = documents[REFERENCE_PER_TOPIC:]
    return topics, reference


def bbc_specific(docs_per_client: int | None = None, seed: int = 0) -> ClientSet:
    topics, reference = _shuffled_topics(seed)
    clients = []
    for topic, documents in topics.items():
        half = len(documents) // 2
        for index, part in enumerate((documents[:half], documents[half:]), start=1):
            part = part[:docs_per_client] if docs_per_client else part
            clients.append(Client(f"{topic}-{index}", tuple(part), (topic,) * len(part)))
    return ClientSet("bbc-specific", tuple(clients), tuple(reference))


def bbc_mixed(docs_per_client: int | None = None, seed: int = 0) -> ClientSet:
    topics, reference = _shuffled_topics(seed)
    smallest = min(len(d) for d in topics.values())
    total = docs_per_client or smallest  # each topic gives 75% to one client, 25% to another
    major = round(0.75 * total)
    minor = total - major
    if major + minor > smallest:
        raise DataError(
            f"--docs-per-client {total} needs {total} articles of every topic; the smallest "
            f"topic has {smallest}",
            f"use --docs-per-client {smallest} or less",
        )
    clients = []
    for index, topic in enumerate(BBC_TOPICS):
        following = BBC_TOPICS[(index + 1) % len(BBC_TOPICS)]
        # a topic's first `major` articles go to its own client, its last `minor` to the
        # client before it: no article is dealt twice
        own = topics[topic][:major]
        borrowed = topics[following][len(topics[following]) - minor :]
        documents = own + borrowed
        labels = (topic,) * len(own) + (following,) * len(borrowed)
        clients.append(Client(f"{topic}-mix", tuple(documents), labels))
    return ClientSet("bbc-mixed", tuple(clients), tuple(reference))


def folder_clients(root: str | Path, docs_per_client: int | None = None) -> ClientSet:
    """One client per sub-folder of `root`; the first document of each is held out."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(f"{root} is not a folder", "point --clients at a folder of folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise DataError(
            f"{root} has {len(folders)} client sub-folder(s); a federation needs at least 2",
            "make one sub-folder of text files per client",
        )
    clients, reference = [], []
    for folder in folders:
        try:
            documents = sorted(read_documents(folder).documents, key=lambda d: d.id)
        except DataError as exc:
            raise DataError(
                f"client {folder.name}: {exc.problem}", f"fix or remove the folder {folder}"
            ) from exc
        if len(documents) < MIN_CLIENT_DOCUMENTS:
            raise DataError(
                f"client {folder.name} has {len(documents)} document(s); each needs at least "
                f"{MIN_CLIENT_DOCUMENTS} (one held out for the reference text, the rest split "
                "into train, trust-validation and test)",
                f"add documents to {folder}, or remove that folder",
            )
        reference.append(documents[0])
        kept = documents[1:][:docs_per_client] if docs_per_client else documents[1:]
        name = _client_name(folder.name)
        clients.append(Client(name, tuple(kept), (folder.name,) * len(kept)))
    return ClientSet(f"clients:{root}", tuple(clients), tuple(reference))


def _client_name(folder: str) -> str:
    from edgefed.sync.layout import check_device_name

    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in folder.lower())[:64]
    check_device_name(name)
    return name


def load_clients(
    dataset: str | None = None,
    clients_dir: str | Path | None = None,
    *,
    docs_per_client: int | None = None,
    seed: int = 0,
) -> ClientSet:
    """The clients of `--dataset` or `--clients` (one of the two; default bbc-mixed)."""
    if clients_dir is not None:
        if dataset is not None:
            raise DataError("--dataset and --clients both name the data", "give one of them")
        return folder_clients(clients_dir, docs_per_client)
    dataset = dataset or "bbc-mixed"
    if dataset == "bbc-specific":
        return bbc_specific(docs_per_client, seed)
    if dataset == "bbc-mixed":
        return bbc_mixed(docs_per_client, seed)
    raise DataError(f"unknown dataset '{dataset}'", f"choose one of {', '.join(DATASETS)}")
