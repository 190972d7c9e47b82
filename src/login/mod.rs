//! Whether a password login will work, and how to make it work: pure decisions over the guest's
//! files, no I/O. `checks::login` is the one derivation of what cloud-init and then sshd do; `plan`
//! makes the change, `checks` judges it, `audit` reports an image as it is, `method` chooses between
//! cloud-init and `/etc/shadow`.
pub mod audit;
pub mod checks;
pub mod method;
pub mod password;
pub mod plan;
pub mod shadow;
pub mod sshd;
