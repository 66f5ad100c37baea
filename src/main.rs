//! The `esh3ar` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use esh3ar::config::Config;
use esh3ar::huge_alloc::HugePageAlloc;

/// Large allocations (recovery's tables above all) on transparent huge
/// pages; see `huge_alloc`.
#[global_allocator]
static ALLOC: HugePageAlloc = HugePageAlloc;

#[derive(Parser)]
#[command(name = "esh3ar", version, about = "Durable thread-per-core messaging engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine.
    Serve {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
        /// Merge `<config stem>.<ENV>.toml` over the config (default: $ESH3AR_ENV).
        #[arg(long)]
        env: Option<String>,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Journal commands.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Print a mobile token (JWT HS256) for a user.
    Token {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
        /// The user id (the token's `sub`).
        #[arg(long)]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config (with its environment's layers) and print every
    /// effective value, secrets redacted, with its source.
    Check {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
        /// Merge `<config stem>.<ENV>.toml` over the config (default: $ESH3AR_ENV).
        #[arg(long)]
        env: Option<String>,
    },
    /// Show how the runtime configuration (the latest version in the data
    /// dir) differs from the file's.
    Diff {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
        #[arg(long)]
        env: Option<String>,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Check every journal segment of a data dir, read-only.
    Verify {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
    },
    /// Print every message in the journal as JSON lines (id, to, status, body), read-only.
    Dump {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
    },
    /// Move every damaged journal range to a quarantine file and go on
    /// without it (the engine must be stopped). Needs --accept-loss.
    Repair {
        #[arg(long, default_value = "engine.toml")]
        config: PathBuf,
        /// Confirm that the records in damaged ranges may be lost.
        #[arg(long)]
        accept_loss: bool,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        print_config_error(&e);
        ExitCode::from(2)
    })
}

fn load_layered(
    path: &std::path::Path,
    env: Option<&str>,
) -> Result<(Config, esh3ar::config_layers::Layered), ExitCode> {
    Config::load_layered(path, env).map_err(|e| {
        print_config_error(&e);
        ExitCode::from(2)
    })
}

/// An invalid config as one line per error (every error is listed).
fn print_config_error(e: &esh3ar::config::ConfigError) {
    match e {
        esh3ar::config::ConfigError::Invalid { path, errors } => {
            eprintln!("error: invalid config {}: {} error(s)", path.display(), errors.len());
            for (key, message) in errors {
                eprintln!("  `{key}` {message}");
            }
        }
        other => eprintln!("error: {other}"),
    }
}

/// `esh3ar config diff`: exit 0 when the runtime state equals the file, 1
/// when they differ (each key printed), 2 on errors.
fn config_diff(
    path: &std::path::Path,
    cfg: &Config,
    layered: &esh3ar::config_layers::Layered,
) -> Result<ExitCode, ExitCode> {
    use esh3ar::runtime_config as rc;
    let versions = rc::store::read_versions(&cfg.engine.data_dir).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })?;
    let Some(latest) = versions.last() else {
        println!("no runtime versions in {}: the file will be version 1", cfg.engine.data_dir.display());
        return Ok(ExitCode::SUCCESS);
    };
    let file_doc = rc::to_json(cfg);
    let changes = rc::diff(&latest.config, &file_doc);
    let same_file = latest.meta.file_hash == layered.hash;
    println!(
        "runtime version {} ({} by {}); {} {} since it was made",
        latest.meta.version,
        latest.meta.source,
        latest.meta.actor,
        path.display(),
        if same_file {
            "is unchanged (a restart keeps the runtime version)"
        } else {
            "changed (a restart makes it a new version)"
        }
    );
    for c in &changes {
        let show = |v: &Option<serde_json::Value>| v.as_ref().map_or("(absent)".to_owned(), |v| v.to_string());
        println!("{}: runtime {} file {}", c.key, show(&c.old), show(&c.new));
    }
    if changes.is_empty() {
        println!("no differences");
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // The commands that print (config check, journal dump, token) end
        // quietly when their reader goes away (`| head`), as Unix tools do,
        // instead of panicking on EPIPE. The engine keeps Rust's default
        // (SIGPIPE ignored): a peer that closes must not kill it.
        // SAFETY: restoring a signal's default disposition, before any
        // other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) | Err(code) => code,
    }
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.command {
        Command::Serve { config, env } => {
            // Exit 1 whenever the engine cannot start, a bad config included.
            let env = esh3ar::config_layers::env_name(env);
            let (cfg, layered) = load_layered(&config, env.as_deref()).map_err(|_| ExitCode::from(1))?;
            init_logging();
            let origin = esh3ar::admin_config::ConfigOrigin { path: config, env };
            if let Err(e) = esh3ar::server::run(cfg, &layered, origin) {
                eprintln!("error: {e:#}");
                return Err(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { command: ConfigCommand::Diff { config, env } } => {
            let env = esh3ar::config_layers::env_name(env);
            let (cfg, layered) = load_layered(&config, env.as_deref())?;
            config_diff(&config, &cfg, &layered)
        }
        Command::Config { command: ConfigCommand::Check { config, env } } => {
            let env = esh3ar::config_layers::env_name(env);
            let (cfg, layered) = load_layered(&config, env.as_deref())?;
            println!(
                "config OK: {} shards, data_dir {}, business {}, mobile {}, admin {}, {} tiers, {} clients",
                cfg.shard_count(),
                cfg.engine.data_dir.display(),
                cfg.business.listen,
                cfg.mobile.listen,
                cfg.admin.listen,
                cfg.tiers.len(),
                cfg.clients.len()
            );
            let mut doc = esh3ar::runtime_config::to_json(&cfg);
            esh3ar::runtime_config::redact(&mut doc);
            for (key, value) in esh3ar::runtime_config::flatten(&doc) {
                let source = esh3ar::config_layers::source_of(&layered.sources, &key);
                println!("{key} = {value}  # {source}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal { command: JournalCommand::Verify { config } } => {
            let cfg = load(&config)?;
            match esh3ar::journal_cli::verify(&cfg.engine.data_dir) {
                Ok(r) if r.corrupt.is_empty() => {
                    println!(
                        "journal OK: {} shards, {} records, {} messages ({} unsettled), {} torn tails",
                        r.shards, r.records, r.messages, r.unsettled, r.torn_tails
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Ok(r) => {
                    eprintln!("journal CORRUPT in {} shard(s)", r.corrupt.len());
                    Err(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Err(ExitCode::from(2))
                }
            }
        }
        Command::Journal { command: JournalCommand::Repair { config, accept_loss } } => {
            let cfg = load(&config)?;
            if !accept_loss {
                eprintln!(
                    "error: repair drops the records in damaged journal ranges (their bytes are kept in quarantine \
                     files); run `esh3ar journal verify` first, then repeat with --accept-loss to go on"
                );
                return Err(ExitCode::from(2));
            }
            // The data dir lock: never repair under a running engine.
            let _lock = esh3ar::server::DataDir::open(&cfg.engine.data_dir, cfg.shard_count()).map_err(|e| {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            })?;
            match esh3ar::journal_cli::repair(&cfg.engine.data_dir) {
                Ok(n) => {
                    println!("journal repaired: {n} damaged ranges quarantined");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Err(ExitCode::from(1))
                }
            }
        }
        Command::Journal { command: JournalCommand::Dump { config } } => {
            let cfg = load(&config)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match esh3ar::journal_cli::dump(&cfg.engine.data_dir, &mut out) {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Err(ExitCode::from(1))
                }
            }
        }
        Command::Token { config, user, ttl } => {
            let cfg = load(&config)?;
            if user.is_empty() || user.len() > esh3ar::business::USER_ID_BYTES_MAX {
                eprintln!("error: --user must be 1 to {} bytes", esh3ar::business::USER_ID_BYTES_MAX);
                return Err(ExitCode::from(2));
            }
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            println!("{}", esh3ar::token::mint(cfg.mobile.token_secret.as_bytes(), &user, now, now + ttl.max(1)));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ESH3AR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}
