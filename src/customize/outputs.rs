//! The last steps of `customize`: each edited overlay written as a standalone image beside its
//! destination (on the output writer thread, while the appliance edits the next image), checked as
//! Glance will and flushed; then, once every edit is known to have reached the disk, the outputs
//! renamed into place in order, their manifests written and uploads made.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::{sweep, Outcome, Prepared, Summary, Target};
use crate::cli::settings::{Customize, ManifestRequest};
use crate::image::hashing::{self, Digests};
use crate::image::header::ImageInfo;
use crate::image::output::{self, Created, Pending};
use crate::image::patch::{self, Copied, Edits};
use crate::login::password::{self, Secret, Source};
use crate::openstack::manifest::{self, Manifest};
use crate::openstack::upload::{self, Connection};
use crate::support::cleanup;
use crate::support::exit_codes::{self, with_code, OUTPUT, UPLOAD};
use crate::support::report::Reporter;

/// One output written, checked and flushed under its temporary name.
pub(super) struct Converted {
    pending: Pending,
    written: ImageInfo,
    digests: Option<Digests>,
}

/// Copies the input of `p` beside its destination ahead of the edits, when the edits can then be
/// written into the copy (see [`patch`]): the output keeps the input's format and is not
/// compressed, and the input file is a sound, valid output itself. `None` when the output is to be written
/// afresh instead. Runs on the output writer thread while the appliance starts.
pub(super) fn copy_ahead(s: &Customize, p: &Prepared, report: &Reporter) -> Option<Result<Copied>> {
    let target = p.target.as_ref()?;
    if target.format != p.info.format || target.compress || !p.info.copyable || !patch::sound(&p.input, p.info.format) {
        return None;
    }
    report.phase(&format!("Copying {} beside {}", p.input.display(), target.dest.display()));
    let started = Instant::now();
    cleanup::fault_point("copying");
    let mut progress = report.progress(&progress_label(s, "copying", target));
    let copied = Pending::beside(&target.dest).and_then(|pending| {
        sweep(pending.dir(), cleanup::PARTIAL_MARKER, report);
        Copied::make(&p.input, p.info.format, pending, &mut |percent| progress.set(percent))
    });
    drop(progress);
    let secs = report.took("copying", started);
    if let Ok(c) = &copied {
        report.detail(&format!("copied {:.0} MiB in {secs:.1} s", c.bytes as f64 / f64::from(1 << 20)));
    }
    Some(copied.map_err(with_code(OUTPUT)))
}

/// Writes the overlay of `p` (whose edits are complete and flushed) as a standalone image beside its
/// destination — into the input's copy when there is one (`ahead`), afresh otherwise — checks it and
/// flushes it; runs on the output writer thread.
pub(super) fn convert(
    s: &Customize,
    p: &Prepared,
    ahead: Option<Result<Copied>>,
    report: &Reporter,
) -> Result<Converted> {
    let overlay = p.overlay.as_deref().expect("a real run has overlays");
    let converted = match ahead.map(|copied| copied.and_then(|c| Ok((c.edits(overlay)?, c)))) {
        None => write_checked(s, p, report),
        Some(Err(e)) => Err(e),
        Some(Ok((edits, copied))) if edits.zeroed() > patch::MOST_ZEROED => {
            report.detail(&format!(
                "the edits zeroed {:.0} MiB of the input's data: writing the output afresh, as small as its data",
                edits.zeroed() as f64 / f64::from(1 << 20)
            ));
            drop(copied);
            write_checked(s, p, report)
        }
        Some(Ok((edits, copied))) => patch_checked(s, p, copied, edits, report),
    };
    cleanup::fault_point("converted");
    // Whatever failed here, it is the output that could not be written (exit status 7).
    converted.map_err(with_code(OUTPUT))
}

fn write_checked(s: &Customize, p: &Prepared, report: &Reporter) -> Result<Converted> {
    let target = p.target.as_ref().expect("a real run has targets");
    let overlay = p.overlay.as_deref().expect("a real run has overlays");
    report.phase(&format!("Writing the {} image {}", target.format.as_str(), target.dest.display()));
    let started = Instant::now();
    let pending = Pending::beside(&target.dest)?;
    sweep(pending.dir(), cleanup::PARTIAL_MARKER, report);
    let mut progress = report.progress(&progress_label(s, "writing", target));
    let digests = output::write_image(
        overlay,
        &p.input,
        target.format,
        target.compress,
        &pending,
        s.hash_while_writing(),
        &mut |percent| progress.set(percent),
    )?;
    drop(progress);
    let written = output::check_written(&pending, target.format, p.info.virtual_size)
        .with_context(|| format!("checking the new image for {}", target.dest.display()))?;
    let wrote = report.took("writing", started);
    // Flushed as soon as it is whole, while the appliance works on: only the last output's flush is
    // left for the end of the run.
    let flushing = Instant::now();
    pending.flush()?;
    let flushed = report.took("flushing", flushing);
    report.detail(&format!("wrote {} in {wrote:.1} s, flushed it in {flushed:.1} s", target.dest.display()));
    Ok(Converted { pending, written, digests })
}

/// Writes the edits of `p` into the copy of its input, then checks, hashes (when asked) and flushes it.
fn patch_checked(s: &Customize, p: &Prepared, copied: Copied, edits: Edits, report: &Reporter) -> Result<Converted> {
    let target = p.target.as_ref().expect("a real run has targets");
    let overlay = p.overlay.as_deref().expect("a real run has overlays");
    report.phase(&format!("Writing the edits into the copy for {}", target.dest.display()));
    let started = Instant::now();
    cleanup::fault_point("converting");
    let bytes = copied
        .apply(edits, overlay, target.format)
        .with_context(|| format!("writing the edits into {}", copied.pending.path().display()))?;
    cleanup::checkpoint();
    let Copied { pending, .. } = copied;
    let written = output::check_written(&pending, target.format, p.info.virtual_size)
        .with_context(|| format!("checking the new image for {}", target.dest.display()))?;
    let wrote = report.took("writing", started);
    let digests = match s.hash_while_writing() {
        false => None,
        true => {
            let hashing = Instant::now();
            let total = written.file_size.max(1) as f64;
            let mut progress = report.progress(&progress_label(s, "writing", target));
            let digests =
                hashing::file_digests(pending.file(), pending.path(), &mut |n| progress.set(n as f64 * 100.0 / total))?;
            report.took("hashing", hashing);
            Some(digests)
        }
    };
    let flushing = Instant::now();
    pending.flush()?;
    let flushed = report.took("flushing", flushing);
    report.detail(&format!(
        "wrote {:.1} MiB of edits into {} in {wrote:.1} s, flushed it in {flushed:.1} s",
        bytes as f64 / f64::from(1 << 20),
        target.dest.display()
    ));
    Ok(Converted { pending, written, digests })
}

/// In a batch the bar or line names its image: the appliance's lines come in between.
fn progress_label(s: &Customize, verb: &str, target: &Target) -> String {
    match s.inputs.len() {
        1 => verb.to_string(),
        _ => format!("{verb} {}", target.dest.display()),
    }
}

/// With --verify: boots the output under its temporary name (the very file written, after the
/// appliance that edited it has shut down) and keeps it only when the login is proven; the verdict
/// goes into the summary's notes. A failed one is an error with the verdict's exit status, and the
/// image is dropped, or kept beside the output name with --keep-failed.
fn verify_converted(
    s: &Customize,
    p: &Prepared,
    secret: Option<&Secret>,
    summary: &mut Summary,
    c: Converted,
    report: &Reporter,
) -> Result<Converted> {
    let (true, Some(secret)) = (s.verify, secret) else {
        return Ok(c);
    };
    let target = p.target.as_ref().expect("a real run has targets");
    let expected = crate::verify::Expected {
        user: s.user.clone(),
        secret,
        same_instance: summary.decided.method == super::Route::Shadow,
        accel: s.accel,
    };
    let failure = match crate::verify::output(c.pending.file(), &target.dest, expected, report) {
        Ok(Ok(note)) => {
            summary.decided.notes.push(note);
            return Ok(c);
        }
        Ok(Err(failed)) => with_code(failed.code)(anyhow::anyhow!("{}", failed.why)),
        // An output that cannot even be booted failed its verification too.
        Err(e) => e,
    };
    let untouched =
        if target.in_place { "the input was left as it was" } else { "nothing was written under that name" };
    let kept = match s.keep_failed_verification {
        false => String::new(),
        true => {
            let kept = output::failed_name(&target.dest);
            match c.pending.renamed(kept.clone()).commit(output::default_file_mode(), None, false) {
                Ok(_) => format!("; the image is kept as {} for inspection (--keep-failed)", kept.display()),
                Err(e) => format!("; keeping the image as {} failed too: {e:#}", kept.display()),
            }
        }
    };
    Err(with_code(exit_codes::code_of(&failure))(anyhow::anyhow!(
        "verifying {} by booting it: {failure:#}; {untouched}{kept}",
        target.dest.display()
    )))
}

/// An edited image and what the output writer made of it.
pub(super) struct Finished<'a> {
    pub(super) image: &'a Prepared,
    pub(super) summary: Summary,
    pub(super) diff: String,
    pub(super) output: Result<Converted>,
}

/// Renames each converted output into place (or over the input, in place), in order, then writes
/// its manifest and uploads it. Returns each image's result.
pub(super) fn produce_outputs<'a>(
    s: &Customize,
    finished: Vec<Finished<'a>>,
    secret: Option<&Secret>,
    glance: Option<&Connection>,
    report: &Reporter,
) -> Result<Vec<Outcome<'a>>> {
    let mut results = Vec::new();
    let mut converted = Vec::new();
    for Finished { image, mut summary, diff, output } in finished {
        match output.and_then(|c| verify_converted(s, image, secret, &mut summary, c, report)) {
            Ok(c) => converted.push((image, summary, diff, c)),
            Err(e) => results.push(Outcome { image, result: Err(e) }),
        }
    }
    if converted.is_empty() {
        return Ok(results);
    }
    let saved_password = match (&s.password, secret) {
        (Some(source), Some(secret)) => reveal_random_password(source, secret)?,
        _ => None,
    };
    // Past this point outputs appear; an interrupt that arrived during the conversion wins.
    cleanup::checkpoint();
    let mut committed = 0;
    for (p, mut summary, diff, Converted { pending, written, digests }) in converted {
        let target = p.target.clone().expect("a real run has targets");
        // In place, the new file takes the input's mode and owner, read from the input's descriptor.
        let like_input = match (&p.lock, target.in_place) {
            (Some(input), true) => input
                .metadata()
                .context("reading the input's mode and owner")
                .map(|m| (m.permissions().mode() & 0o7777, Some((m.uid(), m.gid())))),
            _ => Ok((output::default_file_mode(), None)),
        };
        let renaming = Instant::now();
        let file = match like_input.and_then(|(mode, owner)| pending.commit(mode, owner, target.replace)) {
            Ok(file) => file,
            Err(e) => {
                results.push(Outcome { image: p, result: Err(with_code(OUTPUT)(e)) });
                continue;
            }
        };
        report.took("renaming", renaming);
        committed += 1;
        summary.output = Some(target.dest.clone());
        summary.output_format = Some(target.format);
        let name = s.upload.as_ref().and_then(|g| g.name.clone()).unwrap_or_else(|| upload::default_name(&target.dest));
        summary.openstack_command = Some(manifest::openstack_command(
            target.format.as_str(),
            written.virtual_size,
            &summary.properties,
            &target.dest,
            &name,
        ));
        summary.manifest =
            digests.map(|digests| Manifest::new(&target.dest, &written, digests, summary.properties.clone()));
        let result = finish_output(s, &mut summary, (&target.dest, file, &written), &name, glance, report);
        summary.elapsed_seconds = report.elapsed_secs();
        results.push(Outcome { image: p, result: result.map(|()| (summary, diff)) });
    }
    if committed == 0 {
        if let Some(saved) = saved_password {
            if let Err(e) = saved.remove() {
                report.warn(&format!("{e:#}"));
            }
        }
    }
    Ok(results)
}

/// After an output is in place: its manifest file, then the upload (read through `file`, the
/// descriptor the output was written with).
fn finish_output(
    s: &Customize,
    summary: &mut Summary,
    (dest, file, written): (&Path, File, &ImageInfo),
    name: &str,
    glance: Option<&Connection>,
    report: &Reporter,
) -> Result<()> {
    let manifest_path = match &s.manifest {
        ManifestRequest::None => None,
        ManifestRequest::Beside => Some(PathBuf::from(format!("{}.json", dest.display()))),
        ManifestRequest::File(path) => Some(path.clone()),
    };
    if let (Some(path), Some(manifest)) = (manifest_path, &summary.manifest) {
        output::write_small_file(&path, serde_json::to_string_pretty(manifest)?.as_bytes())
            .with_context(|| format!("the image {} was written, but not its manifest", dest.display()))
            .map_err(with_code(OUTPUT))?;
    }
    if let (Some(destination), Some(conn)) = (&s.upload, glance) {
        let options = upload::Options {
            file: Some(file),
            name: name.to_string(),
            ..upload::Options::new(dest, summary.manifest.clone(), &summary.properties, destination)
        };
        let uploaded = upload::run(&options, conn, report)
            .with_context(|| format!("the image {} was written, but not uploaded", dest.display()))
            .map_err(with_code(UPLOAD))?;
        if summary.manifest.is_none() {
            // The hashes the upload computed while sending, which Glance's matched.
            let digests = hashing::Digests { md5: uploaded.checksum.clone(), sha512: uploaded.os_hash_value.clone() };
            summary.manifest = Some(Manifest::new(dest, written, digests, summary.properties.clone()));
        }
        summary.upload = Some(uploaded);
    }
    Ok(())
}

/// Shows a generated password once on stderr, or saves it; returns the file it was saved to.
fn reveal_random_password(source: &Source, secret: &Secret) -> Result<Option<Created>> {
    match source {
        Source::Random { save_to: Some(path) } => {
            password::save_random(secret, path).map(Some).map_err(with_code(OUTPUT))
        }
        Source::Random { save_to: None } => {
            eprintln!("cloudimg: generated password (shown once): {}", secret.expose());
            Ok(None)
        }
        _ => Ok(None),
    }
}
