"""The compact encoding of a teacher-logits cache (format version 2): adaptive k, quantised log-probs, Elias-Fano ids.

Pure numpy, vectorised over every position of a batch of rows; the writer encodes, the reader's `collate` decodes
(in the DataLoader's workers when it has any, so off the training step). What one row stores, for `P` positions:

- `teacher_topk_counts` (`P` values, uint8 or uint16): `n`, the entries kept at each position: the fewest of the
  teacher's top `top_k` whose probability reaches `top_p`. Entries a row source marks missing (log-prob `-inf`) are
  never kept.
- `teacher_topk_top_logprob`, `teacher_topk_logprob_scale` (`P` float16 each; 4- and 8-bit codes only): the
  position's largest kept log-prob `t` and a step `s`.
- `teacher_topk_codes` (bytes): per kept entry, in increasing id order, a `b`-bit code `c` with stored log-prob
  `t - c * s` (float32 arithmetic), `c = ceil((t - logprob) / s)`, bumped where float32 rounding would land above
  the input: every stored log-prob is <= the row source's (itself rounded toward -inf), so the stored mass never
  exceeds the teacher's and the derived tail is never negative. The error bound: `0 <= logprob - stored < s`, with
  `s <= (t - smallest kept) / (2**b - 2)` rounded up to float16. With `b = 16` the codes are the float16 values
  themselves (no top or scale).
- `teacher_topk_id_low_bits`, `teacher_topk_id_high_bits` (bytes): the kept ids, sorted, as an Elias-Fano code
  over the vocabulary `U`: with `l = floor(log2(U / n))`, each id's low `l` bits are packed as they are, its high
  part `id >> l` in unary (a one at `high + rank`), about `l + 2` bits per id where uint16 takes 16.

Every byte stream is byte-aligned per row, so a row decodes on its own.

The sampled encoding (format version 3) stores the same columns without the top and scale: per position,
`sample_draws` (`N`) tokens are drawn from the teacher (`sampling.py`: an in-process teacher's whole vocabulary, a
served teacher's top-k and the mass outside it), the distinct drawn ids are kept (Elias-Fano, as above) and, per
kept id, its draw count `c` as the code `c - 1` in `bit_length(N - 1)` bits; the stored log-prob is `log(c / N)`.
The stored probabilities are an unbiased estimate of the teacher's (`E[c / N] = p`), so the forward-KL gradient a
student gets from them is unbiased too; draws outside a served teacher's top-k are the derived tail's mass. Unlike
the compact encoding, a single stored probability may exceed the teacher's (it is an estimate); all of them plus
the tail sum to 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .sampling import draw_counts

# `format.PAD_LOGPROB`: at or below it an entry holds no mass (format.py imports this module, so it is repeated here)
_NO_MASS_LOGPROB = -1.0e4

COUNTS_COLUMN = "teacher_topk_counts"
TOP_COLUMN = "teacher_topk_top_logprob"
SCALE_COLUMN = "teacher_topk_logprob_scale"
CODES_COLUMN = "teacher_topk_codes"
LOW_BITS_COLUMN = "teacher_topk_id_low_bits"
HIGH_BITS_COLUMN = "teacher_topk_id_high_bits"
LOGPROB_BITS = (4, 6, 8, 16)


def compact_columns(logprob_bits: int | None, sample_draws: int | None = None) -> tuple[str, ...]:
    """The stored columns of a format-2 cache (or, with `sample_draws`, a sampled format-3 one), in order."""
    scaled = (TOP_COLUMN, SCALE_COLUMN) if logprob_bits != 16 and sample_draws is None else ()
    return (COUNTS_COLUMN, *scaled, CODES_COLUMN, LOW_BITS_COLUMN, HIGH_BITS_COLUMN)


def max_entries(top_k: int, sample_draws: int | None) -> int:
    """The most entries a position keeps: `top_k`, or for a sampled cache `sample_draws` (an in-process teacher's
    draws come from its whole vocabulary)."""
    return int(top_k) if sample_draws is None else int(sample_draws)


def counts_dtype(top_k: int) -> np.dtype:
    return np.dtype(np.uint8) if top_k <= 255 else np.dtype(np.uint16)


def count_code_bits(sample_draws: int) -> int:
    """Bits of a sampled cache's count code `c - 1` (`1 <= c <= sample_draws`)."""
    return max(1, (int(sample_draws) - 1).bit_length())


def count_logprobs(sample_draws: int) -> np.ndarray:
    """`log(c / sample_draws)` for the codes `c - 1 = 0 .. 2**bits - 1` (float32; codes past `sample_draws`, which
    no writer produces, map to 0, and `decode_dense` refuses them)."""
    counts = np.arange(1, 2 ** count_code_bits(sample_draws) + 1, dtype=np.float64)
    return np.log(np.minimum(counts, sample_draws) / sample_draws).astype(np.float32)


class DamagedCacheError(ValueError):
    """An encoded row does not decode (its streams disagree with its counts)."""


# --------------------------------------------------------------------------------------------------------------
# bit packing with per-value widths (<= 25 bits), rows byte-aligned
# --------------------------------------------------------------------------------------------------------------


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.shape[0] + 1, dtype=np.int64)
    np.cumsum(values, out=out[1:])
    return out


def _row_aligned_offsets(widths: np.ndarray, values_per_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit offset of every value, each row's stream starting on a byte; and each row's byte offsets `(rows + 1,)`."""
    widths = widths.astype(np.int64, copy=False)
    value_starts = _exclusive_cumsum(values_per_row)
    bit_cumsum = _exclusive_cumsum(widths)
    row_bits = bit_cumsum[value_starts[1:]] - bit_cumsum[value_starts[:-1]]
    row_byte_offsets = _exclusive_cumsum((row_bits + 7) // 8)
    row_of_value = np.repeat(np.arange(values_per_row.shape[0]), values_per_row)
    offsets = row_byte_offsets[row_of_value] * 8 + (bit_cumsum[:-1] - bit_cumsum[value_starts[row_of_value]])
    return offsets, row_byte_offsets


def _pack(values: np.ndarray, widths: np.ndarray, offsets: np.ndarray, num_bytes: int) -> np.ndarray:
    """Write `values` (each < 2**width) at bit `offsets` (little-endian bit order) into `num_bytes` bytes."""
    if values.size == 0:
        return np.zeros(num_bytes, dtype=np.uint8)
    shifted = values.astype(np.uint64) << (offsets & 7).astype(np.uint64)
    first_byte = offsets >> 3
    lanes = (int(widths.max()) + 7 + 7) // 8
    total = np.zeros(num_bytes + lanes, dtype=np.float64)
    for lane in range(lanes):
        # the values' bits never overlap, so a sum of bytes is their bitwise or
        lane_bytes = ((shifted >> np.uint64(8 * lane)) & np.uint64(255)).astype(np.float64)
        total += np.bincount(first_byte + lane, weights=lane_bytes, minlength=num_bytes + lanes)
    return total[:num_bytes].astype(np.uint8)


def _unpack(buffer: np.ndarray, widths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Read the values `_pack` wrote: int64, one per offset."""
    if offsets.size == 0:
        return np.zeros(0, dtype=np.int64)
    padded = np.concatenate([buffer, np.zeros(4, dtype=np.uint8)])
    first_byte = offsets >> 3
    word = padded[first_byte].astype(np.int64)
    for lane in (1, 2, 3):
        word |= padded[first_byte + lane].astype(np.int64) << (8 * lane)
    return (word >> (offsets & 7)) & ((np.int64(1) << widths.astype(np.int64)) - 1)


# --------------------------------------------------------------------------------------------------------------
# encoding (writer)
# --------------------------------------------------------------------------------------------------------------


def kept_counts(logprobs: np.ndarray, top_p: float | None) -> np.ndarray:
    """Per position, how many of its entries (sorted by decreasing log-prob, `-inf` last) to keep.

    The fewest whose probability reaches `top_p` (all finite ones for `None`); at least one when one is finite.
    """
    finite = np.isfinite(logprobs).sum(-1)
    if top_p is None or top_p >= 1:
        return finite
    mass = np.cumsum(np.exp(logprobs.astype(np.float64)), axis=-1)
    reached = (mass < top_p).sum(-1) + 1
    return np.minimum(reached, finite)


def _float16_up(values: np.ndarray) -> np.ndarray:
    """`values` (>= 0) as float16, rounded toward +inf."""
    half = values.astype(np.float16)
    low = half.astype(np.float64) < values
    return np.where(low, np.nextafter(half, np.float16(np.inf)), half).astype(np.float16)


def encode_rows(
    rows: list[tuple[Any, Any]],
    top_p: float | None,
    logprob_bits: int | None,
    vocab_size: int,
    top_k: int,
    sample_draws: int | None = None,
    sample_seed: int = 0,
    first_row: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Encode rows `(ids (P, k), logprobs (P, k) float16 <= 0, -inf = missing)`.

    With `sample_draws`, the sampled encoding (`top_p` and `logprob_bits` unused): rows of log-probs are drawn from
    (`sampling.draw_counts`; `first_row` is the index of `rows[0]` in the cache, which seeds its draws with
    `sample_seed`), and rows `(ids (P, w), counts (P, w) integer)` are already drawn (`sampling.draw_from_logits`:
    the ids with a count > 0 are kept, each with its count). Returns, per stored column, `(row offsets (rows + 1,)
    int64, flat values)`.
    """
    positions_per_row = np.asarray([ids.shape[0] for ids, _ in rows], dtype=np.int64)
    width = max(ids.shape[1] for ids, _ in rows)
    predrawn = sample_draws is not None and np.issubdtype(np.asarray(rows[0][1]).dtype, np.integer)
    ids = np.zeros((int(positions_per_row.sum()), width), dtype=np.int64)
    values = np.zeros(ids.shape, dtype=np.int64) if predrawn else np.full(ids.shape, -np.inf, dtype=np.float16)
    start = 0
    for row_ids, row_values in rows:
        ids[start : start + row_ids.shape[0], : row_ids.shape[1]] = row_ids
        values[start : start + row_ids.shape[0], : row_ids.shape[1]] = row_values
        start += row_ids.shape[0]
    draws = None
    if predrawn:
        draws, logprobs = values, None
        if (draws < 0).any() or (draws.sum(-1) > sample_draws).any():
            raise ValueError(f"a row source gave draw counts that are negative or sum to more than {sample_draws}.")
    else:
        # a NaN is no probability either, nor an entry at PAD_LOGPROB (-1e4: a served teacher's unfilled slot)
        logprobs = np.where(np.isnan(values) | (values <= _NO_MASS_LOGPROB), np.float16(-np.inf), values)
        # decreasing log-prob (the order top-p counts in), missing entries last
        order = np.argsort(-logprobs.astype(np.float32), axis=-1, kind="stable")
        logprobs = np.take_along_axis(logprobs, order, axis=-1)
        ids = np.take_along_axis(ids, order, axis=-1)
        if sample_draws is None:
            counts = kept_counts(logprobs, top_p)
            kept = np.arange(width)[None, :] < counts[:, None]
        else:
            draws = draw_counts(logprobs, positions_per_row, sample_draws, sample_seed, first_row)
    if draws is not None:  # the drawn ids, each with its count
        kept = draws > 0
        counts = kept.sum(-1)
    if kept.any() and int(ids[kept].max()) >= vocab_size:
        raise ValueError(f"a row source gave token id {int(ids[kept].max())} >= vocab_size {vocab_size}.")
    # kept entries in increasing id order (what the Elias-Fano code needs); the rest after them
    sort_key = np.where(kept, ids, np.iinfo(np.int64).max)
    order = np.argsort(sort_key, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1)
    kept = np.arange(width)[None, :] < counts[:, None]
    if draws is not None:
        draws = np.take_along_axis(draws, order, axis=-1)
    else:
        logprobs = np.take_along_axis(logprobs, order, axis=-1)
    if kept.any() and (np.diff(np.where(kept, ids, vocab_size + np.arange(width)), axis=-1) == 0).any():
        raise ValueError("a row source gave the same token id twice at one position; ids must be distinct.")

    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    position_offsets = _exclusive_cumsum(positions_per_row)
    columns[COUNTS_COLUMN] = (position_offsets, counts.astype(counts_dtype(max_entries(top_k, sample_draws))))
    entry_starts = _exclusive_cumsum(counts)
    entries_per_row = entry_starts[position_offsets[1:]] - entry_starts[position_offsets[:-1]]
    flat_ids = ids[kept]
    position_of_entry = np.repeat(np.arange(counts.shape[0]), counts)

    # ---- log-probs ----
    if draws is not None:  # draw counts c as codes c - 1
        code = draws[kept] - 1
        widths = np.full(code.shape[0], count_code_bits(sample_draws), dtype=np.int64)
        offsets, row_bytes = _row_aligned_offsets(widths, entries_per_row)
        columns[CODES_COLUMN] = (row_bytes, _pack(code, widths, offsets, int(row_bytes[-1])))
    elif logprob_bits == 16:
        codes = logprobs[kept].astype(np.float16).view(np.uint8)
        columns[CODES_COLUMN] = (_exclusive_cumsum(entries_per_row * 2), codes)
    else:
        with np.errstate(invalid="ignore"):
            top = np.where(kept, logprobs, -np.inf).max(-1).astype(np.float16)
            smallest = np.where(kept, logprobs, np.inf).min(-1).astype(np.float64)
        top = np.where(counts > 0, top, np.float16(0))
        smallest = np.where(counts > 0, smallest, 0.0)
        levels = 2**logprob_bits - 1
        # one code to spare for the bump below, so the smallest kept value always has a code
        scale = _float16_up((top.astype(np.float64) - smallest) / (levels - 1))
        top32, scale32 = top.astype(np.float32)[position_of_entry], scale.astype(np.float32)[position_of_entry]
        target = logprobs[kept].astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.ceil((top32.astype(np.float64) - target.astype(np.float64)) / scale32.astype(np.float64))
        code = np.where(scale32 > 0, raw, 0.0).clip(0, levels).astype(np.int64)
        for _ in range(2):  # decode exactly as the reader does (float32), step down where it lands above
            above = (top32 - code.astype(np.float32) * scale32) > target
            if not above.any():
                break
            code = np.where(above, code + 1, code)
        if (code > levels).any() or ((top32 - code.astype(np.float32) * scale32) > target).any():
            raise AssertionError("log-prob quantisation could not round down; please report this bug.")
        columns[TOP_COLUMN] = (position_offsets, top)
        columns[SCALE_COLUMN] = (position_offsets, scale)
        widths = np.full(code.shape[0], logprob_bits, dtype=np.int64)
        offsets, row_bytes = _row_aligned_offsets(widths, entries_per_row)
        columns[CODES_COLUMN] = (row_bytes, _pack(code, widths, offsets, int(row_bytes[-1])))

    # ---- ids: Elias-Fano per position ----
    low_width = _low_width(counts, vocab_size)
    entry_low_width = low_width[position_of_entry]
    low = flat_ids & ((np.int64(1) << entry_low_width) - 1)
    offsets, row_bytes = _row_aligned_offsets(entry_low_width, entries_per_row)
    columns[LOW_BITS_COLUMN] = (row_bytes, _pack(low, entry_low_width, offsets, int(row_bytes[-1])))
    high = flat_ids >> entry_low_width
    rank = np.arange(flat_ids.shape[0]) - entry_starts[position_of_entry]
    # segment of a position: bits 0 .. high of its last id + n - 1 (its last one); segments follow each other
    last_high = np.zeros(counts.shape[0], dtype=np.int64)
    has_entries = counts > 0
    last_high[has_entries] = high[entry_starts[1:][has_entries] - 1]
    segment_bits = np.where(has_entries, last_high + counts, 0)
    segment_offsets, row_bytes = _row_aligned_offsets(segment_bits, positions_per_row)
    bits = np.zeros(int(row_bytes[-1]) * 8, dtype=np.uint8)
    bits[segment_offsets[position_of_entry] + high + rank] = 1
    columns[HIGH_BITS_COLUMN] = (row_bytes, np.packbits(bits, bitorder="little"))
    return columns


def _low_width(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Elias-Fano low bits per position: `floor(log2(vocab_size / n))` (0 for an empty position)."""
    quotient = vocab_size // np.maximum(counts.astype(np.int64), 1)
    return np.where(counts > 0, np.frexp(quotient.astype(np.float64))[1] - 1, 0).astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# decoding (reader)
# --------------------------------------------------------------------------------------------------------------


def decode_dense(
    columns: dict[str, tuple[np.ndarray, np.ndarray]],
    logprob_bits: int | None,
    vocab_size: int,
    width: int | None = None,
    fill_logprob: float = -np.inf,
    sample_draws: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode rows encoded by :func:`encode_rows` (per column: row offsets `(rows + 1,)` and flat values; for a
    sampled cache `sample_draws` and no `logprob_bits`).

    Returns `(counts (P,) int64, ids (P, width) int64, logprobs (P, width) float32)` for the `P` positions of the
    rows, one after the other. Position `p`'s kept entries come first, in increasing id order; its other slots
    repeat its first id (a token already among its entries, so no loss counts a token twice) with `fill_logprob`
    (no mass). `width` defaults to the largest count. Every pass is vectorised over all entries at once.
    """
    position_offsets, counts = columns[COUNTS_COLUMN]
    counts = counts.astype(np.int64)
    num_positions = counts.shape[0]
    positions_per_row = np.diff(position_offsets)
    width = int(counts.max(initial=1)) if width is None else width
    if num_positions and int(counts.max()) > width:
        raise DamagedCacheError(f"a position keeps {int(counts.max())} entries, more than the cache's top_k {width}")
    entry_starts = _exclusive_cumsum(counts)
    num_entries = int(entry_starts[-1])
    entries_per_row = entry_starts[position_offsets[1:]] - entry_starts[position_offsets[:-1]]
    row_of_position = np.repeat(np.arange(positions_per_row.shape[0]), positions_per_row)
    entry_index = np.arange(num_entries, dtype=np.int64)

    # ---- ids: low bits at a constant width per position, rows byte-aligned ----
    low_width = _low_width(counts, vocab_size)
    position_bits = low_width * counts
    bit_cumsum = _exclusive_cumsum(position_bits)
    row_first_position = position_offsets[:-1]
    row_bits = bit_cumsum[position_offsets[1:]] - bit_cumsum[row_first_position]
    row_bytes = _exclusive_cumsum((row_bits + 7) // 8)
    low_offsets, low_bytes = columns[LOW_BITS_COLUMN]
    low_bytes = low_bytes.astype(np.uint8, copy=False)  # an empty row may come as another dtype
    if not np.array_equal(np.diff(low_offsets), np.diff(row_bytes)):
        raise DamagedCacheError("the id low-bits stream has another length than the counts give")
    position_bit_start = (
        row_bytes[row_of_position] * 8 + bit_cumsum[:-1] - bit_cumsum[row_first_position][row_of_position]
    )
    # bit offset of entry e (rank r in position p): start(p) + r * l(p) = (start(p) - first(p) * l(p)) + e * l(p)
    entry_low_width = np.repeat(low_width, counts)  # a repeat reads sequentially: faster than a gather
    base = position_bit_start - entry_starts[:-1] * low_width
    bit_offsets = np.repeat(base, counts) + entry_index * entry_low_width
    low = _unpack_short(low_bytes, bit_offsets, entry_low_width)

    # ---- ids: high parts in unary; entry e's one sits at segment start(p) + high + rank ----
    high_offsets, high_bytes = columns[HIGH_BITS_COLUMN]
    high_bytes = high_bytes.astype(np.uint8, copy=False)
    ones = np.flatnonzero(np.unpackbits(high_bytes, bitorder="little").view(bool))
    if ones.shape[0] != num_entries:
        raise DamagedCacheError(f"the id high-bits stream holds {ones.shape[0]} ids, the counts {num_entries}")
    row_first_entry = entry_starts[row_first_position][row_of_position]
    previous_one = ones[np.maximum(entry_starts[:-1] - 1, 0)] + 1 if num_entries else entry_starts[:-1]
    segment_start = np.where(entry_starts[:-1] > row_first_entry, previous_one, high_offsets[:-1][row_of_position] * 8)
    high = ones - entry_index - np.repeat(segment_start - entry_starts[:-1], counts)
    ids = (high << entry_low_width) | low
    if num_entries and (int(high.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DamagedCacheError(f"decoded token ids fall outside [0, {vocab_size})")

    # ---- log-probs ----
    code_offsets, codes = columns[CODES_COLUMN]
    codes = codes.astype(np.uint8, copy=False)
    if sample_draws is not None:
        bits = count_code_bits(sample_draws)
        if not np.array_equal(np.diff(code_offsets), (entries_per_row * bits + 7) // 8):
            raise DamagedCacheError("the draw-count code stream has another length than the counts give")
        code = _unpack_codes(codes, code_offsets, entry_starts, row_first_position, row_of_position, counts, bits)
        if num_entries and int(code.max()) >= sample_draws:
            raise DamagedCacheError(f"a draw count exceeds the cache's sample_draws {sample_draws}")
        logprobs = count_logprobs(sample_draws)[code]
    elif logprob_bits == 16:
        if not np.array_equal(np.diff(code_offsets), 2 * entries_per_row):
            raise DamagedCacheError("the log-prob stream has another length than the counts give")
        logprobs = codes.view(np.float16).astype(np.float32)
    else:
        if logprob_bits == 8:
            expected = entries_per_row
        else:
            expected = (entries_per_row * logprob_bits + 7) // 8
        if not np.array_equal(np.diff(code_offsets), expected):
            raise DamagedCacheError("the log-prob code stream has another length than the counts give")
        code = _unpack_codes(
            codes, code_offsets, entry_starts, row_first_position, row_of_position, counts, logprob_bits
        )
        top = np.repeat(columns[TOP_COLUMN][1].astype(np.float32), counts)
        scale = np.repeat(columns[SCALE_COLUMN][1].astype(np.float32), counts)
        logprobs = top - code.astype(np.float32) * scale

    # ---- dense (positions, width) ----
    flat_index = entry_index + np.repeat(np.arange(num_positions, dtype=np.int64) * width - entry_starts[:-1], counts)
    # every slot starts as its position's first id (what the slots past its count keep)
    first_ids = np.zeros(num_positions, dtype=np.int64)
    first_ids[counts > 0] = ids[entry_starts[:-1][counts > 0]]
    dense_ids = np.repeat(first_ids, width)
    dense_ids[flat_index] = ids
    dense_logprobs = np.full(num_positions * width, fill_logprob, dtype=np.float32)
    dense_logprobs[flat_index] = logprobs
    return counts, dense_ids.reshape(num_positions, width), dense_logprobs.reshape(num_positions, width)


def _unpack_codes(
    codes: np.ndarray,
    code_offsets: np.ndarray,
    entry_starts: np.ndarray,
    row_first_position: np.ndarray,
    row_of_position: np.ndarray,
    counts: np.ndarray,
    bits: int,
) -> np.ndarray:
    """Every entry's `bits`-bit code from a stream whose rows start on a byte."""
    if bits == 8:
        return codes
    # entry e's code starts at bit 8 * (its row's first byte) + bits * (e - its row's first entry)
    row_of_entry = np.repeat(row_of_position, counts)
    entry_index = np.arange(int(entry_starts[-1]), dtype=np.int64)
    row_base = code_offsets[:-1] * 8 - entry_starts[row_first_position] * bits
    return _unpack_short(codes, row_base[row_of_entry] + entry_index * bits, bits)


def _unpack_short(buffer: np.ndarray, bit_offsets: np.ndarray, widths: np.ndarray | int) -> np.ndarray:
    """Values of <= 25 bits at `bit_offsets` (little-endian bit order): one unaligned 32-bit read each."""
    if bit_offsets.size == 0:
        return np.zeros(0, dtype=np.int64)
    padded = np.zeros(buffer.shape[0] + 4, dtype=np.uint8)
    padded[: buffer.shape[0]] = buffer
    words = np.ndarray(shape=(buffer.shape[0] + 1,), dtype="<u4", buffer=padded, strides=(1,))
    first_byte = bit_offsets >> 3
    if int(first_byte.max()) > buffer.shape[0]:
        raise DamagedCacheError("a packed stream is shorter than its counts say")
    word = words[first_byte].astype(np.int64)
    mask = (np.int64(1) << np.asarray(widths, dtype=np.int64)) - 1
    return (word >> (bit_offsets & 7)) & mask
