//! The long help of each command: what it does, in order, with examples.

pub(super) const DOCTOR_HELP: &str = "\
Checks, in order: the user and container; libguestfs and its backend; the appliance's qemu;
qemu-img and qemu-nbd; the appliance files; a kernel that supermin can read (Ubuntu's /boot/vmlinuz-*
are readable only by root); free space in $TMPDIR and in the appliance cache; whether KVM is usable
(or why TCG is used); then it builds the appliance and starts it once, with the time each took.
Every problem is printed with the command that fixes it.

Examples:
  cloudimg doctor                # everything, ~15-30 s with TCG
  cloudimg doctor --quick        # no appliance build or launch, under a second
  cloudimg doctor --json | jq '.checks[] | select(.status == \"fail\")'

Exit status:
  0    cloudimg works here (warnings allowed)
  2    bad command line
  6    cloudimg cannot work here: a check failed";

pub(super) const UPLOAD_EXAMPLES: &str = "\
Creates the image record (disk and container format, min_disk and the properties from the manifest
or the file), sends the file with a progress bar while computing its MD5 and SHA-512 -- staged and
imported (glance-direct) where the cloud offers it, else with PUT --, waits for Glance to make the
image active, and compares Glance's size, checksum and os_hash_value with the file's. Then, if asked:
members, protection, and the project's older images of the same name hidden or deleted. On any
failure before the image is verified it is deleted (unless --keep-failed) and Glance's own error is
shown.

Credentials as the openstack CLI takes them: --os-cloud NAME (or OS_CLOUD) from clouds.yaml (./,
~/.config/openstack/, /etc/openstack/; secure.yaml merged over it), with any OS_* variable overriding
the cloud's setting; else the OS_* variables alone. auth_type (OS_AUTH_TYPE): password, v3password,
v3applicationcredential (OS_APPLICATION_CREDENTIAL_ID or _NAME, OS_APPLICATION_CREDENTIAL_SECRET),
token, v3token (OS_TOKEN); OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME,
OS_USER_DOMAIN_NAME, OS_PROJECT_DOMAIN_NAME, OS_REGION_NAME, OS_INTERFACE, OS_CACERT, OS_INSECURE.
Secrets and tokens are never printed.

Examples:
  # What customize wrote, with its manifest: formats, min_disk, os_distro... and the hashes to check
  cloudimg upload debian-12-pw.qcow2 --manifest debian-12-pw.json --name debian-12-pw --os-cloud mycloud

  # A weekly pipeline with an application credential: skip unchanged images, hide the previous
  # build, keep the last 4
  export OS_AUTH_TYPE=v3applicationcredential OS_AUTH_URL=https://keystone:5000/v3
  export OS_APPLICATION_CREDENTIAL_ID=... OS_APPLICATION_CREDENTIAL_SECRET=...
  cloudimg upload out.qcow2 --name debian-12 --if-changed --tag weekly --hide-previous --keep 4 --json

  # What that would hide or delete, changing nothing
  cloudimg upload out.qcow2 --name debian-12 --hide-previous --keep 4 --dry-run

  # Customize and upload in one step
  cloudimg customize in.qcow2 -o out.qcow2 --password-file pw.txt --upload --name debian-12-pw
";

pub(super) const INSPECT_HELP: &str = "\
Opens each image read-only (the file is never written) and reports: the file (format, qcow2 compat,
backing or external data file, virtual and allocated size); the system (OS, root device, cloud-init
version, whether set_passwords runs); every password cloud-init would set, for which user, from
which file and key, hashed or plaintext (never the value); chpasswd.expire and ssh_pwauth; what
sshd's PasswordAuthentication and PermitRootLogin will be once cloud-init has acted; the users'
/etc/shadow state; whether the image was booted before. The analysis is the one customize uses.

Examples:
  cloudimg inspect debian-12.qcow2
  cloudimg inspect *.qcow2 --json | jq '.[] | {path, login: .password_login.works}'

  # A CI gate before uploading: fails unless a new instance accepts an SSH password login for the
  # default user, no password is stored in plaintext and the file is standalone
  cloudimg inspect out.qcow2 --require password-login --require no-plaintext --require standalone
";

pub(super) const CUSTOMIZE_EXAMPLES: &str = "\
Examples:
  # Image builders: a new image whose default user logs in with the password in pw.txt
  cloudimg customize debian-12.qcow2 -o debian-12-pw.qcow2 --password-file pw.txt

  # Pipelines: password from a secret on stdin, machine-readable report, raw output for Ceph
  printf '%s\\n' \"$PW\" | cloudimg customize in.qcow2 -o out.raw --output-format raw --password-stdin --json

  # A generated password, saved to a new file readable only by you
  cloudimg customize in.qcow2 -o out.qcow2 --random-password --random-password-file out.pw

  # See what would change, with the secret masked; writes nothing
  cloudimg customize in.qcow2 --dry-run --password-file pw.txt

  # A release's images in one appliance launch; a bad image fails alone
  cloudimg customize debian-12.qcow2 ubuntu-24.04.qcow2 rocky-9.qcow2 --out-dir ready/ --password-file pw.txt

  # One-off reset of an existing image file, in place (atomic: old or new image, never half)
  cloudimg customize vm.qcow2 --in-place --password-file pw.txt --clean-instance-state

  # The disk of an instance that was booted already, or an image without cloud-init: /etc/shadow
  cloudimg customize vm.qcow2 -o fixed.qcow2 --password-file pw.txt --method auto

  # Proven by a boot before the output appears (and before any upload); a failure keeps the image
  # as out.failed.qcow2 for a look
  cloudimg customize in.qcow2 -o out.qcow2 --password-file pw.txt --verify --keep-failed

  # SSH keys for the default user, no password
  cloudimg customize in.qcow2 -o out.qcow2 --ssh-key ~/.ssh/id_ed25519.pub

  # The reverse: undo cloudimg's edit (byte for byte), remove any other password, ssh_pwauth: false
  cloudimg customize out.qcow2 -o locked.qcow2 --lock

What is written: /etc/cloud/cloud.cfg (or, with --drop-in, /etc/cloud/cloud.cfg.d/99-cloudimg.cfg, mode 0600)
gets a SHA-512 crypt hash of the password in the form the image's cloud-init version reads
(chpasswd.users from 22.3, the top-level password or chpasswd.list from 17.1), chpasswd.expire: false
and ssh_pwauth: true. Everything else in the file stays byte for byte. cloudimg then checks the
drop-ins in /etc/cloud/cloud.cfg.d, the module lists and sshd's configuration, and refuses to write
an image in which the login would not work. The originals of the files it changes are kept in
/etc/cloud/cloudimg-undo.json (mode 0600), which --lock uses to restore them exactly.

With --method shadow the hash goes straight into /etc/shadow instead (yescrypt on Debian 11+ and
Ubuntu 20.04+, else SHA-512; mode, owner and SELinux label kept; the account unlocked), and the
sshd line that decides PasswordAuthentication is switched to yes. --method auto uses cloud-init when
it will set the password (installed, 17.1+ or --plaintext, set_passwords in its module lists, not
booted before) and /etc/shadow otherwise, and says which it chose and why.

The input is never modified (unless --in-place), its format is read from its header (qcow2 or raw;
never probed), and qcow2 files with backing or external data files are refused.
";
