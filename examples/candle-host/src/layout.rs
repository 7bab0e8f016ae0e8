//! Where each tensor goes in a model's single device buffer, and how a staging chunk is filled
//! from the tensors it overlaps. Pure functions: the GPU path's logic, tested without a GPU.
//!
//! ```text
//!   device buffer: |tensor a|pad|tensor b......|pad|tensor c|
//!   chunks:        |<- staging 0 ->|<- staging 1 ->|<- 2 ->|     each filled by fill_chunk
//! ```

/// Tensors start at multiples of this many bytes on the device (what cuBLAS and vector loads
/// like; `cuMemAlloc` itself aligns the buffer to at least 256 bytes).
pub const TENSOR_ALIGN: usize = 256;

/// The granularity in which the driver maps device memory: an allocation holds a multiple of it.
pub const DEVICE_PAGE: usize = 2 << 20;

/// A run of bytes at an offset of the device buffer.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// Offset in the device buffer, bytes.
    pub offset: usize,
    /// The bytes.
    pub data: &'a [u8],
}

/// Rounds `value` up to a multiple of `align` (a power of two or any positive number).
pub fn round_up(value: usize, align: usize) -> usize {
    value.div_ceil(align) * align
}

/// Offsets for tensors of `sizes` bytes placed one after another at `align`, and the total.
pub fn plan(sizes: &[usize], align: usize) -> (Vec<usize>, usize) {
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut end = 0usize;
    for &size in sizes {
        let offset = round_up(end, align);
        offsets.push(offset);
        end = offset + size;
    }
    (offsets, end)
}

/// Fills `buf`, which stands for device bytes `position..position + buf.len()`, from the
/// segments (sorted by offset, not overlapping), zeroing the gaps. `cursor` is the first
/// segment that may still overlap (start with 0); the returned cursor is for the next chunk.
pub fn fill_chunk(
    segments: &[Segment<'_>],
    mut cursor: usize,
    position: usize,
    buf: &mut [u8],
) -> usize {
    let mut filled = 0usize;
    while filled < buf.len() {
        let at = position + filled;
        let Some(segment) = segments.get(cursor) else {
            buf[filled..].fill(0);
            break;
        };
        if at < segment.offset {
            let gap = (segment.offset - at).min(buf.len() - filled);
            buf[filled..filled + gap].fill(0);
            filled += gap;
            continue;
        }
        let inside = at - segment.offset;
        if inside >= segment.data.len() {
            cursor += 1;
            continue;
        }
        let take = (segment.data.len() - inside).min(buf.len() - filled);
        buf[filled..filled + take].copy_from_slice(&segment.data[inside..inside + take]);
        filled += take;
    }
    cursor
}

/// The first segment that may overlap device byte `at` (segments sorted by offset, not
/// overlapping, so their ends are sorted too).
pub fn first_segment_at(segments: &[Segment<'_>], at: usize) -> usize {
    segments.partition_point(|segment| segment.offset + segment.data.len() <= at)
}

/// Below this many bytes per thread, spawning costs more than the copy gains.
const MIN_BYTES_PER_THREAD: usize = 4 << 20;

/// [`fill_chunk`] split over up to `threads` scoped threads, each filling its own part of `buf`.
///
/// Why: one core copying out of the page cache (page faults on the file mapping plus `memcpy`)
/// reaches a fraction of what the PCIe/NVLink DMA into the device takes, so a single-threaded
/// fill leaves the copy engine idle most of the time. Parts are independent, so each thread
/// finds its first segment by binary search.
pub fn fill_chunk_parallel(
    segments: &[Segment<'_>],
    position: usize,
    buf: &mut [u8],
    threads: usize,
) {
    let parts = threads
        .max(1)
        .min(buf.len().div_ceil(MIN_BYTES_PER_THREAD))
        .max(1);
    if parts == 1 {
        fill_chunk(
            segments,
            first_segment_at(segments, position),
            position,
            buf,
        );
        return;
    }
    let part = buf.len().div_ceil(parts);
    std::thread::scope(|scope| {
        for (index, piece) in buf.chunks_mut(part).enumerate() {
            let at = position + index * part;
            scope.spawn(move || fill_chunk(segments, first_segment_at(segments, at), at, piece));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Catches off-by-one errors in alignment: every tensor starts aligned, none overlap.
    #[test]
    fn plan_aligns_and_packs() {
        let (offsets, total) = plan(&[10, 256, 0, 1], 256);
        assert_eq!(offsets, vec![0, 256, 512, 512]);
        assert_eq!(total, 513);
        assert_eq!(plan(&[], 256), (vec![], 0));
        assert_eq!(round_up(1, DEVICE_PAGE), DEVICE_PAGE);
        assert_eq!(round_up(0, DEVICE_PAGE), 0);
    }

    /// Staging through chunks of any size reproduces the device image exactly: the bytes of
    /// each tensor at its offset, zeros in the gaps (catches cursor bugs at chunk borders).
    #[test]
    fn chunks_of_any_size_rebuild_the_image() {
        let tensors: Vec<Vec<u8>> = vec![
            (0..10u8).collect(),
            (0..=255u8).cycle().take(700).collect(),
            vec![],
            vec![7; 3],
            (100..200u8).collect(),
        ];
        let sizes: Vec<usize> = tensors.iter().map(Vec::len).collect();
        let (offsets, total) = plan(&sizes, 64);
        let segments: Vec<Segment<'_>> = offsets
            .iter()
            .zip(&tensors)
            .map(|(&offset, data)| Segment { offset, data })
            .collect();
        let mut expected = vec![0u8; total];
        for segment in &segments {
            expected[segment.offset..segment.offset + segment.data.len()]
                .copy_from_slice(segment.data);
        }
        for chunk in [1, 2, 3, 63, 64, 65, 100, 1000, total] {
            let mut image = Vec::new();
            let mut cursor = 0;
            let mut position = 0;
            while position < total {
                let len = chunk.min(total - position);
                let mut buf = vec![0xAAu8; len];
                cursor = fill_chunk(&segments, cursor, position, &mut buf);
                image.extend_from_slice(&buf);
                position += len;
            }
            assert_eq!(image, expected, "chunk size {chunk}");
        }
    }

    /// The threaded fill gives the same bytes as the serial one, whatever the chunk, the
    /// number of threads and where the parts' borders fall (inside tensors, in gaps).
    #[test]
    fn parallel_fill_matches_the_serial_image() {
        let tensors: Vec<Vec<u8>> = (0..9u8)
            .map(|i| {
                (0..=255u8)
                    .cycle()
                    .skip(i as usize)
                    .take(3_000_000 + 77_777 * i as usize)
                    .collect()
            })
            .chain([vec![], vec![5; 17]])
            .collect();
        let sizes: Vec<usize> = tensors.iter().map(Vec::len).collect();
        let (offsets, total) = plan(&sizes, TENSOR_ALIGN);
        let segments: Vec<Segment<'_>> = offsets
            .iter()
            .zip(&tensors)
            .map(|(&offset, data)| Segment { offset, data })
            .collect();
        let mut expected = vec![0u8; total];
        fill_chunk(&segments, 0, 0, &mut expected);
        for (chunk, threads) in [
            (total, 8),
            (9 << 20, 3),
            (8 << 20, 16),
            (5 << 20, 2),
            (1 << 20, 4),
        ] {
            let mut image = Vec::with_capacity(total);
            let mut position = 0;
            while position < total {
                let len = chunk.min(total - position);
                let mut buf = vec![0xAAu8; len];
                fill_chunk_parallel(&segments, position, &mut buf, threads);
                image.extend_from_slice(&buf);
                position += len;
            }
            assert!(image == expected, "chunk {chunk}, {threads} threads");
        }
        assert_eq!(first_segment_at(&segments, 0), 0);
        assert_eq!(first_segment_at(&segments, total), segments.len());
    }
}
