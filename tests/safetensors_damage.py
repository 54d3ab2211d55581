"""Real damage to real safetensors files, as downloads, disks and interrupted writes cause it.

Each kind maps to the word an error about it must use: `truncated` (bytes missing at the end) or `corrupt` (bytes
that are there but wrong).
"""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path

DAMAGES = {
    "random_bytes": "corrupt",  # a file overwritten with noise (or not a safetensors file at all)
    "truncated_data": "truncated",  # an interrupted download or copy: the tensor bytes stop halfway
    "truncated_header": "truncated",  # cut so early that the JSON header itself is incomplete
    "flipped_header_bytes": "corrupt",  # bit rot in the header: bytes that are no longer UTF-8
    "broken_header_json": "corrupt",  # valid UTF-8 that is no longer JSON
    "huge_header_length": "corrupt",  # the 8-byte header length field damaged
    "shifted_offsets": "corrupt",  # the header parses, but one tensor's byte range no longer fits its shape
}


def damage_safetensors(path: Path, kind: str) -> None:
    """Damage the safetensors file at `path` in place (deterministically), in the way `kind` names."""
    data = bytearray(path.read_bytes())
    (header_length,) = struct.unpack("<Q", data[:8])
    if kind == "random_bytes":
        data = bytearray(random.Random(0).randbytes(len(data)))
    elif kind == "truncated_data":
        data = data[: 8 + header_length + (len(data) - 8 - header_length) // 2]
    elif kind == "truncated_header":
        data = data[: 8 + header_length // 2]
    elif kind == "flipped_header_bytes":
        middle = 8 + header_length // 2
        for position in range(middle, middle + 4):
            data[position] ^= 0xFF
    elif kind == "broken_header_json":
        assert data[8:9] == b"{"
        data[8] ^= 0x01  # '{' -> 'z'
    elif kind == "huge_header_length":
        data[:8] = struct.pack("<Q", 2**62)
    elif kind == "shifted_offsets":
        header = data[8 : 8 + header_length].decode("utf-8")
        match = re.search(r'"data_offsets":\[\d+,(\d+)\]', header)
        digits = match.group(1)
        changed = digits[:-1] + str((int(digits[-1]) + 1) % 10)  # same length, so the header length still holds
        header = header[: match.start(1)] + changed + header[match.end(1) :]
        data[8 : 8 + header_length] = header.encode("utf-8")
    else:
        raise ValueError(f"unknown damage {kind!r}; use one of {sorted(DAMAGES)}")
    path.write_bytes(bytes(data))
