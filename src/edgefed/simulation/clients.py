"""Who holds which text in a simulation: the BBC splits of the paper's setting, or your folders.

    bbc-specific      10 clients, 2 per topic, each with half of one topic's articles
    bbc-mixed         5 clients, client i with 75% of topic i and 25% of topic i+1
    code-prose        4 clients: 2 with Python code (this Python's standard library, cut into
                      article-sized pieces), 2 with BBC articles of every topic
    code-prose-mixed  4 clients: 2 with 75% code + 25% prose, 2 with 75% prose + 25% code
    --clients DIR     one sub-folder of text files per client (any data a user brings)

Documents are shuffled with the simulation seed before they are dealt, no document goes to two
clients, and a few documents of every topic or kind (4 articles per BBC topic, 10 documents of
code and 10 of prose, one document of every client folder) are held out from all clients to
form the federation's reference text for prediction trust. Every client's
actual mixture is reported, because a split that does not hold the mixture it claims (the
paper's "mixed" multilingual split) makes every conclusion drawn from it wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from edgefed.atomic import atomic_write_text
from edgefed.code_text import code_documents
from edgefed.demo_text import BBC_TOPICS, bbc_topic
from edgefed.documents import Document, read_documents
from edgefed.errors import DataError, InputFileError
from edgefed.plural import counted

DATASETS = ("bbc-specific", "bbc-mixed", "code-prose", "code-prose-mixed")
REFERENCE_PER_TOPIC = 4
REFERENCE_PER_KIND = 10  # code-prose: held-out documents of each kind
DEFAULT_DOCS_PER_CLIENT = 10  # the built-in datasets': scarce local data, as the demo has
# the demo's federation: where the regime map found trust's gain over FedAvg clearest (1 epoch)
DEMO_DATASET = "code-prose"
MAJOR_SHARE = 0.75  # a code-prose-mixed client's share of its main kind
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


def _kinds(seed: int) -> tuple[dict[str, list[Document]], list[Document]]:
    """The code and the prose (BBC, every topic) documents in a seeded order, minus the
    held-out reference documents."""
    kinds = {"code": code_documents(),
             "prose": [d for topic in BBC_TOPICS for d in bbc_topic(topic).documents]}  # fmt: skip
    reference = []
    for kind, documents in kinds.items():
        documents.sort(key=lambda d: d.id)
        random.Random(f"{seed}:{kind}").shuffle(documents)
        reference.extend(documents[:REFERENCE_PER_KIND])
        del documents[:REFERENCE_PER_KIND]
    return kinds, reference


def _deal(
    pools: dict[str, list[Document]], recipes: list[tuple[str, dict[str, int]]], seed: int
) -> tuple[Client, ...]:
    """Each (client, {kind: documents}) its documents from the pools' fronts, none dealt twice,
    in a seeded order within the client (so that --max-tokens, which keeps a client's first
    documents, keeps its mixture)."""
    taken = dict.fromkeys(pools, 0)
    clients = []
    for name, counts in recipes:
        documents, labels = [], []
        for kind, count in counts.items():
            if taken[kind] + count > len(pools[kind]):
                raise DataError(
                    f"the clients need more {kind} documents than the {len(pools[kind])} there are",
                    "use a smaller --docs-per-client",
                )
            documents += pools[kind][taken[kind] : taken[kind] + count]
            labels += [kind] * count
            taken[kind] += count
        order = list(range(len(documents)))
        random.Random(f"{seed}:{name}").shuffle(order)
        documents = [documents[i] for i in order]
        labels = [labels[i] for i in order]
        clients.append(Client(name, tuple(documents), tuple(labels)))
    return tuple(clients)


def code_prose(docs_per_client: int | None = None, seed: int = 0) -> ClientSet:
    n = docs_per_client or DEFAULT_DOCS_PER_CLIENT
    pools, reference = _kinds(seed)
    recipes = [(f"{kind}-{i}", {kind: n}) for kind in ("code", "prose") for i in (1, 2)]
    return ClientSet("code-prose", _deal(pools, recipes, seed), tuple(reference))


def code_prose_mixed(docs_per_client: int | None = None, seed: int = 0) -> ClientSet:
    n = docs_per_client or DEFAULT_DOCS_PER_CLIENT
    major = round(MAJOR_SHARE * n)
    pools, reference = _kinds(seed)
    recipes = [
        (f"{kind}-mix-{i}", {kind: major, other: n - major})
        for kind, other in (("code", "prose"), ("prose", "code"))
        for i in (1, 2)
    ]
    return ClientSet("code-prose-mixed", _deal(pools, recipes, seed), tuple(reference))


def folder_clients(root: str | Path, docs_per_client: int | None = None) -> ClientSet:
    """One client per sub-folder of `root`; the first document of each is held out."""
    root = Path(root)
    if not root.is_dir():
        raise InputFileError(f"{root} is not a folder", "point --clients at a folder of folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise DataError(
            f"{root} has {counted(len(folders), 'client sub-folder')}; a federation needs at "
            "least 2",
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
                f"client {folder.name} has {counted(len(documents), 'document')}; each needs at "
                f"least {MIN_CLIENT_DOCUMENTS} (one held out for the reference text, the rest "
                "split into train, trust-validation and test)",
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
    """The clients of `--dataset` or `--clients` (one of the two; default DEMO_DATASET), with
    `docs_per_client` documents each (default: DEFAULT_DOCS_PER_CLIENT for a dataset, every
    file of a client folder)."""
    if clients_dir is not None:
        if dataset is not None:
            raise DataError("--dataset and --clients both name the data", "give one of them")
        return folder_clients(clients_dir, docs_per_client)
    dataset = dataset or DEMO_DATASET
    docs_per_client = docs_per_client or DEFAULT_DOCS_PER_CLIENT
    if dataset == "bbc-specific":
        return bbc_specific(docs_per_client, seed)
    if dataset == "bbc-mixed":
        return bbc_mixed(docs_per_client, seed)
    if dataset == "code-prose":
        return code_prose(docs_per_client, seed)
    if dataset == "code-prose-mixed":
        return code_prose_mixed(docs_per_client, seed)
    raise DataError(f"unknown dataset '{dataset}'", f"choose one of {', '.join(DATASETS)}")
