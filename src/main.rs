//! `synthesis [--config PATH]` serves; `synthesis channel` is the MCP channel claude runs.

use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("channel") => synthesis::channel::run(),
        Some("openclaw-config") => {
            let mut rest = args[1..].to_vec();
            take_flag(&mut rest, "--base-url").and_then(|base_url| {
                let config = config_path(&rest).and_then(|p| synthesis::config::Config::load(p.as_deref()))?;
                println!("{:#}", synthesis::openclaw_config::provider_json(&config, base_url.as_deref()));
                Ok(())
            })
        }
        Some("doctor") => {
            let config = config_path(&args[1..]).and_then(|p| synthesis::config::Config::load(p.as_deref()));
            match config.and_then(|c| synthesis::doctor::run(&c)) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("--check") => config_path(&args[1..])
            .and_then(|p| synthesis::config::Config::load(p.as_deref()))
            .map(|_| println!("config ok")),
        _ => config_path(&args).and_then(|path| {
            let config = synthesis::config::Config::load(path.as_deref())?;
            synthesis::shell::serve(config, path.map(std::path::PathBuf::from))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage:
  synthesis [--config PATH]   run the service (default config: environment only);
                              SIGTERM drains and exits, SIGHUP upgrades in place
  synthesis --check [--config PATH]   check the config (and that this binary runs), then exit
  synthesis openclaw-config [--config PATH] [--base-url URL]   print the provider JSON to merge into
                              openclaw.json (--base-url: a load balancer in front of several hosts)
  synthesis doctor [--config PATH]   check claude, login, workspace trust and the channel
  synthesis channel           the MCP channel server claude starts (not for manual use)";

/// Remove `flag VALUE` from `args`, wherever it stands.
fn take_flag(args: &mut Vec<String>, flag: &str) -> Result<Option<String>, String> {
    let Some(i) = args.iter().position(|a| a == flag) else { return Ok(None) };
    if i + 1 >= args.len() {
        return Err(format!("{flag} needs a value\n{USAGE}"));
    }
    Ok(args.drain(i..=i + 1).nth(1))
}

fn config_path(args: &[String]) -> Result<Option<String>, String> {
    match args {
        [] => Ok(None),
        [flag, path] if flag == "--config" => Ok(Some(path.clone())),
        _ => Err(format!("unexpected arguments {args:?}\n{USAGE}")),
    }
}
