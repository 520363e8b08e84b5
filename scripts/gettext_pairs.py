"""English-Chinese sentence pairs from the gettext catalogs Debian packages install.

Every ``/usr/share/locale/zh_CN/LC_MESSAGES/*.mo`` maps English messages (msgid) to
their Simplified Chinese translations (msgstr): real text, translated by people, offline.
Kept: pairs whose Chinese has at least one CJK character and whose English keeps at
least three letters once format directives (``%s``, ``%1$d``, ``{0}``, ``<name>``,
``$VAR``) are removed; contexts (``msgctxt``) are dropped, whitespace collapsed, the
mnemonic markers of menus removed (``_File`` / ``文件(_F)``), and strings longer than 200
characters (help screens) left out.  De-duplicated both ways on a normalised key
(lower case, punctuation and directives removed): no two pairs share an English or a
Chinese string, so each Chinese query has exactly one right English answer.

:func:`english_msgids` gives more English for training adapters: the msgids of every
catalog of every locale (about 32,000 beyond the pairs).

    python scripts/gettext_pairs.py --out pairs.jsonl      # ~37,000 pairs
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LOCALE = Path("/usr/share/locale")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
DIRECTIVE = re.compile(
    r"%(\d+\$)?[-+ #0']*(\*|\d+)?(\.(\*|\d+))?(hh|h|ll|l|L|q|j|z|t|I64|I32)?"
    r"[diouxXeEfFgGaAcspnm%]|%\([a-z_]+\)[sd]|\{[^}]*\}|\$\{?[A-Za-z_]+\}?|<[^>]+>")
ZH_MNEMONIC = re.compile(r"\s*\(_?&?[A-Za-z0-9]\)")
EN_MNEMONIC = re.compile(r"(?<![\w])[_&](?=[A-Za-z0-9])")
MAX_CHARS = 200


@dataclass(frozen=True)
class Pair:
    domain: str  # the catalog: git, coreutils, gtk30, ...
    en: str
    zh: str


def clean(text: str, mnemonic: re.Pattern[str]) -> str:
    text = text.split("\x04", 1)[-1]  # msgctxt\x04msgid
    if text.count("_") <= 1:  # a lone _ marks a menu mnemonic; identifiers have more
        text = mnemonic.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def key(text: str) -> str:
    """What two strings must differ in to count as different."""
    return re.sub(r"[\W_]+", " ", DIRECTIVE.sub(" ", text).lower()).strip()


def has_words(en: str) -> bool:
    return len(re.sub(r"[^A-Za-z]", "", DIRECTIVE.sub(" ", en))) >= 3


def catalog(path: Path) -> dict[str, str]:
    """msgid -> msgstr of one ``.mo`` file (plurals: the singular forms); {} if unreadable.

    Read directly (the format is two tables of (length, offset)): the standard library's
    parser gives up on a whole catalog for one odd header, which real catalogs have.
    """
    try:
        data = path.read_bytes()
        order = {0x950412DE: "<", 0xDE120495: ">"}.get(struct.unpack("<I", data[:4])[0])
        if order is None:
            return {}
        n, ids_at, strs_at = struct.unpack(order + "3I", data[8:20])
        out = {}
        for i in range(n):
            klen, koff = struct.unpack(order + "2I", data[ids_at + 8 * i:ids_at + 8 * i + 8])
            vlen, voff = struct.unpack(order + "2I", data[strs_at + 8 * i:strs_at + 8 * i + 8])
            k = data[koff:koff + klen].split(b"\0")[0].decode("utf-8", "replace")
            v = data[voff:voff + vlen].split(b"\0")[0].decode("utf-8", "replace")
            if k and v and "\ufffd" not in k + v:
                out[k] = v
        return out
    except (OSError, struct.error):
        return {}


def extract_pairs(lang: str = "zh_CN", locale: Path = LOCALE) -> list[Pair]:
    """Every usable pair of ``lang``'s catalogs, catalogs in name order, first one kept."""
    pairs, seen_en, seen_zh = [], set(), set()
    for path in sorted((locale / lang / "LC_MESSAGES").glob("*.mo")):
        for msgid, msgstr in catalog(path).items():
            en, zh = clean(msgid, EN_MNEMONIC), ZH_MNEMONIC.sub("", clean(msgstr, EN_MNEMONIC))
            if not (2 <= len(en) <= MAX_CHARS) or not CJK.search(zh) or not has_words(en):
                continue
            ke, kz = key(en), key(zh)
            if not ke or not kz or ke in seen_en or kz in seen_zh:
                continue
            seen_en.add(ke)
            seen_zh.add(kz)
            pairs.append(Pair(path.stem, en, zh))
    return pairs


def english_msgids(exclude: Iterable[str], locale: Path = LOCALE) -> list[str]:
    """More English for training adapters: every msgid of every locale's catalogs that
    shares no normalised key with ``exclude`` (nor with another one kept), cleaned the
    same way; in catalog path order."""
    seen = {key(t) for t in exclude}
    raw: dict[str, None] = {}
    for path in sorted(locale.glob("*/LC_MESSAGES/*.mo")):
        raw.update(dict.fromkeys(catalog(path)))
    out = []
    for msgid in raw:
        text = clean(msgid, EN_MNEMONIC)
        k = key(text)
        if 2 <= len(text) <= MAX_CHARS and has_words(text) and k and k not in seen:
            seen.add(k)
            out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lang", default="zh_CN")
    ap.add_argument("--out", type=Path, help="write the pairs as JSON lines")
    args = ap.parse_args()
    pairs = extract_pairs(args.lang)
    print(f"{len(pairs)} pairs from {len({p.domain for p in pairs})} catalogs of {args.lang}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(vars(p), ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
