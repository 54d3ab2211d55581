"""Three real text domains for the merge recipe, each split by document into train / fit / eval files.

- `python_docs`: Python's language reference (`hf_interop.load_builtin_corpus`, ships with CPython);
- `fortunes`: Debian's `fortunes` package (quotations, `%`-separated);
- `jargon`: Debian's `jargon-text` package (the Jargon File).

The Debian packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` (no root needed). Each
document (a fortune, a paragraph, a section of the reference) is written on one paragraph of `train.txt`,
`fit.txt` (held out: the merge coefficients are fitted on it) or `eval.txt` (held out: perplexities are measured
on it): documents whose index is 0 mod 20 go to fit, 10 mod 20 to eval, the rest to train. `fit_all.txt` joins
the three fit files.

    python recipes/smollm2-135m_merge_domains/prepare_texts.py outputs/texts
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DOMAINS = ("python_docs", "fortunes", "jargon")


def _debian_documents(package: str, work: Path) -> list[str]:
    subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
    (deb,) = work.glob(f"{package}_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    root = work / "root"
    if package == "fortunes":
        documents = []
        for path in sorted((root / "usr/share/games/fortunes").iterdir()):
            if path.is_file() and path.suffix not in (".dat", ".u8"):
                text = path.read_text(encoding="utf-8", errors="replace")
                documents += re.split(r"(?m)^%\s*$", text)
        return documents
    text = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("latin-1")
    return re.split(r"\n\s*\n", text)


def _python_documents() -> list[str]:
    from hf_interop import load_builtin_corpus

    corpus = load_builtin_corpus()
    return [row["text"] for split in ("train", "validation", "test") for row in corpus[split]]


def prepare_texts(output_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Write `<output_dir>/<domain>/{train,fit,eval}.txt` and `fit_all.txt` (skipped when present); returns paths."""
    output_dir = Path(output_dir)
    paths = {
        domain: {part: output_dir / domain / f"{part}.txt" for part in ("train", "fit", "eval")} for domain in DOMAINS
    }
    for domain in DOMAINS:
        if all(path.is_file() for path in paths[domain].values()):
            continue
        if domain == "python_docs":
            documents = _python_documents()
        else:
            with tempfile.TemporaryDirectory() as work:
                documents = _debian_documents("fortunes" if domain == "fortunes" else "jargon-text", Path(work))
        # one paragraph per document: blank lines inside a document are dropped
        documents = [re.sub(r"\n\s*\n", "\n", document).strip() for document in documents]
        documents = [document for document in documents if len(document) > 20]
        parts = {"train": [], "fit": [], "eval": []}
        for index, document in enumerate(documents):
            parts["fit" if index % 20 == 0 else "eval" if index % 20 == 10 else "train"].append(document)
        (output_dir / domain).mkdir(parents=True, exist_ok=True)
        for part, texts in parts.items():
            temporary = paths[domain][part].with_suffix(".tmp")
            temporary.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
            temporary.replace(paths[domain][part])
    fit_all = output_dir / "fit_all.txt"
    fit_all.write_text("".join(paths[domain]["fit"].read_text(encoding="utf-8") + "\n" for domain in DOMAINS))
    return paths


if __name__ == "__main__":
    for domain, files in prepare_texts(sys.argv[1] if len(sys.argv) > 1 else "outputs/texts").items():
        print(domain, {part: f"{path} ({path.stat().st_size // 1024} KiB)" for part, path in files.items()})
