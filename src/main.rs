//! The `http-relay` binary: parses the command line and hands over to the
//! library. The listener and the shutdown signal are owned here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use http_relay::auth::Role;
use http_relay::auth::dev::DevIssuer;
use http_relay::config::{self, ClientConfig, Flags, ServerConfig};
use http_relay::telemetry::{self, LogFormat, Telemetry};

#[derive(Parser)]
#[command(
    name = "http-relay",
    version,
    about = "Relay HTTP and gRPC to backends behind NAT"
)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay server.
    Server(ServerArgs),
    /// Run a relay-client next to a backend.
    Client(ClientArgs),
    /// Mint a token from the development issuer (for local use).
    Token(TokenArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TokenRole {
    /// A user-client token for the backend.
    User,
    /// A relay-client token for the backend.
    Relay,
}

#[derive(Args)]
struct TokenArgs {
    /// Server config file whose audiences and development issuer to use.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Who the token is for.
    #[arg(long, value_enum)]
    role: TokenRole,
    /// Backend name the token grants access to.
    #[arg(long)]
    backend: String,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h")]
    ttl: humantime::Duration,
    /// Subject (`sub`) of the token.
    #[arg(long, default_value = "dev")]
    sub: String,
}

#[derive(Args)]
struct ServerArgs {
    /// TOML config file (see config/server.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (`listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// PEM certificate chain (`tls.cert`).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key (`tls.key`).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Serve cleartext HTTP/1.1 and h2c (`tls.enabled = false`).
    #[arg(long)]
    no_tls: bool,
    /// Check the configuration (files readable, key matching the
    /// certificate, key sets parsing) and exit: 0 when it is usable.
    #[arg(long)]
    check_config: bool,
}

#[derive(Args)]
struct ClientArgs {
    /// TOML config file (see config/client.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Relay server URL (`relay_url`).
    #[arg(long)]
    relay_url: Option<String>,
    /// Name user-clients reach this backend by (`backend_name`).
    #[arg(long)]
    backend_name: Option<String>,
    /// Backend base URL (`backend_url`).
    #[arg(long)]
    backend_url: Option<String>,
    /// Speak h2c prior knowledge to the backend, for gRPC (`backend_http2`).
    #[arg(long)]
    backend_http2: bool,
    /// Extra PEM trust root (`ca_file`).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Concurrent long polls (`pending_polls`).
    #[arg(long)]
    pending_polls: Option<usize>,
    /// `auto` (v2 when the server offers it, else v1), `v1` or `v2`
    /// (`transport`).
    #[arg(long, value_enum)]
    transport: Option<http_relay::config::Transport>,
    /// File with the token presented to the server (`auth.token_file`).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, cli.log_format)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Flushes batched spans without blocking a runtime worker.
async fn flush(telemetry: Telemetry) {
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}

async fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Server(args) => {
            let flags = Flags::default()
                .set("listen", args.listen)
                .set("tls.cert", args.tls_cert)
                .set("tls.key", args.tls_key)
                .set("tls.enabled", args.no_tls.then_some(false));
            let cfg: ServerConfig = config::load(args.config.as_deref(), flags)?;
            if args.check_config {
                for note in http_relay::server::check(&cfg)? {
                    println!("note: {note}");
                }
                println!("configuration OK");
                return Ok(());
            }
            let telemetry = telemetry::init(&cfg.telemetry, "http-relay-server", log_format)?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            let admin = match cfg.admin_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} (admin_listen)"))?,
                ),
                None => None,
            };
            let result =
                http_relay::server::run_with_admin(cfg, listener, admin, shutdown_signal()).await;
            flush(telemetry).await;
            result?;
        }
        Command::Client(args) => {
            let flags = Flags::default()
                .set("relay_url", args.relay_url)
                .set("backend_name", args.backend_name)
                .set("backend_url", args.backend_url)
                .set("backend_http2", args.backend_http2.then_some(true))
                .set("ca_file", args.ca_file)
                .set("pending_polls", args.pending_polls)
                .set("transport", args.transport)
                .set("auth.token_file", args.token_file);
            let cfg: ClientConfig = config::load(args.config.as_deref(), flags)?;
            let telemetry = telemetry::init(&cfg.telemetry, "http-relay-client", log_format)?;
            let result = http_relay::client::run(cfg, shutdown_signal()).await;
            flush(telemetry).await;
            result?;
        }
        Command::Token(args) => {
            let cfg: ServerConfig = config::load(args.config.as_deref(), Flags::default())?;
            let jwks = cfg
                .auth
                .issuers
                .iter()
                .find(|i| i.issuer == config::DEV_ISSUER)
                .and_then(|i| i.jwks_file.clone())
                .context("the server configuration does not trust the development issuer")?;
            let (issuer, _) = DevIssuer::ensure(&jwks)?;
            let role = match args.role {
                TokenRole::User => Role::User,
                TokenRole::Relay => Role::Relay,
            };
            let aud = http_relay::auth::audience_for(&cfg.auth, role, &args.backend);
            println!("{}", issuer.mint(&aud, &args.sub, args.ttl.into())?);
        }
    }
    Ok(())
}

/// Listens for SIGINT and SIGTERM from the moment it is called, so a
/// signal that arrives while the relay starts stops it gracefully instead
/// of killing it; the returned future resolves on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let listen = |kind: tokio::signal::unix::SignalKind, name: &'static str| {
        let registered = tokio::signal::unix::signal(kind);
        async move {
            match registered {
                Ok(mut s) => {
                    s.recv().await;
                    tracing::info!("{name} received");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    #[cfg(unix)]
    let (interrupt, term) = (
        listen(tokio::signal::unix::SignalKind::interrupt(), "SIGINT"),
        listen(tokio::signal::unix::SignalKind::terminate(), "SIGTERM"),
    );
    #[cfg(not(unix))]
    let (interrupt, term) = (
        async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("SIGINT received");
            } else {
                std::future::pending::<()>().await;
            }
        },
        std::future::pending::<()>(),
    );
    async move {
        tokio::select! {
            () = interrupt => {}
            () = term => {}
        }
    }
}
