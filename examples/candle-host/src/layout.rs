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
}
