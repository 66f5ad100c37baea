//! Disk room for the journal (docs/ARCHITECTURE.md, "Disk full").
//!
//! Once a second maintenance reads the free space of the shard's journal
//! directory (statvfs, off the request path) and tells the journal whether
//! it is under `engine.disk_reserve_bytes`: new messages are then refused
//! (`503 storage_full`) while the journal's own status records (acks,
//! deliveries, expiries) still fit, so the backlog can drain and settled
//! segments be deleted. It also asks the journal to allocate its next
//! segment again if an earlier try found no room: space freed by an
//! operator, by deleted segments or by a compacted cold store is taken up
//! without a restart.

use crate::shard::Shard;

impl Shard {
    /// Maintenance: compares free space with the reserve, retries the
    /// journal's spare segment.
    pub fn check_disk_room(&self) {
        let journal = self.journal();
        let reserve = self.cfg().engine.disk_reserve_bytes();
        let low = crate::metrics::available_bytes(journal.dir()).filter(|&free| free < reserve).map(|free| {
            format!(
                "{free} bytes free in {}, under the reserve of {reserve} (engine.disk_reserve_bytes)",
                journal.dir().display()
            )
        });
        journal.set_low_on_space(low);
        journal.retry_room();
    }
}
