//! The `cloudimg` binary: parse, run, report. Everything else is in the library.

use std::io::Write;

use clap::Parser;

use cloudimg::cli::settings::Customize;
use cloudimg::cli::{Cli, Command};
use cloudimg::customize;
use cloudimg::doctor;
use cloudimg::inspect;
use cloudimg::openstack::upload;
use cloudimg::support::exit_codes;
use cloudimg::support::report::{for_terminal, Reporter, Verbosity};

fn main() {
    let cli = Cli::parse();
    cloudimg::support::cleanup::install_signal_handler();
    if matches!(cli.command, Command::Customize(_) | Command::Inspect(_) | Command::Upload(_) | Command::Verify(_)) {
        // They hold the password, OS_PASSWORD and the token, or the guests' hashes.
        cloudimg::login::password::keep_out_of_core_dumps();
    }
    let code = match cli.command {
        Command::Customize(args) => run_customize(*args),
        Command::Inspect(args) => run_inspect(&args),
        Command::Upload(args) => run_upload(args),
        Command::Verify(args) => run_verify(args),
        Command::Doctor(args) => run_doctor(&args),
        Command::Completions { shell } => {
            cloudimg::cli::assets::completions(shell, &mut std::io::stdout());
            exit_codes::SUCCESS
        }
        Command::Manpages { dir } => match cloudimg::cli::assets::manpages(&dir) {
            Ok(pages) => {
                pages.iter().for_each(|p| println!("{}", p.display()));
                exit_codes::SUCCESS
            }
            Err(e) => fail(&e.context("writing the man pages")),
        },
    };
    std::process::exit(code);
}

fn run_customize(args: cloudimg::cli::CustomizeArgs) -> i32 {
    let settings = match Customize::from_args(args) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let report = Reporter::new(settings.verbosity, settings.json);
    let results = match customize::run(&settings, &report) {
        Ok(results) => results,
        Err(e) => return fail(&e),
    };
    cloudimg::support::cleanup::checkpoint();
    if let [single] = &results[..] {
        return match single {
            Ok((summary, diff)) => {
                if settings.json {
                    print_json(summary);
                } else if settings.verbosity > Verbosity::Quiet {
                    print_summary(summary, diff);
                }
                exit_codes::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    // Several images: every one is reported; the status is the first failure's.
    let mut code = exit_codes::SUCCESS;
    let mut entries = Vec::new();
    for (input, result) in settings.inputs.iter().zip(&results) {
        match result {
            Ok((summary, diff)) => {
                if !settings.json && settings.verbosity > Verbosity::Quiet {
                    println!("== {}", for_terminal(&input.display().to_string()));
                    print_summary(summary, diff);
                }
                entries.push(serde_json::json!({"input": input, "ok": true, "exit_code": 0, "report": summary}));
            }
            Err(e) => {
                let this = exit_codes::code_of(e);
                if code == exit_codes::SUCCESS {
                    code = this;
                }
                eprintln!("cloudimg: error: {}", for_terminal(&format!("{e:#}")));
                entries.push(
                    serde_json::json!({"input": input, "ok": false, "exit_code": this, "error": format!("{e:#}")}),
                );
            }
        }
    }
    let failed = entries.iter().filter(|e| e["ok"] == false).count();
    if settings.json {
        print_json(&entries);
    } else if settings.verbosity > Verbosity::Quiet {
        let done = if settings.output == cloudimg::cli::settings::Output::DryRun { "checked" } else { "written" };
        println!(
            "{} of {} images {done}{}",
            results.len() - failed,
            results.len(),
            if failed > 0 { format!("; {failed} failed") } else { String::new() }
        );
    }
    code
}

fn print_json<T: serde::Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

fn run_inspect(args: &cloudimg::cli::InspectArgs) -> i32 {
    let verbosity = if args.quiet { Verbosity::Quiet } else { Verbosity::Normal };
    let report = Reporter::new(verbosity, args.json);
    let cloud_init_version = match args.cloud_init_version.as_deref().map(str::parse).transpose() {
        Ok(version) => version,
        Err(e) => return fail(&exit_codes::with_code(exit_codes::USAGE)(e)),
    };
    let opts = inspect::Options {
        cloud_init_version,
        user: args.user.clone(),
        root: args.root.clone(),
        require: args.require.clone(),
        accel: args.accel,
        timeout: std::time::Duration::from_secs(args.timeout),
    };
    let reports = inspect::run(&args.images, &opts, &report);
    cloudimg::support::cleanup::checkpoint();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports).unwrap_or_default());
    } else {
        for r in &reports {
            print!("{}", for_terminal(&inspect::render(r)));
        }
    }
    inspect::exit_code(&reports)
}

fn run_upload(args: cloudimg::cli::UploadArgs) -> i32 {
    let report = Reporter::new(if args.quiet { Verbosity::Quiet } else { Verbosity::Normal }, args.json);
    let destination = match cloudimg::cli::settings::glance_destination(args.glance) {
        Ok(destination) => destination,
        Err(e) => return fail(&e),
    };
    let options = match upload::options(&args.image, args.manifest.as_deref(), args.disk_format, &destination) {
        Ok(options) => options,
        Err(e) => return fail(&e),
    };
    let conn =
        upload::resolve_credentials(destination.os_cloud.as_deref()).and_then(|creds| upload::connect(&creds, &report));
    // What to print, as JSON and as text.
    let result = conn.and_then(|conn| -> anyhow::Result<(serde_json::Value, String)> {
        if args.dry_run {
            let plan = upload::plan(&options, &conn, &report)?;
            Ok((serde_json::to_value(&plan)?, upload::render_plan(&plan)))
        } else {
            let uploaded = upload::run(&options, &conn, &report)?;
            Ok((serde_json::to_value(&uploaded)?, upload::render(&uploaded)))
        }
    });
    cloudimg::support::cleanup::checkpoint();
    match result {
        Ok((json, text)) => {
            if args.json {
                print_json(&json);
            } else if !args.quiet {
                print!("{}", for_terminal(&text));
            }
            exit_codes::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn run_verify(args: cloudimg::cli::VerifyArgs) -> i32 {
    let settings = match cloudimg::cli::settings::Verify::from_args(args) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let report = Reporter::new(settings.verbosity, settings.json);
    let verdict = match cloudimg::verify::run(&settings, &report) {
        Ok(verdict) => verdict,
        Err(e) => return fail(&e),
    };
    cloudimg::support::cleanup::checkpoint();
    if settings.json {
        print_json(&verdict);
    } else {
        // The console and the logs are the guest's words.
        print!("{}", for_terminal(&cloudimg::verify::verdict::render(&verdict)));
    }
    verdict.exit_code()
}

fn run_doctor(args: &cloudimg::cli::DoctorArgs) -> i32 {
    let opts =
        doctor::Options { accel: args.accel, timeout: std::time::Duration::from_secs(args.timeout), quick: args.quick };
    let json = args.json;
    let report = doctor::run(&opts, |check| {
        if !json {
            print_check(check);
        }
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        println!("\n{}", report.verdict);
    }
    if report.works {
        exit_codes::SUCCESS
    } else {
        exit_codes::APPLIANCE
    }
}

fn print_check(check: &doctor::Check) {
    let status = match check.status {
        doctor::Status::Ok => "ok",
        doctor::Status::Info => "info",
        doctor::Status::Warning => "warning",
        doctor::Status::Fail => "FAIL",
        doctor::Status::Skipped => "skipped",
    };
    println!("{status:<8} {:<20} {}", check.name, check.detail);
    if let Some(fix) = &check.fix {
        println!("{:<8} {:<20} fix: {fix}", "", "");
    }
    let _ = std::io::stdout().flush();
}

fn print_summary(summary: &customize::Summary, diff: &str) {
    let mut out = String::new();
    if summary.dry_run {
        if diff.is_empty() {
            out += &format!("{} already has these settings; nothing would change.\n", summary.decided.file);
        } else {
            out += diff;
        }
    } else if !summary.decided.changed {
        out +=
            &format!("{} already had these settings; the output has the same configuration.\n", summary.decided.file);
    }
    for note in &summary.decided.notes {
        out += &format!("{note}\n");
    }
    let user = summary.decided.user.as_deref().unwrap_or("-");
    out += &match (&summary.decided.effective, summary.decided.method) {
        (Some(e), _) => format!(
            "user {user}: password ({}) via {}, expire {}, ssh_pwauth {}, sshd PasswordAuthentication {}\n",
            e.outcome.password_kind,
            summary.decided.form.map_or("nothing (no password given)", |f| f.describe()),
            e.outcome.expire,
            e.outcome.ssh_pwauth.map_or("unchanged".to_string(), |b| b.to_string()),
            e.sshd.as_ref().map_or("n/a (no sshd)", |d| if d.password_authentication { "yes" } else { "no" }),
        ),
        (None, customize::Route::Shadow) => format!(
            "user {user}: password set in /etc/shadow ({} hash) because {}\n",
            summary.decided.shadow_algorithm.map_or("", |a| a.name()),
            summary.decided.method_reason
        ),
        _ => "locked: no password is set by cloud-init's configuration\n".to_string(),
    };
    if let Some(output) = &summary.output {
        out += &format!("Wrote {} in {:.1} s.\n", output.display(), summary.elapsed_seconds);
    }
    match (&summary.upload, &summary.openstack_command) {
        (Some(uploaded), _) => out += &upload::render(uploaded),
        (None, Some(command)) => out += &format!("To upload it with its properties:\n  {command}\n"),
        (None, None) => {}
    }
    // Guest data (the diff, os-release in the properties, file names) is in there.
    print!("{}", for_terminal(&out));
}

fn fail(error: &anyhow::Error) -> i32 {
    cloudimg::support::cleanup::checkpoint();
    eprintln!("cloudimg: error: {}", for_terminal(&format!("{error:#}")));
    exit_codes::code_of(error)
}
