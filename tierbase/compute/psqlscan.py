"""Finding psql meta-commands in a plain pg_dump script before psql runs it.

psql runs a backslash command (``\\!``, ``\\o |cmd``, ``\\copy ... program``, ``\\i FILE``, ``\\;``)
wherever a backslash stands outside a string, a comment or COPY data, as the OS user psql runs as.
An import is data: every meta-command is refused except pg_dump's own ``\\restrict KEY`` /
``\\unrestrict KEY`` lines (which the restore drops: it runs psql restricted with a key of its own).

Written here because nothing fits: pglast (libpg_query) parses server SQL and fails on a
meta-command instead of locating it, and sqlparse knows neither psql's dollar-quote and E''-string
rules nor where the data of ``COPY ... FROM stdin`` begins and ends. What matters is to see string,
comment and COPY-data boundaries where psql's lexer (fe_utils/psqlscan.l) sees them, so the rules
below follow it, including its BEGIN ... END heuristic for SQL-standard function bodies and its
longest-match reading of numbers (``1e5$a$`` is one token, ``1e-`` too); tests/test_psqlscan.py
checks the scanner against psql itself on random fragments. Where the two could still disagree
(a COPY statement of an unusual shape, a setting that changes how psql lexes strings) the scanner
refuses; and psql itself runs restricted, so a disagreement cannot run a command either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UnsafeDump

_TOKEN = re.compile(rb"""
   (?P<ws>[ \t\r\n\f\v]+)
  |(?P<lc>--[^\n]*)
  |(?P<bc>/\*)
  |(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]\d*)?)
  |(?P<ident>[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)
  |(?P<sq>')
  |(?P<dq>")
  |(?P<dolq>\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$)
  |(?P<param>\$\d+)
  |(?P<bs>\\)
  |(?P<ch>.)
""", re.X | re.S)
_IDENT_START = re.compile(rb"[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*")
# The fast path inside a statement whose tokens no longer matter (not COPY, not CREATE FUNCTION):
# skip identifiers (with the `$` they may hold), numbers (with psql's trailing junk) and plain bytes
# in one match, stopping only where a string, comment, dollar quote, backslash, paren or `;` begins.
_SKIP = re.compile(rb"""(?:
    [A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*
  | (?:\d+\.?\d*|\.\d+)(?:[eE][+-]\d+(?:[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)?|[eE][+-]
                            |[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)?
  | [^'"$\\;()/\-A-Za-z0-9_\x80-\xff]
  | /(?!\*) | -(?!-)
)*""", re.X)
_DOLQ = re.compile(rb"\$(?:[A-Za-z_\x80-\xff][A-Za-z0-9_\x80-\xff]*)?\$")
_PARAM = re.compile(rb"\$\d+")
# a quote right after an `E` that follows none of these opens an E'' string (the E is a token of its own)
_NOT_BEFORE_E = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$."
                          + bytes(range(0x80, 0x100)))
_SQ_BODY = re.compile(rb"(?:[^']+|'')*")
_EQ_BODY = re.compile(rb"(?:[^'\\]+|''|\\.)*", re.S)
_DQ_BODY = re.compile(rb'(?:[^"]+|"")*')
_COMMENT_MARK = re.compile(rb"/\*|\*/")
_RESTRICT = re.compile(rb"^\\(?:un)?restrict [0-9A-Za-z]+\r?\n?$")
_COPY_END = (b"\\.\n", b"\\.\r\n", b"\\.")
_COMMAND = re.compile(rb"\\([A-Za-z][A-Za-z0-9_]*|.)", re.S)
# Settings that change how psql itself lexes what follows: pg_dump writes them once, with safe values.
_LEXING_SETTINGS = re.compile(rb"standard_conforming_strings|client_encoding", re.I)
_SAFE_SETTING_LINE = re.compile(
    rb"^SET (?:standard_conforming_strings = on|client_encoding = '(?:UTF8|SQL_ASCII|LATIN[0-9]+|WIN[0-9]+|"
    rb"EUC_[A-Z_]+|ISO_8859_[0-9]+|KOI8[RU]|MULE_INTERNAL)');\r?\n?$", re.I)
_TXN_CONTROL = (b"BEGIN", b"START", b"COMMIT", b"END", b"ROLLBACK", b"ABORT")
#: statements that start with COPY keep this many tokens, enough for a wide column list
_COPY_TOKENS = 20000


@dataclass
class _Statement:
    tokens: list[tuple[str, bytes]] = field(default_factory=list)
    idents: list[str] = field(default_factory=lambda: ["", "", "", ""])
    ident_count: int = 0
    saw_stdin: bool = False

    def add(self, kind: str, value: bytes) -> None:
        is_copy = bool(self.tokens) and self.tokens[0] == ("ident", b"COPY")
        if len(self.tokens) < (_COPY_TOKENS if is_copy or not self.tokens else 8):
            self.tokens.append((kind, value))
        if kind == "ident" and value == b"STDIN":
            self.saw_stdin = True


@dataclass
class Scan:
    """What the restore needs from the scan: the lines to drop (pg_dump's \\restrict / \\unrestrict)."""

    drop_lines: set[int] = field(default_factory=set)
    lines: int = 0


class _Scanner:
    def __init__(self) -> None:
        self.mode = "normal"  # normal | sq | eq | dq | dolq | comment
        self.tag = b""
        self.depth = 0  # comment nesting
        self.paren = 0
        self.begin = 0  # BEGIN ... END depth inside CREATE FUNCTION/PROCEDURE bodies, as psql tracks it
        self.stmt = _Statement()
        self.copies = 0  # COPY ... FROM stdin statements whose data comes next
        self.queued = 0  # ... ended on the current line: their data starts on the next one
        self.lineno = 0
        self.e_end = -1  # where an identifier `E` ended on this line: a quote there opens an E'' string
        self.fast = False  # the current statement's tokens are known enough: skip to what matters

    def scan(self, lines: Iterable[bytes]) -> Scan:
        out = Scan()
        for line in lines:
            self.lineno += 1
            if self.copies:  # COPY data: psql reads it verbatim up to a line of its own `\.`
                if line in _COPY_END:
                    self.copies -= 1
                continue
            if self.mode == "normal" and _RESTRICT.match(line):
                out.drop_lines.add(self.lineno)
                continue
            if _LEXING_SETTINGS.search(line) and not _SAFE_SETTING_LINE.match(line):
                raise UnsafeDump(
                    f"line {self.lineno} of the dump changes standard_conforming_strings or client_encoding",
                    "These settings change how psql reads the rest of the file, so tierbase imports only "
                    "the values pg_dump writes; dump the database again with pg_dump",
                    line=self.lineno)
            self._line(line)
            self.copies += self.queued
            self.queued = 0
        out.lines = self.lineno
        return out

    def _line(self, line: bytes) -> None:
        pos, end = 0, len(line)
        self.e_end = -1
        while pos < end:
            if self.mode == "normal":
                pos = self._fast(line, pos) if self.fast else self._normal(line, pos)
            elif self.mode == "sq":
                pos = self._quoted(line, pos, _SQ_BODY, b"'")
            elif self.mode == "eq":
                pos = self._quoted(line, pos, _EQ_BODY, b"'")
            elif self.mode == "dq":
                pos = self._quoted(line, pos, _DQ_BODY, b'"')
            elif self.mode == "dolq":
                at = line.find(self.tag, pos)
                if at < 0:
                    return
                self.mode, pos = "normal", at + len(self.tag)
            else:
                pos = self._comment(line, pos)

    def _quoted(self, line: bytes, pos: int, body: re.Pattern[bytes], quote: bytes) -> int:
        m = body.match(line, pos)
        stop = m.end() if m else pos
        if line[stop:stop + 1] == quote:
            self.mode = "normal"
            return stop + 1
        return len(line)  # the string goes on on the next line

    def _comment(self, line: bytes, pos: int) -> int:
        for m in _COMMENT_MARK.finditer(line, pos):
            self.depth += 1 if m.group() == b"/*" else -1
            if self.depth == 0:
                self.mode = "normal"
                return m.end()
        return len(line)

    def _normal(self, line: bytes, pos: int) -> int:
        m = _TOKEN.match(line, pos)
        assert m is not None  # the last alternative matches any byte
        kind, text, nxt = m.lastgroup or "ch", m.group(), m.end()
        if kind in ("ws", "lc"):
            return nxt
        if kind == "bc":
            self.mode, self.depth = "comment", 1
        elif kind == "sq":  # E'...' (the E right before the quote) takes backslash escapes
            self.mode = "eq" if self.e_end == pos else "sq"
            self.stmt.add("string", b"")
        elif kind == "dq":
            self.mode = "dq"
            self.stmt.add("qident", b"")
        elif kind == "dolq":
            self.mode, self.tag = "dolq", text
            self.stmt.add("string", b"")
        elif kind == "bs":
            self._refuse(line, pos)
        elif kind == "num":
            # psql (flex: the longest match wins) reads 1e5$a$ and 123abc as one junk token, a number and
            # the identifier after it with its `$`; 1e+5 and 1e+5x as a real (and its junk); 1e- as one
            # bad token, so that 1e--x holds no comment
            junk = _IDENT_START.match(line, nxt) if text[-1:].isdigit() or text[-1:] == b"." else None
            nxt = junk.end() if junk else nxt
            self.stmt.add("num", text)
        elif kind == "ident":
            self._ident(text)
        else:
            self._char(text)
        self.e_end = nxt if kind == "ident" and text in (b"E", b"e") else -1
        self.fast = self.mode == "normal" and self._settled()
        return nxt

    def _settled(self) -> bool:
        """True once nothing more of the statement's tokens is needed (COPY and CREATE FUNCTION /
        PROCEDURE statements are read token by token to their end)."""
        t = self.stmt.tokens
        if not t or t[0] == ("ident", b"COPY") or (t[0] == ("ident", b"PREPARE") and len(t) < 2):
            return False
        if t[0] == ("ident", b"CREATE"):
            ids = self.stmt.idents
            return len(t) >= 4 and not (ids[1] in ("f", "p") or (ids[1] == "o" and ids[2] == "r"))
        return True

    def _fast(self, line: bytes, pos: int) -> int:
        m = _SKIP.match(line, pos)
        pos = m.end() if m else pos
        if pos >= len(line):
            return pos
        c = line[pos:pos + 1]
        if c == b"'":
            escaped = pos >= 1 and line[pos - 1] in b"Ee" and (pos < 2 or line[pos - 2] not in _NOT_BEFORE_E)
            self.mode = "eq" if escaped else "sq"
            return pos + 1
        if c == b'"':
            self.mode = "dq"
            return pos + 1
        if c == b"$":
            d = _DOLQ.match(line, pos)
            if d:
                self.mode, self.tag = "dolq", d.group()
                return d.end()
            p = _PARAM.match(line, pos)
            return p.end() if p else pos + 1
        if c == b"\\":
            self._refuse(line, pos)
        if line.startswith(b"--", pos):
            return len(line)
        if line.startswith(b"/*", pos):
            self.mode, self.depth = "comment", 1
            return pos + 2
        self._char(c)  # ( ) ;
        return pos + 1

    def _ident(self, text: bytes) -> None:
        word = text.upper()
        st = self.stmt
        if st.ident_count < 4 and word in (b"CREATE", b"FUNCTION", b"PROCEDURE", b"OR", b"REPLACE"):
            st.idents[st.ident_count] = chr(word[0]).lower()
        st.ident_count += 1
        ids = st.idents
        routine = ids[0] == "c" and (ids[1] in ("f", "p") or (ids[1] == "o" and ids[2] == "r"
                                                                and ids[3] in ("f", "p")))
        if routine and self.paren == 0:
            if word == b"BEGIN" or (word == b"CASE" and self.begin > 0):
                self.begin += 1
            elif word == b"END" and self.begin > 0:
                self.begin -= 1
        st.add("ident", word)

    def _char(self, ch: bytes) -> None:
        if ch == b"(":
            self.paren += 1
        elif ch == b")":
            self.paren = max(0, self.paren - 1)
        elif ch == b";" and self.paren == 0 and self.begin == 0:
            self._end_statement()
            return
        self.stmt.add("ch", ch)

    def _end_statement(self) -> None:
        st, self.stmt, self.fast = self.stmt, _Statement(), False
        first = st.tokens[0] if st.tokens else ("", b"")
        prepared = first == ("ident", b"PREPARE") and st.tokens[1:2] == [("ident", b"TRANSACTION")]
        if (first[0] == "ident" and first[1] in _TXN_CONTROL) or prepared:
            # psql's --single-transaction is what makes a failed import change nothing: keep it whole
            raise UnsafeDump(
                f"line {self.lineno} of the dump ends or starts a transaction ({first[1].decode(errors='replace')})",
                "tierbase restores a dump in one transaction of its own; remove BEGIN/COMMIT/ROLLBACK statements "
                "(pg_dump writes none)", line=self.lineno)
        if first != ("ident", b"COPY") or not st.saw_stdin:
            return
        if not _copy_from_stdin(st.tokens):
            raise UnsafeDump(
                f"line {self.lineno} of the dump has a COPY statement with STDIN that is not "
                "`COPY table [(columns)] FROM stdin`",
                "tierbase reads COPY data only after that form, as pg_dump writes it; dump the database again "
                "with pg_dump", line=self.lineno)
        self.queued += 1

    def _refuse(self, line: bytes, pos: int) -> None:
        m = _COMMAND.match(line, pos)
        name = m.group(1) if m else b""
        shown = name.decode("ascii") if name.isascii() and name.isalnum() else _show_char(name)
        raise UnsafeDump(
            f"line {self.lineno} of the dump holds the psql meta-command `\\{shown}`; nothing was restored",
            "A dump is imported as data: only SQL statements and COPY ... FROM stdin data may be in it. "
            "Remove the line, or dump again with pg_dump",
            line=self.lineno, command=f"\\{shown}")


def _show_char(name: bytes) -> str:
    """A one-character command (``\\!``) as itself; anything else as a hex escape, never the line's text."""
    if len(name) == 1 and 0x21 <= name[0] < 0x7F:
        return name.decode("ascii")
    return "".join(f"x{b:02x}" for b in name[:1]) or "(end of line)"


def _copy_from_stdin(tokens: list[tuple[str, bytes]]) -> bool:
    """``COPY [BINARY] name[.name...] [(col, ...)] FROM STDIN ...``: the only statement psql follows with data."""
    i = 1
    if tokens[i:i + 1] == [("ident", b"BINARY")]:
        i += 1
    if i >= len(tokens) or tokens[i][0] not in ("ident", "qident"):
        return False
    i += 1
    while tokens[i:i + 1] == [("ch", b".")] and i + 1 < len(tokens) and tokens[i + 1][0] in ("ident", "qident"):
        i += 2
    if tokens[i:i + 1] == [("ch", b"(")]:
        i += 1
        while i < len(tokens) and tokens[i][0] in ("ident", "qident"):
            i += 1
            if tokens[i:i + 1] == [("ch", b",")]:
                i += 1
        if tokens[i:i + 1] != [("ch", b")")]:
            return False
        i += 1
    return tokens[i:i + 2] == [("ident", b"FROM"), ("ident", b"STDIN")]


def scan(lines: Iterable[bytes]) -> Scan:
    """Refuse (UnsafeDump) a plain dump with a psql meta-command; the lines of pg_dump's own
    ``\\restrict`` / ``\\unrestrict`` are returned for the restore to drop."""
    return _Scanner().scan(lines)
