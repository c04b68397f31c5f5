"""Prepare the depth study's English corpus: two software manuals (the Linux kernel's and Python's), as text.

    python benchmarks/prepare_corpus.py                  # -> benchmarks/corpus/ (git-ignored)
    python benchmarks/prepare_corpus.py --debs DIR --out DIR --txt

Source: two Debian bookworm packages at pinned versions (PACKAGES below): `linux-doc-6.1` (the
kernel documentation, GPL-2.0) and `python3.11-doc` (the Python 3.11 documentation, PSF), both built
by Sphinx as HTML. Each page's main text (its `role="main"` part: no navigation, sidebars or
scripts; the indexes, the kernel's translations into other languages, its MAINTAINERS list and
Python's changelog left out) becomes one document. The packages are fetched with `apt-get download`
(Debian's archive is one of the registries this project's machines reach), or read from `--debs`;
their sha256 are pinned, so the text is the same on every machine, and its sha256 (printed, and in
manifest.json) says so. Python's standard library reads the .deb (an `ar` archive holding
data.tar.xz) and the HTML: no dpkg needed, no new dependency.

Documents are ordered by the sha256 of `package/path`, not alphabetically, so that the validation
split `data=text` holds out (the last `data.val_fraction` of the windows: 1 % in the depth study) is a sample
of whole pages from every part of both manuals, not the last chapters of one. Each document ends with
a blank line.

Output (`--out`, default benchmarks/corpus/: git-ignored, never inside the package):
    debian-docs.txt.xz   the corpus, xz-compressed (about 9 MB: well under the device tool's
                         64 MiB of carried files); `--txt` also writes debian-docs.txt
    manifest.json        packages, versions, sha256 of each .deb, of the text and of the .xz;
                         bytes, documents, words, lines

`data=text` reads .txt files (not .xz): `benchmarks/depth_study.py --corpus benchmarks/corpus`
decompresses it once into its output root, checking the sha256 against manifest.json. By hand:
`xz -dk benchmarks/corpus/debian-docs.txt.xz`, then
`stackwise-train data=text data.path=benchmarks/corpus/debian-docs.txt`. Nothing here runs at
training time, and nothing is downloaded then.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path


@dataclass(frozen=True)
class Package:
    """A pinned Debian package whose Sphinx HTML pages become documents."""

    name: str
    version: str
    sha256: str
    size: int
    html_root: str  # the folder of its HTML inside the package
    skip: str  # pages (paths under html_root) that are not English prose
    license: str

    @property
    def deb(self) -> str:
        return f"{self.name}_{self.version}_all.deb"


_SPHINX_SKIP = r"^(_static|_sources|_images|_downloads)/|(^|/)(genindex[^/]*|search|py-modindex|contents)\.html$"
PACKAGES = (
    Package(
        "linux-doc-6.1",
        "6.1.170-3",
        "8a0e80e4f14407d0d96058b9eec7afa4ae57e6408d3f4e2bed35462d14b99342",
        37191620,
        "usr/share/doc/linux-doc-6.1/html/",
        # the translations into Chinese, Japanese, Korean, Italian, Spanish; MAINTAINERS (names and addresses)
        _SPHINX_SKIP + r"|^translations/|^process/maintainers\.html$",
        "GPL-2.0 (the Linux kernel documentation)",
    ),
    Package(
        "python3.11-doc",
        "3.11.2-6+deb12u8",
        "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
        12642400,
        "usr/share/doc/python3.11/html/",
        _SPHINX_SKIP + r"|^whatsnew/changelog\.html$",  # the changelog: issue numbers, one line each
        "PSF-2.0 (the Python documentation)",
    ),
)
CORPUS_NAME = "debian-docs.txt"
XZ_NAME = CORPUS_NAME + ".xz"
MANIFEST = "manifest.json"
DEFAULT_OUT = Path(__file__).resolve().parent / "corpus"


class MainText(HTMLParser):
    """The text of a Sphinx page's `<div role="main">`: blocks on their own lines, pre kept as is."""

    BLOCK = frozenset(
        ("p", "div", "section", "pre", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "br", "blockquote")
        + ("h1", "h2", "h3", "h4", "h5", "h6", "caption", "figure")
    )
    HIDDEN = frozenset(("script", "style"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # nesting of <div> inside the main one (0 = outside it)
        self.hidden = 0
        self.pre = 0
        self.headerlink = 0
        self.out: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth == 0:
            if tag == "div" and a.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in self.HIDDEN:
            self.hidden += 1
        if tag == "a" and "headerlink" in (a.get("class") or ""):
            self.headerlink += 1  # the pilcrow after each heading
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n")
        if tag in ("td", "th"):
            self.out.append(" ")

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if tag == "div":
            self.depth -= 1
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        if tag == "a" and self.headerlink:
            self.headerlink -= 1
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.depth == 0 or self.hidden or self.headerlink:
            return
        self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.out).split("\n")]
        text = "\n".join(lines)
        text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
        return html.unescape(text) if "&" in text else text


def page_text(raw: bytes) -> str:
    parser = MainText()
    parser.feed(raw.decode("utf-8"))
    parser.close()
    return parser.text().replace("\0", "")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_deb(pkg: Package, folder: Path) -> Path:
    """`apt-get download` the pinned version into `folder`."""
    if shutil.which("apt-get") is None:
        sys.exit(f"error: apt-get not found; download {pkg.deb} (Debian bookworm) elsewhere and pass --debs DIR")
    print(f"fetching {pkg.name}={pkg.version} with apt-get download ...", flush=True)
    r = subprocess.run(["apt-get", "download", f"{pkg.name}={pkg.version}"], cwd=folder, capture_output=True, text=True)
    path = folder / pkg.deb
    if r.returncode != 0 or not path.is_file():
        msg = (r.stderr or r.stdout).strip().splitlines()
        sys.exit(
            f"error: apt-get download {pkg.name}={pkg.version} failed ({msg[-1] if msg else r.returncode}); "
            f"run `apt-get update` first, or pass --debs DIR holding {pkg.deb}"
        )
    return path


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), opened from memory."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        sys.exit(f"error: {deb} is not a .deb (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    sys.exit(f"error: {deb} holds no data.tar member")


def documents(pkg: Package, deb: Path) -> list[tuple[str, str]]:
    """[(package/path of the page, text)] of every prose page of one package."""
    skip = re.compile(pkg.skip)
    docs = []
    with deb_data_tar(deb) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if not (member.isfile() and name.startswith(pkg.html_root) and name.endswith(".html")):
                continue
            rel = name[len(pkg.html_root) :]
            if skip.search(rel):
                continue
            text = page_text(tar.extractfile(member).read())
            if text.strip():
                docs.append((f"{pkg.name}/{rel}", text))
    return docs


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/corpus)")
    p.add_argument(
        "--debs",
        type=Path,
        default=None,
        help="a folder holding the pinned .deb files (default: apt-get download them)",
    )
    p.add_argument("--txt", action="store_true", help="also write the uncompressed .txt beside the .xz")
    p.add_argument("--val-fraction", type=float, default=0.01, help="the depth study's data.val_fraction, for the note")
    args = p.parse_args(argv)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    docs: list[tuple[str, str]] = []
    per_package = []
    with tempfile.TemporaryDirectory(prefix="stackwise-corpus-") as tmp:
        for pkg in PACKAGES:
            deb = args.debs / pkg.deb if args.debs is not None else fetch_deb(pkg, Path(tmp))
            if not deb.is_file():
                sys.exit(f"error: {deb} does not exist (--debs must hold {', '.join(q.deb for q in PACKAGES)})")
            digest = sha256_file(deb)
            if digest != pkg.sha256:
                sys.exit(f"error: {deb} has sha256 {digest}, expected {pkg.sha256} ({pkg.deb}, {pkg.size} bytes)")
            print(f"{pkg.deb}: sha256 ok; converting its HTML pages to text ...", flush=True)
            got = documents(pkg, deb)
            docs += got
            per_package.append(
                {
                    "package": pkg.name,
                    "version": pkg.version,
                    "deb": pkg.deb,
                    "deb_sha256": pkg.sha256,
                    "deb_bytes": pkg.size,
                    "license": pkg.license,
                    "documents": len(got),
                    "bytes": sum(len(body.encode()) + 2 for _, body in got),
                }
            )
    docs.sort(key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    text = "".join(body + "\n\n" for _, body in docs)
    raw = text.encode("utf-8")
    xz = lzma.compress(raw, preset=6)
    atomic_write(args.out / XZ_NAME, xz)
    if args.txt:
        atomic_write(args.out / CORPUS_NAME, raw)
    n_val = int(len(raw) * args.val_fraction)
    manifest = {
        "source": "the Sphinx HTML documentation of pinned Debian bookworm packages, as text",
        "packages": per_package,
        "file": CORPUS_NAME,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "documents": len(docs),
        "words": len(text.split()),
        "lines": text.count("\n"),
        "xz_file": XZ_NAME,
        "xz_sha256": hashlib.sha256(xz).hexdigest(),
        "xz_bytes": len(xz),
        "order": "documents sorted by sha256 of package/path (validation = a sample of whole pages)",
        "validation": f"data=text holds out the last {args.val_fraction:g} of the windows: about {n_val:,} bytes "
        "(the byte tokenizer: one token per byte)",
        "script": "benchmarks/prepare_corpus.py",
    }
    atomic_write(args.out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    for pkg in per_package:
        print(f"{pkg['package']} {pkg['version']}: {pkg['documents']:,} documents, {pkg['bytes']:,} bytes")
    for key in ("bytes", "documents", "words", "sha256", "xz_bytes", "xz_sha256"):
        value = manifest[key]
        print(f"{key:>10}: {value:,}" if isinstance(value, int) else f"{key:>10}: {value}")
    print(f"wrote {args.out / XZ_NAME} and {args.out / MANIFEST} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
