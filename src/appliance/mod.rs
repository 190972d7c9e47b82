//! What the libguestfs appliance is started with: the accelerator (`accel`), a copy of the appliance
//! whose kernel boots faster under TCG (`fast_boot`), and only from cache directories this user alone
//! controls (`trusted_dir`). The launch itself is `guest::session`.
pub mod accel;
pub mod fast_boot;
pub mod trusted_dir;
