//! `synthesis [--config PATH]` serves; `synthesis channel` is the MCP channel claude runs.

use std::process::ExitCode;

use synthesis::config::Config;

const USAGE: &str = "usage:
  synthesis [--config PATH]   run the service (without --config: defaults and SYNTHESIS_* variables);
                              SIGTERM drains and exits, SIGHUP upgrades in place
  synthesis --check [--config PATH]   check the config (and that this binary runs), then exit
  synthesis openclaw-config [--config PATH] [--base-url URL]   print the provider JSON to merge into
                              openclaw.json (--base-url: a load balancer in front of several hosts)
  synthesis doctor [--config PATH]   check claude, login, workspace trust and the channel
  synthesis channel           the MCP channel server claude starts (not for manual use)
  synthesis --version | -V    print the version
  synthesis --help | -h       print this

Every config key can also be set as SYNTHESIS_<KEY> in the environment (see synthesis.conf).";

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Serve(Option<String>),
    Check(Option<String>),
    /// Config path, and the base URL OpenClaw should use (a load balancer) if not `listen`.
    OpenclawConfig(Option<String>, Option<String>),
    Doctor(Option<String>),
    Channel,
    Version,
    Help,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("synthesis: {e}\n(synthesis --help shows the usage)");
            return ExitCode::from(2);
        }
    };
    synthesis::logging::init();
    let result = match command {
        Command::Channel => synthesis::channel::run(),
        Command::Version => {
            println!("synthesis {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::OpenclawConfig(path, base_url) => Config::load(path.as_deref()).map(|c| {
            println!("{:#}", synthesis::openclaw_config::provider_json(&c, base_url.as_deref()));
            if let Some(note) = synthesis::openclaw_config::note(&c) {
                eprintln!("{note}");
            }
        }),
        Command::Doctor(path) => match Config::load(path.as_deref()).and_then(|c| synthesis::doctor::run(&c)) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Check(path) => Config::load(path.as_deref()).map(|_| println!("config ok")),
        Command::Serve(path) => Config::load(path.as_deref())
            .and_then(|config| synthesis::shell::serve(config, path.map(std::path::PathBuf::from))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<Command, String> {
    let (first, rest) = match args.split_first() {
        Some((first, rest)) => (first.as_str(), rest),
        None => return Ok(Command::Serve(None)),
    };
    let with_config = |make: fn(Option<String>) -> Command, rest: &[String]| config_path(rest).map(make);
    match first {
        "channel" if rest.is_empty() => Ok(Command::Channel),
        "channel" => Err(format!("`channel` takes no arguments, not {:?}", rest[0])),
        "openclaw-config" => {
            let mut rest = rest.to_vec();
            let base_url = take_flag(&mut rest, "--base-url")?;
            config_path(&rest).map(|path| Command::OpenclawConfig(path, base_url))
        }
        "doctor" => with_config(Command::Doctor, rest),
        "--check" => with_config(Command::Check, rest),
        "-V" | "--version" | "-h" | "--help" if !rest.is_empty() => {
            Err(format!("{first} takes no arguments, not {:?}", rest[0]))
        }
        "-V" | "--version" => Ok(Command::Version),
        "-h" | "--help" => Ok(Command::Help),
        _ => with_config(Command::Serve, args),
    }
}

/// Remove `flag VALUE` from `args`, wherever it stands.
fn take_flag(args: &mut Vec<String>, flag: &str) -> Result<Option<String>, String> {
    let Some(i) = args.iter().position(|a| a == flag) else { return Ok(None) };
    match args.get(i + 1) {
        Some(v) if !v.starts_with('-') => Ok(args.drain(i..=i + 1).nth(1)),
        _ => Err(format!("{flag} needs a value: {flag} VALUE")),
    }
}

/// `[--config PATH]` (or `--config=PATH`), and nothing else.
fn config_path(args: &[String]) -> Result<Option<String>, String> {
    let mut path = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(v) if !v.starts_with('-') => v.clone(),
                _ => return Err(format!("{arg} needs a path: {arg} PATH")),
            },
            a if a.starts_with("--config=") => a["--config=".len()..].to_string(),
            a if a.starts_with('-') => return Err(format!("unknown option {a:?}")),
            a => return Err(format!("unexpected argument {a:?}")),
        };
        if value.is_empty() {
            return Err("--config needs a path: --config PATH".into());
        }
        if path.replace(value).is_some() {
            return Err("--config is given twice".into());
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn commands_and_their_config() {
        assert_eq!(p(&[]), Ok(Command::Serve(None)));
        assert_eq!(p(&["--config", "a.conf"]), Ok(Command::Serve(Some("a.conf".into()))));
        assert_eq!(p(&["--config=a.conf"]), Ok(Command::Serve(Some("a.conf".into()))));
        assert_eq!(p(&["doctor", "-c", "a.conf"]), Ok(Command::Doctor(Some("a.conf".into()))));
        assert_eq!(p(&["openclaw-config"]), Ok(Command::OpenclawConfig(None, None)));
        assert_eq!(
            p(&["openclaw-config", "--base-url", "http://lb:8787/v1", "-c", "a"]),
            Ok(Command::OpenclawConfig(Some("a".into()), Some("http://lb:8787/v1".into())))
        );
        assert_eq!(p(&["--check", "--config", "x"]), Ok(Command::Check(Some("x".into()))));
        assert_eq!(p(&["-V"]), Ok(Command::Version));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["channel"]), Ok(Command::Channel));
    }

    #[test]
    fn precise_errors() {
        assert_eq!(p(&["--config"]), Err("--config needs a path: --config PATH".into()));
        assert_eq!(p(&["doctor", "--config"]), Err("--config needs a path: --config PATH".into()));
        assert_eq!(p(&["--config", "--check"]), Err("--config needs a path: --config PATH".into()));
        assert_eq!(p(&["--config="]), Err("--config needs a path: --config PATH".into()));
        assert_eq!(p(&["--verbose"]), Err("unknown option \"--verbose\"".into()));
        assert_eq!(p(&["serve"]), Err("unexpected argument \"serve\"".into()));
        assert_eq!(p(&["-c", "a", "-c", "b"]), Err("--config is given twice".into()));
        assert_eq!(p(&["--version", "x"]), Err("--version takes no arguments, not \"x\"".into()));
        assert_eq!(p(&["openclaw-config", "--base-url"]), Err("--base-url needs a value: --base-url VALUE".into()));
    }
}
