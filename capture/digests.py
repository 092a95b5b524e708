"""Digests of keys as the source holds them now, read without moving their values.

A rescan (a gap healed, a restarted capture) first reads digests only and compares them with the
key ledger (capture/ledger.py); values are read and logged only for the keys whose digest changed.
A digest is the CRC-64 that ends a key's DUMP payload plus its absolute expiry. On a source that
runs scripts, one script per batch computes them server side (the payloads never cross the
network); otherwise a pipeline of DUMP + expiry does, the CRC cut out here. A key above the
big-key threshold gets UNKNOWN (never DUMPed whole: it is read again in parts), a key gone meanwhile
gets UNKNOWN too (read again, it becomes a delete).
"""
from __future__ import annotations

import logging
from array import array

import redis

from conveyor import packed
from conveyor.capture.ledger_files import NO_EXPIRY, UNKNOWN, UNKNOWN_CRC
from conveyor.endpoints import ServerInfo
from conveyor.events import now_millis

log = logging.getLogger("conveyor.capture")

# Per key: the payload's last 8 bytes (false: none, a big or gone key) and the expiry.
DIGEST_SCRIPT = r"""
local big, exp = tonumber(ARGV[1]), ARGV[2]
local out = {}
for _, k in ipairs(KEYS) do
  local m = big > 0 and redis.call('MEMORY', 'USAGE', k) or 0
  if m and m <= big or big == 0 then
    local p = redis.call('DUMP', k)
    if p then
      out[#out + 1] = string.sub(p, -8); out[#out + 1] = redis.call(exp, k)
    else
      out[#out + 1] = false; out[#out + 1] = -2
    end
  else
    out[#out + 1] = false; out[#out + 1] = -2
  end
end
return out
"""


class DigestReader:
    """Reads the digests of batches of keys from one source (``read``)."""

    def __init__(self, source, info: ServerInfo, big_key_bytes: int | None) -> None:
        self.source, self.info = source, info
        self.big = big_key_bytes or 0
        self.expiry = "PEXPIRETIME" if info.has_pexpiretime else "PTTL"
        # A self-routing source (a cluster) has no single script cache: pipelines there.
        self._script: bool | None = None if isinstance(source, redis.Redis) else False
        self._sha = ""

    def forget_script(self) -> None:
        """The source restarted (NOSCRIPT): load the script again at the next read."""
        if self._script:
            self._script = None

    def read(self, keys: list[bytes]) -> tuple[bytes, bytes]:
        """(crcs, expiries) of ``keys``: 8 bytes a key each, as capture/ledger.py keeps them."""
        read_ms = now_millis()
        reply = self._scripted(keys) if self._script is not False else None
        if reply is None:
            reply = self._pipelined(keys)
        crcs, exps = [], array("q")
        relative = not self.info.has_pexpiretime
        for i in range(len(keys)):
            crc, ttl = reply[2 * i], reply[2 * i + 1]
            if not crc or ttl == -2:
                crcs.append(UNKNOWN_CRC)
                exps.append(UNKNOWN)
            else:
                crcs.append(crc)
                exps.append(NO_EXPIRY if ttl < 0 else read_ms + ttl if relative else ttl)
        return b"".join(crcs), exps.tobytes()

    def _scripted(self, keys: list[bytes]) -> list | None:
        try:
            if self._script is None:
                body = ("#!lua flags=no-writes\n" + DIGEST_SCRIPT if self.info.version >= (7, 0)
                        else DIGEST_SCRIPT)
                self._sha = self.source.script_load(body)
            (reply,) = packed.run(self.source, [("EVALSHA", self._sha, len(keys), *keys,
                                                 self.big, self.expiry)])
            if isinstance(reply, Exception):
                raise reply
            self._script = True
            return reply
        except redis.ResponseError as e:
            if self._script and (isinstance(e, redis.exceptions.NoScriptError)
                                 or "NOSCRIPT" in str(e).upper()):
                self._script = None
                return self._scripted(keys)
            if self._script is None:
                log.debug("the source does not run the digest script (%s); reading DUMPs", e)
                self._script = False
                return None
            raise

    def _pipelined(self, keys: list[bytes]) -> list:
        commands: list[tuple] = []
        for key in keys:
            commands.append(("DUMP", key))
            commands.append((self.expiry, key))
        replies = packed.run(self.source, commands)
        out: list = []
        for i in range(len(keys)):
            payload, ttl = replies[2 * i], replies[2 * i + 1]
            if isinstance(payload, Exception) or isinstance(ttl, Exception):
                raise payload if isinstance(payload, Exception) else ttl
            too_big = self.big and payload is not None and len(payload) > self.big
            out.append(None if payload is None or too_big else payload[-8:])
            out.append(ttl)
        return out
