"""MkDocs hook: the table of trust schemes is rendered at build time from the registry
(`edgefed.trust.schemes.SCHEMES`), so a scheme registered in code is on the page, with what
it reads and its default sharpness, without anyone editing the docs."""

from __future__ import annotations

MARKER = "<!-- the trust schemes, generated -->"

_READS = {
    "RUNTIME": "llama.cpp scores",
    "VALIDATION_TEXT": "own trust-validation text",
    "SELECTION_TEXT": "a held-out half of it",
    "REFERENCE": "the federation's reference text",
    "TRAIN_TOKENS": "each device's training tokens",
    "MIXTURES": "the known data mixtures (simulations only)",
}


def on_page_markdown(markdown: str, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    from edgefed.trust.schemes import SCHEMES, Needs

    rows = ["| scheme | in one line | reads besides the adapters | default sharpness |",
            "| --- | --- | --- | --- |"]  # fmt: skip
    for scheme in SCHEMES.values():
        reads = [text for name, text in _READS.items() if Needs[name] in scheme.needs]
        rows.append(
            f"| `{scheme.name}` | {scheme.help} | {', '.join(reads) or 'nothing'} "
            f"| {scheme.default_sharpness or '-'} |"
        )
    return markdown.replace(MARKER, "\n".join(rows))
