//! Debug events: named points in an image driver's work (an L2 table
//! loaded, a refcount block allocated, a data write issued), reported to
//! the storage below it with [`Storage::event`](crate::Storage::event).
//! The names are QEMU's (`BlkdebugEvent` in its `qapi/block-core.json`),
//! so error-injection rules written for QEMU's blkdebug driver name the
//! same points here. Plain storage ignores events; [`crate::Blkdebug`]
//! acts on them.

macro_rules! events {
    ($($v:ident = $n:literal,)*) => {
        /// A point in a driver's work that error-injection rules can name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(missing_docs)]
        pub enum DebugEvent { $($v,)* }

        impl DebugEvent {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [DebugEvent] = &[$(DebugEvent::$v,)*];

            /// QEMU's name of the event (`l2_load`, `write_aio`, ...).
            pub fn name(self) -> &'static str {
                match self { $(DebugEvent::$v => $n,)* }
            }
        }
    };
}

events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

impl DebugEvent {
    /// The event named `name`, as QEMU spells it.
    pub fn from_name(name: &str) -> Option<DebugEvent> {
        Self::ALL.iter().copied().find(|e| e.name() == name)
    }
}

impl std::fmt::Display for DebugEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(DebugEvent::ALL.len(), 48);
        for &e in DebugEvent::ALL {
            assert_eq!(DebugEvent::from_name(e.name()), Some(e));
        }
        assert_eq!(DebugEvent::from_name("l2_load"), Some(DebugEvent::L2Load));
        assert_eq!(DebugEvent::from_name("L2_load"), None);
    }
}
