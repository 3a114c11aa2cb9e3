"""Progressive JPEGs cut down to what a 1/8-scale decode reads.

A JPEG decoded at 1/8 scale (draft mode) turns each 8x8 block into one pixel from its DC coefficient alone. A baseline
JPEG interleaves DC and AC in one scan, so libjpeg must entropy-decode every coefficient anyway; a progressive JPEG
keeps them in separate scans, and its AC scans, 80-90% of the file, are decoded only to be thrown away. Dropping them
is not enough: libjpeg then "smooths" the blocks whose AC it never saw, and that moves the DC-only picture too. So the
AC scans are replaced by one tiny scan per component saying, with end-of-band runs, that every AC coefficient is zero:
the picture libjpeg produces at 1/8 scale is then bit-identical to that of the whole file, at a third of the time.

Not every component is read from its DC alone: libjpeg scales a subsampled component up by the IDCT rather than by
upsampling where it can (jdmaster.c), so at 1/8 the chroma of a 4:2:0 JPEG comes out of a 2x2 IDCT that reads AC
coefficients. Such a component keeps its AC scans; the tests hold every layout to bit-identity with the whole file.
"""

from __future__ import annotations

import re
import struct

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_SOF_PROGRESSIVE_HUFFMAN = 0xC2
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (C4 DHT, C8 JPG, CC DAC are not)
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # what ends a scan's entropy-coded data (RSTn sit inside it)
_MAX_EOB_RUN = 32767  # the longest end-of-band run one code can state (EOB14 plus 14 bits)

# An AC Huffman table for table slot 0 holding the fifteen end-of-band-run symbols EOB0..EOB14 (0x00, 0x10, ... 0xE0),
# each with a 4-bit code equal to its run class; 1111 stays unused, as JPEG requires of an all-ones code.
_EOB_TABLE = bytes([0x10]) + bytes([0, 0, 0, 15] + [0] * 12) + bytes(n << 4 for n in range(15))
_DHT_EOB = b"\xff\xc4" + struct.pack(">H", 2 + len(_EOB_TABLE)) + _EOB_TABLE
_DRI_NONE = b"\xff\xdd\x00\x04\x00\x00"  # the synthetic scans carry no restart markers


def dc_only(data: bytes) -> bytes | None:
    """``data`` (a whole progressive Huffman JPEG) with its AC scans replaced by all-zero ones, or None for anything
    else, or for a file this parser is not sure of (truncated, no EOI, unknown layout): the caller then decodes the
    original, so an odd file is never read differently from before, only no faster."""
    if not data.startswith(b"\xff\xd8"):
        return None
    kept = [data[:2]]
    components: list[tuple[int, int, int]] | None = None  # (id, h, v) from the frame header
    size = (0, 0)
    reads_ac: set[int] = set()
    pos, end = 2, len(data)
    while True:
        if pos + 2 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE or marker == _SOI:
            return None
        if pos + 4 > end:
            return None
        seg_end = pos + 2 + struct.unpack_from(">H", data, pos + 2)[0]
        if seg_end > end:
            return None
        if marker in _SOF:
            if marker != _SOF_PROGRESSIVE_HUFFMAN or components is not None:
                return None
            frame = _frame(data[pos + 4:seg_end])
            if frame is None:
                return None
            components, size = frame
            reads_ac = _ac_read(components)
        if marker != _SOS:
            kept.append(data[pos:seg_end])
            pos = seg_end
            continue
        if components is None:
            return None
        found = _NEXT_MARKER.search(data, seg_end)
        if found is None:  # entropy data runs off the end: truncated
            return None
        ns = data[pos + 4]
        if pos + 5 + 2 * ns >= seg_end:
            return None
        ss = data[pos + 5 + 2 * ns]
        if ss == 0 or data[pos + 5] in reads_ac:  # DC, or AC the 1/8-scale picture reads
            kept.append(data[pos:found.start()])
        pos = found.start()
    if components is None:
        return None
    kept += [_DHT_EOB, _DRI_NONE]
    kept += [_zero_ac_scan(cid, _blocks(size, h, v, components))
             for cid, h, v in components if cid not in reads_ac]
    kept.append(b"\xff\xd9")
    return b"".join(kept)


def _frame(header: bytes) -> tuple[list[tuple[int, int, int]], tuple[int, int]] | None:
    """Components (id, h, v) and (width, height) of a frame header's body, or None when it does not add up."""
    if len(header) < 6:
        return None
    height, width, count = struct.unpack_from(">HHB", header, 1)
    if len(header) != 6 + 3 * count or not count or not width or not height:
        return None
    comps = [(header[6 + 3 * i], header[7 + 3 * i] >> 4, header[7 + 3 * i] & 15) for i in range(count)]
    if any(not 1 <= h <= 4 or not 1 <= v <= 4 for _, h, v in comps):
        return None
    return comps, (width, height)


def _ac_read(components: list[tuple[int, int, int]]) -> set[int]:
    """Ids of the components whose 1/8-scale IDCT is larger than 1x1, so reads AC: libjpeg doubles a component's IDCT
    size while its sampling factors leave room for it in both directions (jpeg_core_output_dimensions)."""
    hmax = max(c[1] for c in components)
    vmax = max(c[2] for c in components)
    return {cid for cid, h, v in components if hmax % (2 * h) == 0 and vmax % (2 * v) == 0}


def _blocks(size: tuple[int, int], h: int, v: int, components: list[tuple[int, int, int]]) -> int:
    """8x8 blocks of one component in a non-interleaved scan: its own sampled size, not padded to whole MCUs."""
    width, height = size
    hmax = max(c[1] for c in components)
    vmax = max(c[2] for c in components)
    cols = -(-width * h // hmax)
    rows = -(-height * v // vmax)
    return -(-cols // 8) * -(-rows // 8)


def _zero_ac_scan(component: int, blocks: int) -> bytes:
    """A first AC scan (coefficients 1-63, full precision) of one component in which every block ends at once."""
    bits: list[str] = []
    while blocks:
        run = min(blocks, _MAX_EOB_RUN)
        n = run.bit_length() - 1
        bits.append(format(n, "04b") + (format(run - (1 << n), f"0{n}b") if n else ""))
        blocks -= run
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad the last byte with 1s
    coded = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")
    header = bytes([1, component, 0x00, 1, 63, 0x00])  # one component, tables 0/0, Ss=1, Se=63, Ah=Al=0
    return b"\xff\xda" + struct.pack(">H", 2 + len(header)) + header + coded
