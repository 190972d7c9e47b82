//! Which accelerator the appliance runs with.
//!
//! Some hosts have a `/dev/kvm` that opens but cannot run the appliance kernel (paravirtual KVM
//! inside a cloud VM whose CPU shows neither `vmx` nor `svm`): the launch then hangs forever. On such
//! hosts `auto` picks TCG (software emulation) without being told.

use anyhow::{bail, Result};

/// What the user asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Requested {
    /// KVM when the host can really use it, else TCG.
    Auto,
    /// KVM; fail when it is not usable.
    Kvm,
    /// Software emulation (slower, works everywhere).
    Tcg,
}

/// What the appliance will run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Facts about the host that decide whether KVM can work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKvm {
    pub device: KvmDevice,
    /// The CPU advertises hardware virtualization (`vmx` or `svm` in /proc/cpuinfo).
    pub cpu_virtualization: bool,
}

/// What opening `/dev/kvm` read-write gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmDevice {
    Missing,
    /// It exists but this user may not open it (not in the `kvm` group, or a container without it).
    NotAccessible,
    Usable,
}

impl HostKvm {
    pub fn probe() -> Self {
        let device = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(_) => KvmDevice::Usable,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => KvmDevice::Missing,
            Err(_) => KvmDevice::NotAccessible,
        };
        let cpu_virtualization = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| cpu_flags_allow_kvm(&info));
        HostKvm { device, cpu_virtualization }
    }

    /// Why KVM cannot run the appliance here; `None` when it can.
    pub fn problem(&self) -> Option<&'static str> {
        match (self.device, self.cpu_virtualization) {
            (KvmDevice::Missing, _) => Some("/dev/kvm does not exist"),
            (KvmDevice::NotAccessible, _) => Some("/dev/kvm exists but this user cannot open it"),
            (KvmDevice::Usable, false) => Some(
                "/dev/kvm exists but the CPU shows neither vmx nor svm (paravirtual KVM cannot boot the appliance)",
            ),
            (KvmDevice::Usable, true) => None,
        }
    }
}

fn cpu_flags_allow_kvm(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Chooses the accelerator, with the reason when KVM was not chosen.
pub fn choose(requested: Requested, host: &HostKvm) -> Result<(Accel, Option<&'static str>)> {
    match (requested, host.problem()) {
        (Requested::Tcg, _) => Ok((Accel::Tcg, Some("--accel tcg was given"))),
        (Requested::Kvm, Some(why)) => {
            bail!("--accel kvm was given, but {why}; use --accel tcg or --accel auto")
        }
        (_, None) => Ok((Accel::Kvm, None)),
        (Requested::Auto, Some(why)) => Ok((Accel::Tcg, Some(why))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_avoids_kvm_that_would_hang() {
        let table = [
            (Requested::Auto, true, true, Some(Accel::Kvm)),
            (Requested::Auto, true, false, Some(Accel::Tcg)),
            (Requested::Auto, false, true, Some(Accel::Tcg)),
            (Requested::Kvm, true, false, None),
            (Requested::Kvm, true, true, Some(Accel::Kvm)),
            (Requested::Tcg, true, true, Some(Accel::Tcg)),
        ];
        for (requested, device_usable, cpu_virtualization, expected) in table {
            let device = if device_usable { KvmDevice::Usable } else { KvmDevice::NotAccessible };
            let host = HostKvm { device, cpu_virtualization };
            assert_eq!(choose(requested, &host).ok().map(|(a, _)| a), expected, "{requested:?} {host:?}");
        }
    }

    #[test]
    fn cpu_flags_are_read_from_cpuinfo() {
        assert!(cpu_flags_allow_kvm("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(!cpu_flags_allow_kvm("flags\t\t: fpu hypervisor sse\nmodel name: vmx-like\n"));
    }
}
