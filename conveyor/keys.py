"""Which keys a run handles (filters) and what they are called on the target (rewriting)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from redis.crc import key_slot

from conveyor.errors import ConfigError

REDIS_TYPES = ("string", "list", "set", "zset", "hash", "stream", "ReJSON-RL", "TSDB-TYPE")
MAX_SLOT = 16383


def glob_to_regex(pattern: bytes) -> re.Pattern[bytes]:
    """Redis glob (``*``, ``?``, ``[a-z]``, ``[^a]``, ``\\x``) as an anchored bytes regex."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i:i + 1]
        if c == b"\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1:i + 2]))
            i += 2
            continue
        if c == b"*":
            out.append(b".*")
        elif c == b"?":
            out.append(b".")
        elif c == b"[":
            j = pattern.find(b"]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                neg = body[:1] == b"^"
                body = body[1:] if neg else body
                out.append(b"[" + (b"^" if neg else b"") + body.replace(b"\\", b"\\\\") + b"]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile(b"".join(out) + b"\\Z", re.DOTALL)


def parse_slots(specs: tuple[str, ...] | list[str]) -> list[tuple[int, int]]:
    """``["0-8000", "9000"]`` or ``["0-100,200-300"]`` -> inclusive ranges; bad input is a ConfigError."""
    ranges = []
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise ConfigError(f"--key-slots {spec!r}: expected ranges like 0-8000,9000")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if lo > hi or hi > MAX_SLOT:
                raise ConfigError(f"--key-slots {part!r}: slots go from 0 to {MAX_SLOT}, low to high")
            ranges.append((lo, hi))
    return ranges


def _compile(pattern: str, what: str) -> re.Pattern[bytes]:
    try:
        return re.compile(pattern.encode("utf-8", "surrogateescape"))
    except re.error as e:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {e}") from e


def _check_replacement(pattern: re.Pattern[bytes], repl: bytes, p: str, r: str) -> None:
    """A replacement that names a group the pattern lacks (or is malformed) fails here, when the
    options are read, not at the first key that matches: it is expanded against a pattern with
    the same groups that matches anything."""
    names = {i: n for n, i in pattern.groupindex.items()}
    shape = b"".join(b"(?P<%s>)" % names[i].encode() if i in names else b"()"
                     for i in range(1, pattern.groups + 1))
    try:
        re.compile(shape).match(b"").expand(repl)
    except (re.error, IndexError) as e:
        raise ConfigError(f"--key-replace '{p}' '{r}': the replacement is not valid for that "
                          f"pattern: {e}") from e


@dataclass
class KeyFilter:
    """Scan pattern and type go to SCAN; regexes and slots are checked here, on the key name."""

    match: str | None = None
    type: str | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._include = [_compile(p, "--key-include") for p in self.include]
        self._exclude = [_compile(p, "--key-exclude") for p in self.exclude]
        self._glob = glob_to_regex(self.match.encode()) if self.match else None

    @property
    def checks_names(self) -> bool:
        return bool(self._include or self._exclude or self.slots)

    def scan_args(self) -> dict:
        args: dict = {}
        if self.match:
            args["match"] = self.match
        if self.type:
            args["_type"] = self.type
        return args

    def accepts_name(self, key: bytes, *, check_glob: bool = False) -> bool:
        """Include/exclude regexes and slots (the glob too when ``check_glob``: keys not from SCAN)."""
        if check_glob and self._glob is not None and not self._glob.match(key):
            return False
        if self._include and not any(p.search(key) for p in self._include):
            return False
        if any(p.search(key) for p in self._exclude):
            return False
        if self.slots:
            s = key_slot(key)
            return any(lo <= s <= hi for lo, hi in self.slots)
        return True

    def select(self, keys: list[bytes]) -> list[bytes]:
        if not self.checks_names:
            return keys
        return [k for k in keys if self.accepts_name(k)]


@dataclass
class KeyRewriter:
    """Target name of a source key: regex substitutions in order, then a prefix."""

    prefix: str = ""
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._prefix = self.prefix.encode("utf-8", "surrogateescape")
        self._subs = [(_compile(p, "--key-replace"), r.encode("utf-8", "surrogateescape"))
                      for p, r in self.replacements]
        for (pattern, repl), (p, r) in zip(self._subs, self.replacements):
            _check_replacement(pattern, repl, p, r)

    @property
    def identity(self) -> bool:
        return not self._prefix and not self._subs

    @property
    def invertible(self) -> bool:
        return not self._subs

    def __call__(self, key: bytes) -> bytes:
        for pattern, repl in self._subs:
            key = pattern.sub(repl, key)
        return self._prefix + key

    def inverse(self, key: bytes) -> bytes | None:
        """Source name of a target key when the rewrite is a bare prefix; None if ``key`` is not ours."""
        if self._subs:
            raise ValueError("a regex rewrite cannot be inverted")
        if not key.startswith(self._prefix):
            return None
        return key[len(self._prefix):]


_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r",
            ord("\t"): "\\t", 7: "\\a", 8: "\\b"}


def quoted(key: bytes) -> str:
    """A key as redis-cli prints it: in double quotes, printable ASCII as is, the rest escaped."""
    return '"' + "".join(_ESCAPES.get(b) or (chr(b) if 32 <= b < 127 else f"\\x{b:02x}")
                         for b in key) + '"'
