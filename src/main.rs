//! The `edgebridge` command line: `run`, `check`, `rules test`, `passwd`, `version`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use edgebridge::app::Gateway;
use edgebridge::config::{self, LogFormat, Plan};
use edgebridge::dry_run::{dry_run, TestMessage};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// EX_USAGE: the configuration is invalid.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "edgebridge",
    version,
    about = "Edge gateway: embedded MQTT broker, rules, store-and-forward to the cloud"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (SIGHUP reloads rules, sinks and downlinks).
    Run {
        #[arg(long, short, default_value = "config/edgebridge.toml")]
        config: PathBuf,
        /// Log format (overrides `log.format`).
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Validate the configuration and print the resolved plan.
    Check {
        #[arg(long, short, default_value = "config/edgebridge.toml")]
        config: PathBuf,
    },
    /// Work with the rules of a configuration.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Add a device user to a users file, or change its password (argon2id hash). Without
    /// PASSWORD it is asked for twice on the terminal, or read as one line from stdin.
    Passwd {
        file: PathBuf,
        user: String,
        password: Option<String>,
    },
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Dry run: show what every rule makes of one message and what each sink would get.
    Test {
        #[arg(long, short, default_value = "config/edgebridge.toml")]
        config: PathBuf,
        #[arg(long)]
        topic: String,
        #[arg(long, default_value = "")]
        payload: String,
        /// The publishing device's client id (`client_id` in rules).
        #[arg(long, default_value = "")]
        client_id: String,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
        qos: u8,
        #[arg(long)]
        retain: bool,
        /// An MQTT 5 user property `key=value` of the message (repeatable, in order).
        #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
        properties: Vec<(String, String)>,
        /// The MQTT 5 content type of the message.
        #[arg(long)]
        content_type: Option<String>,
    },
}

/// `--property key=value`: the first `=` splits (a value may contain more).
fn parse_property(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{arg:?} is not key=value")),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

fn load_plan(path: &std::path::Path) -> Result<Plan, ExitCode> {
    let result = config::load(path).and_then(|c| config::validate(&c));
    result.map_err(|errors| {
        for e in &errors.0 {
            eprintln!("{e}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn init_logging(plan: &Plan, format: Option<LogFormatArg>) {
    // rumqttd logs every ordinary device disconnect as an error; edgebridge logs what
    // matters about connections itself.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{},rumqttd=off", plan.log.level)));
    let json = match format {
        Some(LogFormatArg::Json) => true,
        Some(LogFormatArg::Text) => false,
        None => plan.log.format == LogFormat::Json,
    };
    // Colour only for a person at a terminal: the journal, Docker and log files keep the
    // escape codes as literal bytes. `with_ansi` overrides tracing-subscriber's own
    // NO_COLOR check, so that is kept here (https://no-color.org).
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stdout().is_terminal() && !no_color;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs until SIGINT/SIGTERM; SIGHUP reloads `config` (a broken one is logged and
/// changes nothing).
async fn serve(gateway: &mut Gateway, config: &std::path::Path) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return,
                    _ = term.recv() => return,
                    _ = hup.recv() => {
                        info!(config = %config.display(), "SIGHUP: reloading the config");
                        log_reload(gateway.reload_from(config).await);
                    }
                    _ = tokio::time::sleep(edgebridge::broker::CREDENTIALS_POLL) => {
                        if let Some(result) = gateway.reload_if_secrets_changed(config).await {
                            log_reload(result);
                        }
                    }
                }
            }
        }
    }
    wait_for_signal().await;
}

fn log_reload(result: Result<edgebridge::app::ReloadReport, Vec<String>>) {
    match result {
        Ok(report) => info!(?report, "reload done"),
        Err(errors) => {
            for e in &errors {
                error!(error = %e, "reload rejected");
            }
            error!(
                problems = errors.len(),
                "reload rejected; the running config stays"
            );
        }
    }
}

fn run(plan: Plan, config: &std::path::Path) -> ExitCode {
    // Multi-thread: device connections, rules and sinks share the cores.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let mut gateway = match Gateway::start(plan).await {
            Ok(g) => g,
            Err(e) => {
                error!(error = %format!("{e:#}"), "start-up failed");
                // Also on stderr, like a config error: logs go to stdout, and whoever
                // started the process looks for why it would not start here.
                eprintln!("edgebridge: start-up failed: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        for (name, addr) in &gateway.listeners {
            info!(listener = %name, %addr, "ready for devices");
        }
        serve(&mut gateway, config).await;
        gateway.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// The password for `passwd`: asked twice on a terminal, else one line of stdin.
fn read_password(user: &str) -> Result<String, String> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {user}: "))
            .map_err(|e| format!("cannot read the password: {e}"))?;
        let again = rpassword::prompt_password("again: ")
            .map_err(|e| format!("cannot read the password: {e}"))?;
        if first != again {
            return Err("the passwords differ".into());
        }
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

fn passwd(file: &std::path::Path, user: &str, password: Option<String>) -> ExitCode {
    let password = match password.map_or_else(|| read_password(user), Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match edgebridge::broker::set_password(file, user, &password) {
        Ok(replaced) => {
            let what = if replaced { "changed" } else { "added" };
            println!("user {user} {what} in {}", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Passwd {
            file,
            user,
            password,
        } => passwd(&file, &user, password),
        Command::Version => {
            println!("edgebridge {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => match load_plan(&config) {
            Ok(plan) => {
                print!("{}", plan.describe());
                println!("config OK: {}", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Rules {
            command:
                RulesCommand::Test {
                    config,
                    topic,
                    payload,
                    client_id,
                    qos,
                    retain,
                    properties,
                    content_type,
                },
        } => match load_plan(&config) {
            Ok(plan) => {
                let input = TestMessage {
                    topic,
                    payload: payload.into_bytes(),
                    client_id,
                    qos,
                    retain,
                    user_properties: properties,
                    content_type,
                };
                print!("{}", dry_run(&plan, &input));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, log_format } => match load_plan(&config) {
            Ok(plan) => {
                init_logging(&plan, log_format);
                run(plan, &config)
            }
            Err(code) => code,
        },
    }
}
