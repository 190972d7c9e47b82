//! The image files on the host: the input's header read by this code before qemu or libguestfs see
//! the file, and the output produced from the working overlay (in one pass, or as a copy of the
//! input plus the edits), with the hashes Glance records.
pub mod hashing;
pub mod header;
pub mod output;
pub mod overlay_reader;
pub mod patch;
pub mod qcow2_layout;
pub mod writer;
