//! The wallet participant service. Flags or environment; see `--help`.
use clap::Parser;

/// twopc wallet: user balances, holds while a purchase is prepared.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    args: twopc_participant::ParticipantArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    twopc_common::logging::init("info", cli.args.log_format);
    twopc_common::logging::abort_on_panic();
    twopc_participants::wallet::run(cli.args, twopc_common::nats::shutdown_signal()).await
}
