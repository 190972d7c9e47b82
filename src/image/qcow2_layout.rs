//! The layout of a standalone qcow2 (compat 1.1) image planned before any of it is written, so that the
//! file can be produced front to back in one pass — header, refcounts, L1 and L2 tables, then the data
//! clusters in guest order — and hashed as it is written. Pure: it needs only the virtual size and which
//! guest clusters hold data.

/// 64 KiB, qemu-img's default cluster size.
pub const CLUSTER_BITS: u32 = 16;
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// 8-byte entries per L2 table (one cluster).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts (refcount_order 4), as qemu-img writes them.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// "This cluster's refcount is exactly one": set on every L1/L2 entry of an image without snapshots.
const COPIED: u64 = 1 << 63;
const HEADER_LENGTH: u32 = 104;

/// A run of guest clusters that hold data: `start` and `count` in clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub count: u64,
}

/// Where everything goes, in clusters from the start of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    virtual_size: u64,
    runs: Vec<Run>,
    refcount_table_clusters: u64,
    l1_entries: u64,
    refcount_blocks: u64,
    /// The L1 index of each L2 table, in file order.
    l2_tables: Vec<u64>,
    data_clusters: u64,
}

impl Layout {
    /// Plans an image of `virtual_size` bytes whose data lies in `extents` (byte ranges `(start,
    /// length)` in any order, overlapping allowed); every cluster an extent touches is stored.
    pub fn plan(virtual_size: u64, extents: &[(u64, u64)]) -> Layout {
        let runs = cluster_runs(virtual_size, extents);
        let data_clusters: u64 = runs.iter().map(|r| r.count).sum();
        let mut l2_tables: Vec<u64> = Vec::new();
        for run in &runs {
            let (first, last) = (run.start / L2_ENTRIES, (run.start + run.count - 1) / L2_ENTRIES);
            let from = l2_tables.last().map_or(first, |&t| first.max(t + 1));
            l2_tables.extend(from..=last);
        }
        let l1_entries = virtual_size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES).max(1);
        let fixed = 1 + clusters_for(l1_entries * 8) + l2_tables.len() as u64 + data_clusters;
        // The refcount blocks count themselves and the table that points at them: grow to a fixed point.
        let (mut blocks, mut table) = (1, 1);
        loop {
            let total = fixed + blocks + table;
            let (need_blocks, need_table) = (total.div_ceil(REFCOUNTS_PER_BLOCK), clusters_for(blocks * 8));
            if (need_blocks, need_table) == (blocks, table) {
                break;
            }
            (blocks, table) = (need_blocks.max(blocks), need_table.max(table));
        }
        Layout {
            virtual_size,
            runs,
            refcount_table_clusters: table,
            l1_entries,
            refcount_blocks: blocks,
            l2_tables,
            data_clusters,
        }
    }

    /// The guest clusters to copy after the metadata, in file order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    fn refcount_table_at(&self) -> u64 {
        1
    }

    fn l1_at(&self) -> u64 {
        self.refcount_table_at() + self.refcount_table_clusters
    }

    fn refcount_blocks_at(&self) -> u64 {
        self.l1_at() + clusters_for(self.l1_entries * 8)
    }

    fn l2_at(&self) -> u64 {
        self.refcount_blocks_at() + self.refcount_blocks
    }

    fn data_at(&self) -> u64 {
        self.l2_at() + self.l2_tables.len() as u64
    }

    fn total_clusters(&self) -> u64 {
        self.data_at() + self.data_clusters
    }

    /// The size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.total_clusters() * CLUSTER
    }

    /// The bytes before the data (header, refcount table, L1, refcount blocks, L2 tables), one cluster
    /// at a time so that memory stays at one cluster whatever the image's size.
    pub fn write_metadata(&self, emit: &mut dyn FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let mut cluster = vec![0u8; CLUSTER as usize];
        self.header(&mut cluster);
        emit(&cluster)?;
        let rb_at = self.refcount_blocks_at();
        entries(
            &mut cluster,
            self.refcount_table_clusters,
            (0..self.refcount_blocks).map(|i| (rb_at + i) * CLUSTER),
            emit,
        )?;
        let mut l2_index = self.l2_tables.iter().enumerate().map(|(i, &t)| (t, i as u64)).peekable();
        let l2_at = self.l2_at();
        let l1 = (0..self.l1_entries).map(|t| match l2_index.next_if(|&(table, _)| table == t) {
            Some((_, i)) => ((l2_at + i) * CLUSTER) | COPIED,
            None => 0,
        });
        entries(&mut cluster, clusters_for(self.l1_entries * 8), l1, emit)?;
        let total = self.total_clusters();
        for block in 0..self.refcount_blocks {
            cluster.fill(0);
            let counted = (total - block * REFCOUNTS_PER_BLOCK).min(REFCOUNTS_PER_BLOCK) as usize;
            for entry in cluster.chunks_exact_mut(2).take(counted) {
                entry.copy_from_slice(&1u16.to_be_bytes());
            }
            emit(&cluster)?;
        }
        let mut next_data = self.data_at();
        let mut runs = self.runs.iter().peekable();
        for &table in &self.l2_tables {
            cluster.fill(0);
            let (first, end) = (table * L2_ENTRIES, (table + 1) * L2_ENTRIES);
            while let Some(run) = runs.peek() {
                let from = run.start.max(first);
                let to = (run.start + run.count).min(end);
                for guest in from..to {
                    let at = ((guest - first) * 8) as usize;
                    cluster[at..at + 8].copy_from_slice(&((next_data * CLUSTER) | COPIED).to_be_bytes());
                    next_data += 1;
                }
                if run.start + run.count > end {
                    break;
                }
                runs.next();
            }
            emit(&cluster)?;
        }
        Ok(())
    }

    fn header(&self, cluster: &mut [u8]) {
        cluster.fill(0);
        let mut put = |at: usize, bytes: &[u8]| cluster[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &self.virtual_size.to_be_bytes());
        put(36, &(self.l1_entries as u32).to_be_bytes());
        put(40, &(self.l1_at() * CLUSTER).to_be_bytes());
        put(48, &(self.refcount_table_at() * CLUSTER).to_be_bytes());
        put(56, &(self.refcount_table_clusters as u32).to_be_bytes());
        put(96, &REFCOUNT_ORDER.to_be_bytes());
        put(100, &HEADER_LENGTH.to_be_bytes());
        // The header extensions that follow end at once: the zeroed end-of-extensions marker.
    }
}

/// Writes big-endian u64 `values` into `clusters` clusters, zero-padded.
fn entries(
    cluster: &mut [u8],
    clusters: u64,
    values: impl Iterator<Item = u64>,
    emit: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut values = values.peekable();
    for _ in 0..clusters {
        cluster.fill(0);
        for slot in cluster.chunks_exact_mut(8) {
            match values.next() {
                Some(v) => slot.copy_from_slice(&v.to_be_bytes()),
                None => break,
            }
        }
        emit(cluster)?;
    }
    debug_assert!(values.peek().is_none(), "every entry fits the clusters planned for it");
    Ok(())
}

fn clusters_for(bytes: u64) -> u64 {
    bytes.div_ceil(CLUSTER).max(1)
}

/// Sorted, merged runs of the clusters that `extents` touch, clipped to the virtual size.
fn cluster_runs(virtual_size: u64, extents: &[(u64, u64)]) -> Vec<Run> {
    let mut spans: Vec<(u64, u64)> = extents
        .iter()
        .map(|&(start, len)| (start, (start.saturating_add(len)).min(virtual_size)))
        .filter(|&(start, end)| start < end)
        .map(|(start, end)| (start / CLUSTER, end.div_ceil(CLUSTER)))
        .collect();
    spans.sort_unstable();
    let mut runs: Vec<Run> = Vec::new();
    for (first, end) in spans {
        match runs.last_mut() {
            Some(last) if first <= last.start + last.count => last.count = last.count.max(end - last.start),
            _ => runs.push(Run { start: first, count: end - first }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(layout: &Layout) -> Vec<u8> {
        let mut bytes = Vec::new();
        layout
            .write_metadata(&mut |c| {
                bytes.extend_from_slice(c);
                Ok(())
            })
            .unwrap();
        bytes
    }

    fn be64(b: &[u8], at: u64) -> u64 {
        u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
    }

    #[test]
    fn extents_become_sorted_merged_cluster_runs() {
        let runs =
            cluster_runs(10 * CLUSTER, &[(5 * CLUSTER + 1, 10), (0, 1), (CLUSTER - 1, 2), (6 * CLUSTER, 9 * CLUSTER)]);
        assert_eq!(runs, vec![Run { start: 0, count: 2 }, Run { start: 5, count: 5 }]);
        assert!(cluster_runs(CLUSTER, &[(0, 0), (2 * CLUSTER, 5)]).is_empty());
    }

    #[test]
    fn an_empty_disk_is_header_tables_and_no_data() {
        let layout = Layout::plan(1 << 30, &[]);
        let meta = metadata(&layout);
        assert_eq!(meta.len() as u64, layout.file_size());
        assert_eq!(&meta[..4], b"QFI\xfb");
        assert_eq!(be64(&meta, 24), 1 << 30);
        // header, refcount table, L1, one refcount block
        assert_eq!(layout.file_size(), 4 * CLUSTER);
        let l1 = be64(&meta, 40);
        assert!(meta[l1 as usize..l1 as usize + 16].iter().all(|&b| b == 0), "no L2 tables");
        let block = be64(&meta, be64(&meta, 48));
        let refcounts: Vec<u16> =
            meta[block as usize..].chunks(2).take(5).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        assert_eq!(refcounts, [1, 1, 1, 1, 0]);
    }

    #[test]
    fn l2_entries_point_at_data_in_guest_order() {
        // Data at clusters 1-2 and at the first cluster of the second L2 table's range.
        let second_table = L2_ENTRIES * CLUSTER;
        let layout = Layout::plan(3 * second_table, &[(CLUSTER, 2 * CLUSTER), (second_table, 100)]);
        let meta = metadata(&layout);
        let l1 = be64(&meta, 40);
        let data_at = layout.data_at() * CLUSTER;
        let table = |i: u64| be64(&meta, l1 + i * 8);
        assert_eq!(table(2), 0, "the third range has no data and no table");
        let first = table(0) & !COPIED;
        assert_eq!(be64(&meta, first), 0);
        assert_eq!(be64(&meta, first + 8), data_at | COPIED);
        assert_eq!(be64(&meta, first + 16), (data_at + CLUSTER) | COPIED);
        assert_eq!(be64(&meta, table(1) & !COPIED), (data_at + 2 * CLUSTER) | COPIED);
        assert_eq!(layout.file_size(), data_at + 3 * CLUSTER);
    }

    #[test]
    fn refcount_blocks_grow_with_the_file() {
        // 3 GiB of data needs two refcount blocks (each counts 2 GiB of file).
        let layout = Layout::plan(4 << 30, &[(0, 3 << 30)]);
        assert_eq!(layout.refcount_blocks, 2);
        assert!(layout.total_clusters() <= 2 * REFCOUNTS_PER_BLOCK);
        let meta = metadata(&layout);
        let table = be64(&meta, 48);
        let second = be64(&meta, table + 8);
        let last_counted = (layout.total_clusters() - REFCOUNTS_PER_BLOCK - 1) * 2;
        assert_eq!(&meta[(second + last_counted) as usize..][..4], &[0, 1, 0, 0]);
    }
}
